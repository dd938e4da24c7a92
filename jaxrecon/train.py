"""The trainer (floor 3): `train_and_evaluate(config, workdir)`.

One jit-compiled step (`make_train_step`) does, for a batch sharded over a ('data',) mesh of all
devices with the state replicated:

  network → vertices, H camera hypotheses, UV flow, variance
  → per-face flow φ(UV flow) and colours sampled from the image (variance branch per config)
  → soft silhouettes of every hypothesis, texture render (shape and cameras held constant, as UMR),
    a novel view from a random camera (Eq. 36)
  → the losses of `jaxrecon.losses` (each logged), the variance lookahead (Eq. 31) and the
    discriminator loss with gradient penalty (Eq. 37-39)
  → Adam updates of the network and of the discriminator, in the same step.

Randomness is `fold_in(key, step)`. Orbax checkpoints hold the train state, the data iterator
state and the step; a restarted run resumes exactly. A non-finite loss or gradient stops training
with an error naming the terms; the last checkpoint stays the good one.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax
import flax.struct
import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from jaxrecon import losses, ops, render
from jaxrecon.data import builders, cub, pipeline
from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon.metrics import fid
from jaxrecon.metrics import image as image_metrics
from jaxrecon.metrics import shape as shape_metrics
from jaxrecon.models import inception, perceptual, reconstructor
from jaxrecon.models import weights as weights_lib

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  key: Array


# ----------------------------------------------------------------------------------------------
# Model pieces that depend on the config
# ----------------------------------------------------------------------------------------------


def initial_camera_quaternions(config) -> tuple | None:
  """D_cam's starting rotations: `config.model.camera_init` = 'identity' (UMR: every hypothesis at
  the identity, a view from above in the house frame) or 'azimuths' (H side views evenly spaced in
  azimuth about the up axis: the hypotheses start apart and in the views CUB-like photos have)."""
  init, h = config.model.get("camera_init", "identity"), config.model.num_hypotheses
  if init == "identity":
    return None
  if init == "azimuths":
    quats = np.asarray(camera.view_quaternions(np.arange(h) * 360.0 / h))
    return tuple(tuple(float(x) for x in q) for q in quats)
  raise ValueError(f"config.model.camera_init must be 'identity' or 'azimuths', got {init!r}")


def make_model(config, sphere: mesh_lib.SymmetricMesh) -> reconstructor.Reconstructor:
  m = config.model
  template = sphere.half(sphere.vertices) * m.template_scale
  return reconstructor.Reconstructor(
      template_half=np.asarray(template, np.float32), image_size=config.data.image_size,
      feature_dim=m.feature_dim, encoder_conv_channels=m.encoder_conv_channels,
      resnet_widths=tuple(m.resnet_widths), num_hypotheses=m.num_hypotheses, camera_width=m.camera_width,
      flow_base_channels=m.flow_base_channels, flow_stages=m.flow_stages,
      use_variance=config.variance.mode != "none", variance_base_channels=m.variance_base_channels,
      variance_stages=m.variance_stages, num_side=sphere.num_side,
      initial_quaternions=initial_camera_quaternions(config))


def make_rasterizer(config):
  """`render.soft_rasterize` with the config's image size and SoftRas settings (`config.render`)."""
  r = config.render
  return functools.partial(render.soft_rasterize, image_size=config.data.image_size, sigma=r.sigma,
                           gamma=r.gamma, dist_eps=r.get("dist_eps", 1e-4))


def learning_rate(config):
  """UMR's schedule: lr / (1 + decay · step) (umr.md §2.3)."""
  return lambda step: config.optim.learning_rate / (1.0 + config.optim.decay * step)


def make_screen_faces(config, faces):
  """(B, V, 3) vertices, (B, 7) cameras -> (B, F, 3, 3) screen-space faces for the rasterizer."""
  def screen_faces(vertices, cams):
    screen = jax.vmap(lambda v, c: camera.project_to_screen(v, c, config.render.depth_offset))(vertices, cams)
    return mesh_lib.face_vertices(screen, faces)
  return screen_faces


def turn_cameras(cams, angle):
  """Rotate each camera about the image's vertical axis by `angle` radians: (B, 7), (B,) -> (B, 7)."""
  turn = camera.quat_from_axis_angle(jnp.array([0.0, 1.0, 0.0]), angle)
  return cams.at[:, 3:].set(camera.quat_multiply(turn, cams[:, 3:]))


def random_novel_cameras(key, cams):
  """Eq. 36: rotate each camera about the object's vertical image axis by U(0°, 360°). (B, 7)."""
  return turn_cameras(cams, jax.random.uniform(key, cams.shape[:1], minval=0.0, maxval=2 * jnp.pi))


# ----------------------------------------------------------------------------------------------
# Pretrained weights: the encoder's initialisation and the frozen feature networks of the losses
# ----------------------------------------------------------------------------------------------

# loss term -> (weights path field in config.weights, converted model name or a config field naming it)
_FROZEN_TERMS = {"texture_perceptual": ("perceptual", "perceptual_net"), "fid": ("inception", None)}


def frozen_terms(config) -> dict[str, str]:
  """The feature-network loss terms that are on: {term: converted model name}.

  A term is on when its weight is positive and its weights file is configured. A positive weight
  without a file turns the term off with a logged warning (`load_frozen_networks`), never silently.
  """
  on = {}
  for term, (path_field, model_field) in _FROZEN_TERMS.items():
    if config.loss_weights.get(term, 0.0) > 0 and config.weights.get(path_field):
      on[term] = config.weights[model_field] if model_field else "fid_inception"
  return on


def load_frozen_networks(config) -> dict[str, Any]:
  """{term: variables} of the frozen networks `frozen_terms` names, loaded from converted .npz files.

  Raises:
    FileNotFoundError / ValueError: a configured file is missing or holds another model (the message
      names the file and the convert command).
  """
  for term, (path_field, _) in _FROZEN_TERMS.items():
    if config.loss_weights.get(term, 0.0) > 0 and not config.weights.get(path_field):
      logging.warning(
          "loss_weights.%s=%s but config.weights.%s is not set: the %s term is OFF in this run. Convert "
          "pretrained weights once (python -m jaxrecon.tools.convert_weights --help) and pass "
          "--config.weights.%s=PATH.npz to turn it on.", term, config.loss_weights[term], path_field, term,
          path_field)
  frozen = {}
  for term, model_name in frozen_terms(config).items():
    path = config.weights[_FROZEN_TERMS[term][0]]
    frozen[term] = weights_lib.load_variables(path, model_name)
    logging.info("%s: frozen %s weights from %s", term, model_name, path)
  return frozen


def init_encoder_from_resnet18(config, params, batch_stats):
  """Replace the encoder's ResNet-18 trunk by converted ImageNet weights (`config.weights.resnet18`)."""
  path = config.weights.get("resnet18")
  if not path:
    logging.warning("config.weights.resnet18 is not set: the encoder starts from random initialisation "
                    "(UMR starts from ImageNet weights; convert them with "
                    "python -m jaxrecon.tools.convert_weights --model=resnet18 ...).")
    return params, batch_stats
  loaded = weights_lib.load_variables(path, "resnet18")
  mine = {"params": params["encoder"]["resnet"], "batch_stats": batch_stats["encoder"]["resnet"]}
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  if shapes(loaded) != shapes(mine):
    raise ValueError(f"{path} holds a standard ResNet-18 but config.model.resnet_widths="
                     f"{tuple(config.model.resnet_widths)}; pretrained weights need (64, 128, 256, 512)")
  params = {**params, "encoder": {**params["encoder"], "resnet": loaded["params"]}}
  batch_stats = {**batch_stats, "encoder": {**batch_stats["encoder"], "resnet": loaded["batch_stats"]}}
  logging.info("Encoder trunk initialised from %s", path)
  return params, batch_stats


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def make_train_step(config, model, discriminator, sphere, tx, disc_tx):
  """The pure train step ``(state, batch) -> (state, metrics)`` (not yet jitted)."""
  faces = sphere.faces
  uv_sampler = jnp.asarray(sphere.uv_sampler(config.mesh.texels_per_edge, config.mesh.symmetric_uv))
  laplacian = jnp.asarray(sphere.laplacian)
  edge_quads = sphere.edge_quads
  w = config.loss_weights
  s = config.data.image_size
  on = frozen_terms(config)
  rasterize = make_rasterizer(config)

  screen_faces = make_screen_faces(config, faces)

  def sample_colours(image, flow, variance):
    if config.variance.mode == "none" or variance is None:
      return ops.grid_sample(image, flow, align_corners=True)
    return ops.variance_grid_sample(image, flow, variance, mode=config.variance.mode,
                                    combine=config.variance.combine, align_corners=True)

  def predict(params, batch_stats, image):
    """Network forward (train mode) and the per-face flow φ(UV flow) (Eq. 7-9)."""
    pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, image, train=True,
                                mutable=["batch_stats"])
    b = image.shape[0]
    flow = ops.grid_sample(pred.uv_flow, jnp.broadcast_to(uv_sampler, (b,) + uv_sampler.shape),
                           align_corners=True)                               # (B, F, T², 2)
    best = jnp.argmax(pred.cam_probs, axis=1)
    cam = jax.lax.stop_gradient(pred.cam_hypotheses[jnp.arange(b), best])
    return pred, updates, flow, best, cam

  def texture_l1(tex_faces, colours, sil_best, image, mask):
    rgba, aux = rasterize(tex_faces, colours, return_aux=True)
    return losses.masked_l1(rgba[..., :3], sil_best, image, mask), (rgba, aux)

  def colour_gradient(params, batch_stats, batch):
    """d(texture L1)/d(colours) with everything else held constant: the cotangent the sampler's
    backward rule turns into the flow's gradient, needed by the lookahead (Eq. 31). Computed in its
    own pass because differentiating through a renderer VJP again is not supported."""
    image, mask = batch["image"], batch["mask"]
    pred, _, flow, _, cam = predict(params, batch_stats, image)
    colours = sample_colours(image, flow, pred.variance)
    tex_faces = screen_faces(pred.vertices, cam)
    sil = rasterize(tex_faces, None)[..., 3:]
    grad = jax.grad(lambda c: jnp.sum(texture_l1(tex_faces, c, sil, image, mask)[0]))(colours)
    return jax.lax.stop_gradient(grad)

  def loss_fn(params, batch_stats, disc_params, batch, key, colour_grad, frozen):
    image, mask = batch["image"], batch["mask"]
    b = image.shape[0]
    pred, updates, flow, best, cam = predict(params, batch_stats, image)
    h = pred.cam_hypotheses.shape[1]
    terms = {}
    # Silhouettes of every hypothesis (Eq. 1-2).
    all_cams = pred.cam_hypotheses.reshape(b * h, 7)
    all_faces = screen_faces(jnp.repeat(pred.vertices, h, axis=0), all_cams)
    sil = rasterize(all_faces, None)[..., 3].reshape(b, h, s, s)
    terms["mask"] = losses.mask_iou_loss(sil, mask[..., 0], pred.cam_probs)
    terms["laplacian"] = losses.laplacian_loss(pred.vertices, laplacian)
    terms["flatten"] = losses.flatten_loss(pred.vertices, edge_quads)
    terms["deform"] = losses.deformation_loss(pred.half_offsets)
    terms["camera_entropy"] = losses.camera_entropy(pred.cam_probs)

    # Texture (Eq. 7-11): colours sampled from the image; the most probable hypothesis renders them
    # with shape and camera held constant, as UMR.
    colours = sample_colours(image, flow, pred.variance)                     # (B, F, T², 3)
    tex_faces = screen_faces(jax.lax.stop_gradient(pred.vertices), cam)
    sil_best = jax.lax.stop_gradient(sil[jnp.arange(b), best])[..., None]
    terms["texture_l1"], (rgba, aux) = texture_l1(tex_faces, colours, sil_best, image, mask)
    terms["texture_dt"] = losses.texture_dt_loss(batch["barrier"], flow,
                                                 functools.partial(ops.grid_sample, align_corners=True))
    p2f_image = jnp.stack([aux["p2f"][..., 0], -aux["p2f"][..., 1]], -1)    # screen (y up) -> image
    visible = losses.visible_faces(aux["face_index"], faces.shape[0])
    terms["texture_cycle"] = losses.texture_cycle_loss(flow, p2f_image, visible)

    if colour_grad is not None:
      # Eq. 31: one step of the flow along the variance-modulated gradient of the reconstruction,
      # scored by its alignment with the pseudo-label; differentiable in the variance only.
      inner = lambda f, v: jnp.sum(colour_grad * ops.variance_grid_sample(
          image, f, v, mode="adaptive", combine=config.variance.combine, align_corners=True))
      outer = lambda f: jnp.mean(losses.texture_cycle_loss(f, p2f_image, visible))
      lookahead = ops.lookahead_loss(inner, outer, jax.lax.stop_gradient(flow), pred.variance,
                                     step_size=config.variance.lookahead_step)
      terms["variance_lookahead"] = jnp.broadcast_to(lookahead, (b,))

    if "texture_perceptual" in on:
      # UMR's texture loss: the uncalibrated perceptual distance of Eq. 35's render vs image·mask.
      net = perceptual.FeatureNet(on["texture_perceptual"])
      features = lambda x: net.apply(frozen["texture_perceptual"], perceptual.lpips_input(x))
      terms["texture_perceptual"] = losses.perceptual_texture_loss(
          rgba[..., :3], sil_best, image, mask, features, perceptual.perceptual_distance)

    if w.gan > 0 or "fid" in on:
      novel_key, gp_key = jax.random.split(key)
      novel_faces = screen_faces(pred.vertices, random_novel_cameras(novel_key, cam))   # Eq. 36
      real = image * mask
    # Adversarial (Eq. 37-39): a novel view of the predicted shape with detached texture (as UMR) vs
    # real masked images.
    if w.gan > 0:
      novel = rasterize(novel_faces, jax.lax.stop_gradient(colours))
      fake = jnp.concatenate([novel[..., :3] * novel[..., 3:], novel[..., 3:]], -1)
      real_rgba = jnp.concatenate([real, mask], -1)
      disc = lambda p, x: discriminator.apply({"params": p}, x)
      terms["gan"] = losses.generator_loss(disc(jax.lax.stop_gradient(disc_params), fake))
      disc_terms = losses.discriminator_loss(disc(disc_params, real_rgba), disc(disc_params, jax.lax.stop_gradient(fake)))
      gp = losses.gradient_penalty(lambda x: disc(disc_params, x), real_rgba, jax.lax.stop_gradient(fake), gp_key)
      disc_loss = jnp.mean(disc_terms) + config.optim.gradient_penalty * jnp.mean(gp)
    else:
      disc_loss = jnp.zeros(())
    if "fid" in on:
      # Eq. 40-47: batch FID between Inception features of the inputs (on black, as the renders) and
      # of the novel views; shape and texture both receive its gradient (§3.3).
      net = inception.FIDInceptionV3()
      features = lambda x: net.apply(frozen["fid"], x)
      novel_tex = rasterize(novel_faces, colours)
      fid_value = fid.fid_loss(jax.lax.stop_gradient(features(real)), features(novel_tex[..., :3] * novel_tex[..., 3:]))
      terms["fid"] = jnp.broadcast_to(fid_value, (b,))

    means = {k: jnp.mean(v) for k, v in terms.items()}
    # Zero-weight terms are logged but kept out of the objective (0 * NaN would still poison it).
    total = sum(getattr(w, k) * v for k, v in means.items() if getattr(w, k) != 0)
    return total + disc_loss, (means, disc_loss, updates["batch_stats"])

  use_lookahead = (config.variance.mode == "adaptive" and w.variance_lookahead > 0)

  def train_step(state: TrainState, batch, frozen=None):
    """One update. `frozen`: the variables of `load_frozen_networks` (needed when `frozen_terms` is not empty)."""
    frozen = {} if frozen is None else frozen
    missing = set(on) - set(frozen)
    if missing:
      raise ValueError(f"train_step needs the frozen networks of {sorted(missing)} (load_frozen_networks)")
    key = jax.random.fold_in(state.key, state.step)
    colour_grad = colour_gradient(state.params, state.batch_stats, batch) if use_lookahead else None
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
    (_, (terms, disc_loss, batch_stats)), (grads, disc_grads) = grad_fn(
        state.params, state.batch_stats, state.disc_params, batch, key, colour_grad, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state, state.disc_params)
    metrics = dict(terms)
    metrics["total"] = sum(getattr(w, k) * v for k, v in terms.items() if getattr(w, k) != 0)
    metrics["discriminator"] = disc_loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
        opt_state=opt_state, disc_params=optax.apply_updates(state.disc_params, disc_updates),
        disc_opt_state=disc_opt_state)
    return new_state, metrics

  return train_step, loss_fn


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def make_eval_step(config, model, sphere):
  """(params, batch_stats, batch) -> per-image metrics and the render, deterministically.

  Protocol: the most probable camera hypothesis (UMR samples one, umr.md §7.2), no noise, no flips;
  colours sampled from the input by the predicted flow without the variance branch (it only changes
  gradients). Metrics at the dataset resolution:
    mask_iou     soft IoU of the rendered silhouette vs the ground-truth mask (`metrics.image.mask_iou`)
    ssim         SSIM of the render (black background) vs image × mask (`metrics.image.ssim`, σ=1.5)
    texture_l1   mean |render·silhouette − image·mask| (Eq. 10)
  and, where the data has 3D ground truth (synthetic: `camera`, `vertices`):
    camera_error_deg   geodesic angle between the predicted and true camera rotations
    chamfer_3d         `metrics.shape.chamfer_distance` (squared) between predicted and true
                       vertices, each in its own camera's view frame, centred, unit RMS radius
                       (`metrics.shape.align_to_camera_frame`)
  """
  uv_sampler = jnp.asarray(sphere.uv_sampler(config.mesh.texels_per_edge, config.mesh.symmetric_uv))
  rasterize = make_rasterizer(config)

  screen_faces = make_screen_faces(config, sphere.faces)

  def eval_step(params, batch_stats, batch):
    image, mask = batch["image"], batch["mask"]
    pred = model.apply({"params": params, "batch_stats": batch_stats}, image, train=False)
    b = image.shape[0]
    cam = pred.cam_hypotheses[jnp.arange(b), jnp.argmax(pred.cam_probs, axis=1)]
    flow = ops.grid_sample(pred.uv_flow, jnp.broadcast_to(uv_sampler, (b,) + uv_sampler.shape), align_corners=True)
    colours = ops.grid_sample(image, flow, align_corners=True)
    rgba = rasterize(screen_faces(pred.vertices, cam), colours)
    metrics = {
        "mask_iou": image_metrics.mask_iou(rgba[..., 3], mask[..., 0]),
        "ssim": image_metrics.ssim(rgba[..., :3] * rgba[..., 3:], image, mask),
        "texture_l1": losses.masked_l1(rgba[..., :3], rgba[..., 3:], image, mask),
    }
    if "camera" in batch and "vertices" in batch:
      metrics["camera_error_deg"] = shape_metrics.rotation_error_degrees(cam[:, 3:], batch["camera"][:, 3:])
      metrics["chamfer_3d"] = shape_metrics.chamfer_distance(
          shape_metrics.align_to_camera_frame(pred.vertices, cam),
          shape_metrics.align_to_camera_frame(batch["vertices"], batch["camera"]))
    outputs = {"render": rgba, "cam": cam, "colours": colours, "pred": pred}
    return metrics, outputs

  return eval_step


def make_visualise(config, model, sphere, num_novel: int = 2):
  """(params, batch_stats, image, mask) -> an image grid (n·S, (6 + num_novel)·S, 3) in [0, 1], one
  row per image:

  input | render from the predicted camera | silhouette (red) over the mask (green) | `num_novel` novel
  views, evenly spaced turns (+120°, +240° for two) | the UV texture (the input sampled by the UV flow;
  2S wide) | variance.
  """
  s = config.data.image_size
  eval_step = make_eval_step(config, model, sphere)
  rasterize = make_rasterizer(config)
  screen_faces = make_screen_faces(config, sphere.faces)

  @jax.jit
  def panels(params, batch_stats, image, mask):
    _, out = eval_step(params, batch_stats, {"image": image, "mask": mask})
    pred, cam, b = out["pred"], out["cam"], image.shape[0]
    views = []
    for k in range(num_novel):
      novel_cam = turn_cameras(cam, jnp.full((b,), 2 * jnp.pi * (k + 1) / (num_novel + 1)))
      rgba = rasterize(screen_faces(pred.vertices, novel_cam), out["colours"])
      views.append(rgba[..., :3] * rgba[..., 3:])
    uv_texture = ops.grid_sample(image, pred.uv_flow, align_corners=True)
    uv_texture = jax.image.resize(uv_texture, (b, s, 2 * s, 3), "bilinear")
    if pred.variance is None:
      variance = jnp.zeros((b, s, s, 3))
    else:   # per image, min-max normalised for display
      v = pred.variance[..., 0]
      lo, hi = v.min((1, 2), keepdims=True), v.max((1, 2), keepdims=True)
      variance = jnp.repeat(((v - lo) / jnp.maximum(hi - lo, 1e-6))[..., None], 3, -1)
    render_rgb = out["render"][..., :3] * out["render"][..., 3:]
    overlay = jnp.concatenate([out["render"][..., 3:], mask, jnp.zeros_like(mask)], -1)
    return jnp.concatenate([image, render_rgb, overlay, *views, uv_texture, variance], axis=2)

  def visualise(params, batch_stats, image, mask):
    rows = np.asarray(panels(params, batch_stats, image, mask))
    return np.clip(rows.reshape(-1, *rows.shape[2:]), 0.0, 1.0)

  return visualise


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


class AddBarrier(grain.MapTransform):
  """Adds the texture distance-transform barrier of the mask (`losses.distance_transform_barrier`)."""

  def map(self, example):
    out = dict(example)
    out["barrier"] = losses.distance_transform_barrier(np.asarray(example["mask"])[..., 0])[..., None]
    return out


_TRAIN_KEYS = ("image", "mask", "barrier")


_CUB_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _data(config, split: str, shuffle: bool, num_epochs=None, preprocess=(), drop_remainder=True):
  """A loader of `split` ('train', 'validation', 'test') of `config.data.dataset`."""
  d = config.data
  if d.dataset == "synthetic":
    builder = builders.make_builder(d.synthetic_config, data_dir=d.data_dir,
                                    **{k: v for k, v in d.overrides.items() if v is not None})
    builders.prepare(builder)
    if builder.builder_config.image_size != d.image_size:
      raise ValueError(f"config.data.image_size={d.image_size} but synthetic_birds/"
                       f"{builder.builder_config.name} has {builder.builder_config.image_size}")
    source = builder.as_data_source(split)
  elif d.dataset == "cub":
    if not d.get("cub_dir") or not d.get("cub_cache_dir"):
      raise ValueError("config.data.dataset='cub' needs --config.data.cub_dir=<CUB_200_2011 folder> and "
                       "--config.data.cub_cache_dir=<CMR cachedir> (see the README, 'Bringing CUB-200-2011')")
    source = cub.CubSource(d.cub_dir, d.cub_cache_dir, _CUB_SPLITS[split], scops_dir=d.get("scops_dir"),
                           on_bad_record=d.get("on_bad_record", "error"))
    preprocess = [cub.CubPreprocess(d.image_size, train=(split == "train")), *preprocess]
  else:
    raise ValueError(f"config.data.dataset must be 'synthetic' or 'cub', got {d.dataset!r}")
  return pipeline.make_loader(source, batch_size=config.batch_size, image_size=d.image_size,
                              seed=config.seed, shuffle=shuffle, num_epochs=num_epochs, preprocess=preprocess,
                              drop_remainder=drop_remainder)


def _check_finite(metrics: dict, step: int):
  bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
  if bad:
    raise FloatingPointError(
        f"non-finite values at step {step}: {', '.join(f'{k}={metrics[k]}' for k in bad)}. "
        "Training stopped; the last checkpoint is the last good state.")


def create_state(config, model, discriminator, tx, disc_tx, image_shape) -> TrainState:
  key = jax.random.key(config.seed)
  init_key, disc_key, train_key = jax.random.split(key, 3)
  dummy = jnp.zeros(image_shape, jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  disc_params = discriminator.init(disc_key, jnp.zeros(image_shape[:3] + (4,), jnp.float32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params), key=train_key)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train per `config`, checkpointing and logging into `workdir`; returns the final metrics."""
  if config.get("job", "train") == "preview":
    from jaxrecon import preview  # pylint: disable=g-import-not-at-top
    return preview.run(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  sphere = mesh_lib.symmetric_sphere(config.mesh.subdivisions)
  model = make_model(config, sphere)
  discriminator = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx = optax.adam(learning_rate(config), b1=0.9, b2=0.999)
  disc_tx = optax.adam(learning_rate(config), b1=0.5, b2=0.999)

  devices = np.array(jax.devices())
  if config.batch_size % len(devices):
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {len(devices)} devices")
  mesh = jax.sharding.Mesh(devices, ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  s = config.data.image_size
  state = create_state(config, model, discriminator, tx, disc_tx, (1, s, s, 3))
  params, batch_stats = init_encoder_from_resnet18(config, state.params, state.batch_stats)
  state = state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))
  state = jax.device_put(state, replicated)
  frozen = jax.device_put(load_frozen_networks(config), replicated)
  train_step, _ = make_train_step(config, model, discriminator, sphere, tx, disc_tx)
  p_train_step = jax.jit(train_step, in_shardings=(replicated, data_sharding, replicated),
                         out_shardings=(replicated, replicated), donate_argnums=(0,))

  data_iter = iter(_data(config, "train", shuffle=True, preprocess=[AddBarrier()]))

  manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.max_to_keep, create=True))
  latest = manager.latest_step()
  if latest is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    state = jax.device_put(restored["state"], replicated)
    data_iter.set_state(restored["extra"]["data_state"].encode())
    logging.info("Resumed from step %d", latest)

  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
  images_every = config.get("log_images_every", 0)
  visualise = make_visualise(config, model, sphere) if images_every and writer is not None else None
  start_step = int(state.step)
  history = []
  t0, last_log, last_step = time.time(), time.time(), start_step
  for step in range(start_step, config.num_train_steps):
    local = {k: v for k, v in next(data_iter).items() if k in _TRAIN_KEYS}
    batch = pipeline.global_batch(local, data_sharding)
    state, metrics = p_train_step(state, batch, frozen)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(metrics, step)
    metrics["learning_rate"] = float(learning_rate(config)(step))
    history.append(metrics)
    done = step + 1
    if writer is not None and (done % config.log_every == 0 or done == config.num_train_steps):
      now = time.time()
      rate = (done - last_step) / max(now - last_log, 1e-9)   # over the last interval
      last_log, last_step = now, done
      for k, v in metrics.items():
        writer.add_scalar(f"train/{k}", v, done)
      writer.add_scalar("train/steps_per_second", rate, done)
      eta = (config.num_train_steps - done) / max(rate, 1e-9)
      logging.info("step %d/%d  total %.4f  mask %.4f  tex %.4f  %.2f steps/s  elapsed %.0fs  ETA %.0fs",
                   done, config.num_train_steps, metrics["total"], metrics["mask"], metrics["texture_l1"], rate,
                   now - t0, eta)
    if visualise is not None and (done % images_every == 0 or done == config.num_train_steps):
      _log_images(visualise, state, local, writer, workdir, done, config.get("log_images_count", 4))
    if done % config.checkpoint.every == 0 or done == config.num_train_steps:
      manager.save(done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          extra=ocp.args.JsonSave({"data_state": data_iter.get_state().decode(), "step": done})))
  manager.wait_until_finished()

  results = {}
  eval_step = jax.jit(make_eval_step(config, model, sphere))     # compiled once for every split
  for split in config.eval.get("splits", (config.eval.split,)):
    results.update(evaluate(config, model, sphere, state, writer, split=split, eval_step=eval_step))
  results["train_history"] = history
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump({k: v for k, v in results.items() if k != "train_history"}, f, indent=1)
  if writer is not None:
    writer.close()
  return results


def _log_images(visualise, state, local_batch, writer, workdir, step, count):
  """Write the reconstruction grid (`make_visualise`) of the first images of this process's batch to
  TensorBoard and to <workdir>/images/step_<step>.png."""
  n = min(count, local_batch["image"].shape[0])
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  grid = visualise(params, batch_stats, jnp.asarray(local_batch["image"][:n]), jnp.asarray(local_batch["mask"][:n]))
  writer.add_image("train/reconstructions", grid, step, dataformats="HWC")
  os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.round(grid * 255).astype(np.uint8)).save(os.path.join(workdir, "images", f"step_{step:06d}.png"))


def evaluate(config, model, sphere, state, writer=None, split: str | None = None, eval_step=None) -> dict:
  """Mask IoU, SSIM and texture L1 over every image of `split` (default `config.eval.split`), with the
  protocol of `make_eval_step` (pass a jitted `eval_step` to reuse one compilation across splits).
  Keys: 'eval/<split>/<metric>' (means), the image count and the step."""
  split = split or config.eval.split
  eval_step = eval_step or jax.jit(make_eval_step(config, model, sphere))
  loader = _data(config, split, shuffle=False, num_epochs=1, drop_remainder=False)
  values = {}
  for i, batch in enumerate(loader):
    if config.eval.max_batches and i >= config.eval.max_batches:
      break
    keys = [k for k in ("image", "mask", "camera", "vertices") if k in batch]
    out, _ = eval_step(state.params, state.batch_stats, {k: jnp.asarray(batch[k]) for k in keys})
    for k, v in out.items():
      values.setdefault(k, []).append(np.asarray(v))
  per_image = {k: np.concatenate(v) for k, v in values.items()}
  results = {f"eval/{split}/{k}": float(np.mean(v)) for k, v in per_image.items()}
  results[f"eval/{split}/num_images"] = len(per_image["mask_iou"])
  results["step"] = int(state.step)
  if writer is not None:
    for k, v in results.items():
      if k.startswith("eval/") and not k.endswith("num_images"):
        writer.add_scalar(k, v, int(state.step))
  logging.info("Evaluation on %s (%d images): %s", split, results[f"eval/{split}/num_images"],
               {k: round(v, 4) for k, v in results.items() if isinstance(v, float)})
  return results
