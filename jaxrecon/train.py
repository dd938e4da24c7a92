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

Randomness is `fold_in(key, step)`.

`config.reduction` chooses how the devices' contributions are summed. 'xla' (the default): the step
is written for the global batch and XLA's partitioner inserts all-reduces, whose order of additions
the runtime picks (gloo between processes, device order within one), so the same run split over
processes differs in the last bits, and Adam amplifies that. 'ordered': the step runs per device
under `jax.shard_map`, and every cross-device sum (BatchNorm statistics, loss means, the FID
batch, gradients) is a gather or all-to-all followed by additions in device order
(`ops.collectives`): the same bits for any split of the same devices over processes. Its random
draws are per device (`fold_in` of the device index), so they differ from 'xla' mode's.

Orbax checkpoints hold the train state, the data iterator
state and the step; a restarted run resumes exactly. A non-finite loss or gradient stops training
with an error naming the terms; the last checkpoint stays the good one.

Preemption and restarts (docs/training.md): the TensorBoard events are flushed whenever a
checkpoint is saved, and a resumed run's writer purges the steps after its checkpoint (TensorBoard's
purge_step), so a killed run leaves one value per step. A SIGTERM finishes the current step, saves
a checkpoint and returns ({'preempted': True, ...}; `jaxrecon.main` exits 0). A checkpoint that
cannot be restored is set aside with a warning and the previous one is used. The workdir is locked
against a second run (`workdir_lock`) and the config is checked first (`config_checks`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics as clu_metrics

from jaxrecon import components, config_checks, distributed, evaluation, losses, ops, templating, workdir_lock
from jaxrecon import template as template_lib
from jaxrecon import workdir as workdir_lib
from jaxrecon.data import pipeline
from jaxrecon.geometry import camera
from jaxrecon.metrics import fid
from jaxrecon.models import inception, perceptual, reconstructor
from jaxrecon.models import weights as weights_lib
from jaxrecon.ops import collectives

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
  # Stage 1's template update (NVlabs/UMR experiments/train_s1.py), as an exact reparametrisation: V_temp ← V_temp + δ̄ with
  # D_shape's bias ← bias − δ̄ leaves every prediction unchanged and only moves the point the
  # deformation loss pulls the offsets to; so the state keeps δ̄ (the dataset-mean offset at the last
  # update, (V_half, 3)) and the loss regularises offsets − δ̄. The template is sphere + δ̄.
  template_offset: Array


def loss_weight(config, term: str, step):
  """`config.loss_weights[term]`, zero outside the steps `config.loss_steps[term] = (start, stop)`
  (stop None: no end); stage 1 starts the deformation loss late and the symmetry-plane loss early
  (NVlabs/UMR experiments/train_s1.py). `step` may be traced."""
  weight = config.loss_weights[term]
  window = config.get("loss_steps", {}).get(term)
  if window is None:
    return weight
  start, stop = window
  active = step >= start
  if stop is not None:
    active = jnp.logical_and(active, step < stop)
  return jnp.where(active, weight, 0.0)


def part_setup(config, sphere):
  """The constants of the semantic terms (Eq. 13-14) from the template folder, or None when both
  weights are 0. A positive weight without `config.model.template_dir` is an error: the terms are
  defined by the stage-1 template's part labels."""
  w = config.loss_weights
  if w.get("part_probability", 0) <= 0 and w.get("part_chamfer", 0) <= 0:
    return None
  learned = components.load_template(config, sphere)
  if learned is None:
    raise ValueError("config.loss_weights.part_probability/part_chamfer > 0 need the stage-1 template: set "
                     f"--config.model.template_dir ({template_lib.STAGE1_HINT}), or set both weights to 0")
  one_hot = np.eye(5, dtype=np.float32)[learned.face_parts][:, 1:]            # (F, 4): head, neck, back, belly
  names = learned.part_names[1:]
  empty = [n for n in names if config.part_points.get(n, 0) > 0 and learned.part_vertices[n].size == 0]
  if empty and w.get("part_chamfer", 0) > 0:
    logging.warning("The template in %s labels no vertex as %s: Eq. 13 skips those parts (a longer stage 1 "
                    "usually finds them)", config.model.template_dir, ", ".join(empty))
  return {
      "face_rgb": one_hot[:, None, :3],                                       # (F, 1, 3): flat per-face textures
      "face_fourth": np.repeat(one_hot[:, None, 3:], 3, -1),
      "template_vertices": learned.vertices,
      "vertex_lists": [learned.part_vertices[n] for n in names],
      "num_points": [int(config.part_points.get(n, 0)) for n in names],
  }


def learning_rate(config):
  """UMR's schedule: lr / (1 + decay · step) (NVlabs/UMR nnutils/train_utils.py `adjust_learning_rate`)."""
  return lambda step: config.optim.learning_rate / (1.0 + config.optim.decay * step)


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


def make_train_step(config, model, discriminator, sphere, tx, disc_tx, batch_axis: str | None = None):
  """The pure train step ``(state, batch) -> (state, metrics)`` (not yet jitted).

  `batch_axis`: None for jit's global view (XLA adds the cross-device sums); a `jax.shard_map` axis
  name for the per-device step of ``config.reduction='ordered'``, which sums over that axis in device
  order (the model must have the same `batch_axis`: `components.make_model` of an 'ordered' config).
  """
  if batch_axis is not None and getattr(model, "batch_axis", None) != batch_axis:
    raise ValueError(f"make_train_step(batch_axis={batch_axis!r}) needs a model built with the same batch_axis "
                     f"(components.make_model of a config with reduction='ordered'); the model has "
                     f"{getattr(model, 'batch_axis', None)!r}")
  # Means over the global batch: local means, then (per device) the ordered mean over devices.
  cross_device_mean = (lambda x: x) if batch_axis is None else functools.partial(collectives.pmean, axis_name=batch_axis)
  global_batch = (lambda x: x) if batch_axis is None else functools.partial(collectives.gather_batch, axis_name=batch_axis)
  faces = sphere.faces
  uv_sampler = components.make_uv_sampler(config, sphere)
  laplacian = jnp.asarray(sphere.laplacian)
  edge_quads = sphere.edge_quads
  w = config.loss_weights
  s = config.data.image_size
  on = frozen_terms(config)
  rasterize = components.make_rasterizer(config)

  screen_faces = components.make_screen_faces(config, faces)
  parts = part_setup(config, sphere)
  starts = components.initial_camera_quaternions(config)
  flip_permutation = (np.arange(config.model.num_hypotheses) if starts is None
                      else losses.flip_permutation(starts))
  gan_on_silhouettes = discriminator_channels(config) == 1

  sample_colours = functools.partial(components.sample_texture, config)

  def predict(params, batch_stats, image):
    """Network forward (train mode) and the per-face flow φ(UV flow) (Eq. 7-9)."""
    pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, image, train=True,
                                mutable=["batch_stats"])
    b = image.shape[0]
    flow = components.face_flow(pred.uv_flow, uv_sampler)                  # (B, F, T², 2)
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

  def loss_fn(params, batch_stats, disc_params, batch, key, colour_grad, frozen, step=0, template_offset=None):
    """The objective; `step` selects the active terms (`loss_weight`); `template_offset`: stage 1's δ̄."""
    image, mask = batch["image"], batch["mask"]
    b = image.shape[0]
    pred, updates, flow, best, cam = predict(params, batch_stats, image)
    h = pred.cam_hypotheses.shape[1]
    terms = {}
    # Silhouettes of every hypothesis (Eq. 1-2).
    all_cams = pred.cam_hypotheses.reshape(b * h, 7)
    all_faces = screen_faces(jnp.repeat(pred.vertices, h, axis=0), all_cams)
    sil = rasterize(all_faces, None)[..., 3].reshape(b, h, s, s)
    if config.camera_selection == "best":
      terms["mask"], terms["camera_choice"] = losses.best_hypothesis_losses(
          losses.mask_iou_per_hypothesis(sil, mask[..., 0]), pred.cam_probs)
    else:   # 'expected': UMR's Σ_h p_h L_h
      terms["mask"] = losses.mask_iou_loss(sil, mask[..., 0], pred.cam_probs)
    terms["laplacian"] = losses.laplacian_loss(pred.vertices, laplacian)
    terms["flatten"] = losses.flatten_loss(pred.vertices, edge_quads)
    offsets = pred.half_offsets if template_offset is None else pred.half_offsets - template_offset
    if config.deform_reference == "batch_mean":   # CMR: only the instance's deviation is regularised
      offsets = offsets - jnp.mean(global_batch(offsets), axis=0)
    terms["deform"] = losses.deformation_loss(offsets)
    if w.get("symmetry_plane", 0) > 0:
      terms["symmetry_plane"] = losses.symmetry_plane_loss(pred.vertices, sphere.num_center)
    terms["camera_entropy"] = losses.camera_entropy(pred.cam_probs)
    if w.camera_flip > 0:
      # D_cam's answer for the flipped images must be the flipped cameras (losses.flip_consistency_loss);
      # their BatchNorm statistics updates are not kept.
      flipped, _ = model.apply({"params": params, "batch_stats": batch_stats}, image[:, :, ::-1], train=True,
                               cameras_only=True, mutable=["batch_stats"])
      terms["camera_flip"] = losses.flip_consistency_loss(pred.cam_hypotheses, pred.cam_probs, *flipped,
                                                          flip_permutation)

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
      # The step's RMS length is lookahead_step_px pixels (flow coordinates span 2 over S - 1 pixels).
      lookahead = ops.lookahead_loss(inner, outer, jax.lax.stop_gradient(flow), pred.variance,
                                     step_size=config.variance.lookahead_step_px * 2.0 / (s - 1), normalize=True)
      terms["variance_lookahead"] = jnp.broadcast_to(lookahead, (b,))

    if "texture_perceptual" in on:
      # UMR's texture loss: the uncalibrated perceptual distance of Eq. 35's render vs image·mask.
      net = perceptual.FeatureNet(on["texture_perceptual"])
      features = lambda x: net.apply(frozen["texture_perceptual"], perceptual.lpips_input(x))
      terms["texture_perceptual"] = losses.perceptual_texture_loss(
          rgba[..., :3], sil_best, image, mask, features, perceptual.perceptual_distance)

    if parts is not None:
      part_maps = batch["parts"]
      if w.part_probability > 0:
        # Eq. 14: the template's part labels rendered on the predicted shape from the (detached)
        # chosen camera vs the image's part maps; the shape gets the gradient (UMR).
        shape_faces = screen_faces(pred.vertices, cam)
        three = rasterize(shape_faces, jnp.broadcast_to(parts["face_rgb"], (b,) + parts["face_rgb"].shape))
        fourth = rasterize(shape_faces, jnp.broadcast_to(parts["face_fourth"], (b,) + parts["face_fourth"].shape))
        rendered = jnp.concatenate([three[..., :3], fourth[..., :1]], -1)
        terms["part_probability"] = losses.part_probability_loss(rendered, part_maps)
      if w.part_chamfer > 0:
        # Eq. 13: each part's template vertices, projected by every hypothesis (gradients to the
        # cameras only), to the nearest of the points sampled from that part's map; weighted by the
        # detached hypothesis probabilities (UMR's CorrLossChamfer).
        chamfer = 0.0
        for k, (index, count) in enumerate(zip(parts["vertex_lists"], parts["num_points"])):
          if count == 0 or index.size == 0:
            continue
          points, valid = losses.sample_part_points(jax.random.fold_in(key, 100 + k), part_maps[..., k + 1], count)
          xy, _ = camera.project(jnp.asarray(parts["template_vertices"][index]), pred.cam_hypotheses)  # (B, H, N, 2)
          per_h = jax.vmap(losses.vertex_part_chamfer, in_axes=(1, None, None), out_axes=1)(xy, points, valid)
          chamfer = chamfer + jnp.sum(per_h * jax.lax.stop_gradient(pred.cam_probs), axis=1)
        terms["part_chamfer"] = jnp.broadcast_to(chamfer, (b,))

    if w.gan > 0 or "fid" in on:
      novel_key, gp_key = jax.random.split(key)
      novel_faces = screen_faces(pred.vertices, components.random_novel_cameras(novel_key, cam))   # Eq. 36
      real = image * mask
    # Adversarial (Eq. 37-39): a novel view of the predicted shape with detached texture (as UMR) vs
    # real masked images.
    if w.gan > 0:
      if gan_on_silhouettes:
        # Stage 1's GAN (NVlabs/UMR experiments/train_s1.py): the novel view's silhouette vs the seen view's (detached).
        fake = rasterize(novel_faces, None)[..., 3:]
        real_rgba = sil_best
      else:
        novel = rasterize(novel_faces, jax.lax.stop_gradient(colours))
        fake = jnp.concatenate([novel[..., :3] * novel[..., 3:], novel[..., 3:]], -1)
        real_rgba = jnp.concatenate([real, mask], -1)
      disc = lambda p, x: discriminator.apply({"params": p}, x)
      terms["gan"] = losses.generator_loss(disc(jax.lax.stop_gradient(disc_params), fake))
      disc_terms = losses.discriminator_loss(disc(disc_params, real_rgba), disc(disc_params, jax.lax.stop_gradient(fake)))
      gp = losses.gradient_penalty(lambda x: disc(disc_params, x), real_rgba, jax.lax.stop_gradient(fake), gp_key)
      disc_loss = cross_device_mean(jnp.mean(disc_terms) + config.optim.gradient_penalty * jnp.mean(gp))
    else:
      disc_loss = jnp.zeros(())
    if "fid" in on:
      # Eq. 40-47: batch FID between Inception features of the inputs (on black, as the renders) and
      # of the novel views; shape and texture both receive its gradient (§3.3).
      net = inception.FIDInceptionV3()
      features = lambda x: net.apply(frozen["fid"], x)
      novel_tex = rasterize(novel_faces, colours)
      # The statistics of the global batch (gathered in device order under batch_axis).
      fid_value = fid.fid_loss(global_batch(jax.lax.stop_gradient(features(real))),
                               global_batch(features(novel_tex[..., :3] * novel_tex[..., 3:])))
      terms["fid"] = jnp.broadcast_to(fid_value, (b,))

    names = list(terms)
    means = dict(zip(names, cross_device_mean(jnp.stack([jnp.mean(terms[k]) for k in names]))))
    # Zero-weight terms are logged but kept out of the objective (0 * NaN would still poison it).
    total = sum(loss_weight(config, k, step) * v for k, v in means.items() if w[k] != 0)
    means["total"] = total
    return total + disc_loss, (means, disc_loss, updates["batch_stats"])

  use_lookahead = (config.variance.mode == "adaptive" and w.variance_lookahead > 0)

  def train_step(state: TrainState, batch, frozen=None):
    """One update. `frozen`: the variables of `load_frozen_networks` (needed when `frozen_terms` is not empty)."""
    frozen = {} if frozen is None else frozen
    missing = set(on) - set(frozen)
    if missing:
      raise ValueError(f"train_step needs the frozen networks of {sorted(missing)} (load_frozen_networks)")
    key = jax.random.fold_in(state.key, state.step)
    if batch_axis is not None:                     # each device draws its own samples
      key = jax.random.fold_in(key, jax.lax.axis_index(batch_axis))
    colour_grad = colour_gradient(state.params, state.batch_stats, batch) if use_lookahead else None
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
    (_, (terms, disc_loss, batch_stats)), (grads, disc_grads) = grad_fn(
        state.params, state.batch_stats, state.disc_params, batch, key, colour_grad, frozen, state.step,
        state.template_offset)
    if batch_axis is not None:
      # Each device differentiated its copy of the (replicated) objective: the ordered sums' backward
      # hands every device the cotangents of all copies for its samples, so the copies' gradients
      # add up to D times the gradient.
      grads, disc_grads = collectives.pmean_tree((grads, disc_grads), batch_axis)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state, state.disc_params)
    metrics = dict(terms)
    metrics["discriminator"] = disc_loss
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
        opt_state=opt_state, disc_params=optax.apply_updates(state.disc_params, disc_updates),
        disc_opt_state=disc_opt_state)
    return new_state, metrics

  return train_step, loss_fn


def jit_train_step(config, model, discriminator, sphere, tx, disc_tx, mesh: jax.sharding.Mesh):
  """`make_train_step` jitted for `mesh` (state replicated and donated, batch split over its
  'data' axis): the global-view step, or under ``config.reduction='ordered'`` the per-device step
  in `jax.shard_map` (its outputs are replicated by construction: every device computes them from
  the same gathered values)."""
  axis = components.batch_axis(config)
  step, _ = make_train_step(config, model, discriminator, sphere, tx, disc_tx, axis)
  spec = jax.sharding.PartitionSpec
  if axis is not None:
    step = jax.shard_map(step, mesh=mesh, in_specs=(spec(), spec(axis), spec()), out_specs=(spec(), spec()),
                         check_vma=False)
  replicated = jax.sharding.NamedSharding(mesh, spec())
  data_sharding = jax.sharding.NamedSharding(mesh, spec(components.BATCH_AXIS))
  return jax.jit(step, in_shardings=(replicated, data_sharding, replicated), out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


@jax.jit
def _accumulate(window, metrics: dict) -> dict:
  """Adds one step's metrics to the running window of a log interval, on device (no host sync):
  per term a `clu.metrics.Average` (the window's sum and step count) and `first_bad`, the step into
  the window (1 = its first) of the term's first non-finite value, 0 while there is none.
  `window=None` starts a window. (A dict of Averages rather than a `clu.metrics.Collection` of
  `Average.from_output`: that forwards the model output named 'mask' as clu's mask, and one of our
  terms is called 'mask'.)"""
  averages = {k: clu_metrics.Average.from_model_output(v) for k, v in metrics.items()}
  finite = {k: jnp.all(jnp.isfinite(v)) for k, v in metrics.items()}
  if window is None:
    return {"averages": averages, "first_bad": {k: jnp.where(finite[k], 0, 1).astype(jnp.int32) for k in metrics}}
  averages = {k: window["averages"][k].merge(a) for k, a in averages.items()}
  first_bad = {k: jnp.where((b == 0) & ~finite[k], averages[k].count, b).astype(jnp.int32)
               for k, b in window["first_bad"].items()}
  return {"averages": averages, "first_bad": first_bad}


def _check_finite(first_bad: dict, window_start: int, checked: int, done: int, last_checkpoint: int | None):
  """Raises FloatingPointError if a term of the window (steps window_start+1..done, fetched
  `first_bad` of `_accumulate`) was non-finite; steps up to `checked` were already found finite.
  Steps count from 1, as in the logs and the checkpoints."""
  bad = sorted(k for k, v in first_bad.items() if int(v))
  if not bad:
    return
  first = window_start + min(int(first_bad[k]) for k in bad)
  steps = f"at step {done}" if checked + 1 == done else f"between steps {checked + 1} and {done} (first at step {first})"
  kept = (f"the last checkpoint (step {last_checkpoint}) is the last good state" if last_checkpoint is not None
          else "no checkpoint was saved")
  raise FloatingPointError(f"non-finite {', '.join(bad)} {steps}. Training stopped; {kept}.")


def discriminator_channels(config) -> int:
  """What D sees: 4 (RGB on black + silhouette; stage 2, Eq. 37-39) or 1 (silhouettes only, UMR's
  stage 1), per `config.gan_input` = 'rgba' | 'silhouette'."""
  gan_input = config.get("gan_input", "rgba")
  if gan_input not in ("rgba", "silhouette"):
    raise ValueError(f"config.gan_input must be 'rgba' or 'silhouette', got {gan_input!r}")
  return 4 if gan_input == "rgba" else 1


def create_state(config, model, discriminator, tx, disc_tx, image_shape) -> TrainState:
  key = jax.random.key(config.seed)
  init_key, disc_key, train_key = jax.random.split(key, 3)
  dummy = jnp.zeros(image_shape, jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  disc_params = discriminator.init(disc_key, jnp.zeros(image_shape[:3] + (discriminator_channels(config),), jnp.float32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                    disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params), key=train_key,
                    template_offset=jnp.zeros_like(model.template_half, jnp.float32))


class _PreemptionNotice:
  """Whether the run was asked to stop (SIGTERM, as TPU VMs, Slurm and Kubernetes send before
  preemption). One process: our handler records it and the loop stops after the step. Several
  processes: JAX's preemption service (started by `jax.distributed.initialize`, with its own SIGTERM
  handler) makes every process agree on the step to stop at."""

  def __init__(self):
    self.received = False
    self._installed, self._previous = False, None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def listen(self):
    """From now on (the training loop; not data preparation or compilation, which a SIGTERM may
    simply end) a SIGTERM stops the run after the current step."""
    if not self._multi and not self._installed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True        # (no logging here: the handler may interrupt a log call)

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self.received
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:    # the preemption service is off (jax_enable_preemption_service)
      logging.warning("SIGTERM will not save a checkpoint: %s", e)
      self._multi = None
      return False

  def close(self):
    if self._installed:
      # (None: the previous handler was not installed from Python; the default is the best guess)
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage 1 (`config.stage1`, in <workdir>/stage1) → the semantic template (<workdir>/template) →
  stage 2 (`config.stage2` on that template, in <workdir>/stage2).

  Resumable at any point: a complete template folder (its template.json is written last) means
  stage 1 is done and is skipped; otherwise stage 1 resumes from its checkpoints (and, if training
  had finished, just writes the template); stage 2 resumes from its own checkpoints.
  `config.data_dir`, when set, is the synthetic data folder of both stages.
  Returns stage 2's results plus stage 1's template metrics ('stage1/...').
  """
  stage1, stage2 = config.stage1.copy_and_resolve_references(), config.stage2.copy_and_resolve_references()
  if config.get("data_dir"):
    stage1.data.data_dir = stage2.data.data_dir = config.data_dir
  directory = os.path.join(workdir, workdir_lib.TEMPLATE_DIR)
  stage1.template.output_dir = directory
  stage1_dir = os.path.join(workdir, workdir_lib.STAGE1_DIR)
  stage1_history = []
  if template_lib.exists(directory):
    logging.info("Stage 1 is done (%s exists): going on with stage 2", directory)
  else:
    logging.info("Stage 1: learning the template in %s", stage1_dir)
    trained = train_and_evaluate(stage1, stage1_dir)
    if trained.get("preempted"):
      return trained
    stage1_history = trained["train_history"]
  stage1_results = {}
  if os.path.exists(os.path.join(stage1_dir, workdir_lib.METRICS_FILE)):
    with open(os.path.join(stage1_dir, workdir_lib.METRICS_FILE)) as f:
      stage1_results = {f"stage1/{k}": v for k, v in json.load(f).items()}
  stage2.model.template_dir = directory
  logging.info("Stage 2: the full model on the template in %s", directory)
  results = train_and_evaluate(stage2, os.path.join(workdir, workdir_lib.STAGE2_DIR))
  if results.get("preempted"):
    return results
  results.update(stage1_results)
  results["stage1/train_history"] = stage1_history    # the steps stage 1 ran in this call
  if jax.process_index() == 0:
    with open(os.path.join(workdir, workdir_lib.METRICS_FILE), "w") as f:
      json.dump({k: v for k, v in results.items() if not k.endswith("train_history")}, f, indent=1)
  return results


def template_dir(config, workdir: str) -> str:
  """Where stage 1 writes its template folder: `config.template.output_dir`, or <workdir>/template."""
  return config.template.get("output_dir") or os.path.join(workdir, workdir_lib.TEMPLATE_DIR)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train per `config`, checkpointing and logging into `workdir`; returns the final metrics.

  Raises `config_checks.ConfigError` for a bad config and `workdir_lock.WorkdirBusyError` when
  another run holds the workdir. After a SIGTERM it saves a checkpoint of the current step and
  returns {'preempted': True, 'step': ..., 'train_history': ...} without evaluating.
  """
  config_checks.check(config)
  if config.get("job", "train") == "preview":
    from jaxrecon import preview  # pylint: disable=g-import-not-at-top
    return preview.run(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  # Process 0 takes the lock for all (the workdir is shared); every process learns the outcome.
  share = distributed.allgather_json if jax.process_count() > 1 else None
  with workdir_lock.hold(workdir, process_index=jax.process_index(), share=share):
    if config.get("job", "train") == "pipeline":
      return run_pipeline(config, workdir)
    with _PreemptionNotice() as preemption:     # (its handler is removed even if training raises)
      return _train_and_evaluate(config, workdir, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, preemption: "_PreemptionNotice") -> dict:
  if jax.process_index() == 0:   # what evaluate/predict rebuild the model from
    with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  sphere = components.sphere_for(config)
  model = components.make_model(config, sphere)
  learns_template = config.get("stage", "full") == "template"
  discriminator = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx = optax.adam(learning_rate(config), b1=0.9, b2=0.999)
  disc_tx = optax.adam(learning_rate(config), b1=0.5, b2=0.999)

  # Every process's devices, process by process: process p's local batch is a contiguous block.
  mesh = distributed.data_mesh()
  config_checks.check_devices(config.batch_size, mesh.size, jax.process_count())
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  s = config.data.image_size
  state = create_state(config, model, discriminator, tx, disc_tx, (1, s, s, 3))
  params, batch_stats = init_encoder_from_resnet18(config, state.params, state.batch_stats)
  state = state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params))
  state = distributed.replicate(state, replicated)   # (device_put refuses PRNG keys across processes)
  frozen = distributed.replicate(load_frozen_networks(config), replicated)
  p_train_step = jit_train_step(config, model, discriminator, sphere, tx, disc_tx, mesh)

  data_iter = iter(components.make_data(config, "train", shuffle=True, preprocess=[components.AddBarrier()]))

  distributed.barrier("checkpoint manager")   # Orbax syncs the processes through gloo (30 s patience)
  manager = workdir_lib.checkpoint_manager(workdir, config.checkpoint.max_to_keep)
  restored = workdir_lib.restore_latest(manager, state)
  if restored is not None:
    state = distributed.replicate(restored[0], replicated)
    # One data iterator state per process (each reads its own shard of the records).
    data_states = restored[1].get("data_states", [restored[1]["data_state"]])
    if len(data_states) == jax.process_count():
      data_iter.set_state(data_states[jax.process_index()].encode())
    else:
      logging.warning("The checkpoint was written by %d process(es), this run has %d: the data shards differ, "
                      "so the data order restarts (the train state is restored exactly).", len(data_states),
                      jax.process_count())
    logging.info("Resumed from step %d", int(state.step))

  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  start_step = int(state.step)
  # purge_step: TensorBoard hides what an earlier (killed) writer logged after our checkpoint, so
  # the steps this run logs again have one value each.
  writer = (SummaryWriter(os.path.join(workdir, workdir_lib.TENSORBOARD_DIR), purge_step=start_step + 1)
            if jax.process_index() == 0 else None)
  images_every = config.get("log_images_every", 0)
  visualise = evaluation.make_visualise(config, model, sphere) if images_every and writer is not None else None
  train_keys = components.TRAIN_KEYS + (("parts",) if part_setup(config, sphere) is not None else ())
  # Per-step metrics stay on device, summed over each log interval (`_accumulate`); they are fetched
  # only at log steps, before checkpoints and at the end, so no step waits for the previous one.
  # `history` holds one dict of means per logged window (bounded by num_train_steps / log_every).
  history = []
  window, window_start, checked = None, start_step, start_step   # steps up to `checked` are known finite
  last_checkpoint = start_step if restored is not None else None
  t0, last_log, last_step = time.time(), time.time(), start_step

  def verify(done):
    """The NaN guard for the steps not yet checked (a small fetch)."""
    nonlocal checked
    if window is not None and checked < done:
      _check_finite(jax.device_get(window["first_bad"]), window_start, checked, done, last_checkpoint)
    checked = done

  def log(done):
    """Fetches the window, checks it, and logs and records its means (the learning rate of step `done`)."""
    nonlocal window, window_start, checked, last_log, last_step
    if window is None:
      return
    fetched = jax.device_get(window)
    _check_finite(fetched["first_bad"], window_start, checked, done, last_checkpoint)
    means = {k: float(a.total / a.count) for k, a in fetched["averages"].items()}
    means["learning_rate"] = float(learning_rate(config)(done - 1))
    steps = done - window_start
    window, window_start, checked = None, done, done
    history.append({**means, "step": done})
    if writer is not None:
      now = time.time()
      rate = (done - last_step) / max(now - last_log, 1e-9)   # over the last interval
      last_log, last_step = now, done
      for k, v in means.items():
        writer.add_scalar(f"train/{k}", v, done)
      writer.add_scalar("train/steps_per_second", rate, done)
      eta = (config.num_train_steps - done) / max(rate, 1e-9)
      logging.info("step %d/%d  total %.4f  mask %.4f  tex %.4f (means of %d steps)  %.2f steps/s  elapsed %.0fs  "
                   "ETA %.0fs", done, config.num_train_steps, means["total"], means["mask"], means["texture_l1"],
                   steps, rate, now - t0, eta)

  def save(done):
    nonlocal last_checkpoint
    verify(done)    # never a checkpoint after a non-finite step
    # Orbax writes JSON from process 0 only: gather every process's iterator state into it.
    data_states = distributed.allgather_json(data_iter.get_state().decode())
    manager.save(done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        extra=ocp.args.JsonSave({"data_state": data_states[0], "data_states": data_states, "step": done})))
    last_checkpoint = done
    if writer is not None:
      writer.flush()    # the summaries up to a checkpoint survive a kill; a restart logs only later steps

  preempted = False
  preemption.listen()
  for step in range(start_step, config.num_train_steps):
    local = {k: v for k, v in next(data_iter).items() if k in train_keys}
    batch = pipeline.global_batch(local, data_sharding)
    if step == start_step and jax.process_count() > 1:
      # Compile first, then wait for every process: the step's collectives would give up on a peer
      # that is still compiling (gloo waits 30 s).
      p_train_step = p_train_step.lower(state, batch, frozen).compile()
      distributed.barrier("train step compiled")
    state, metrics = p_train_step(state, batch, frozen)
    window = _accumulate(window, metrics)
    done = step + 1
    if done % config.log_every == 0 or done == config.num_train_steps:
      log(done)
    if visualise is not None and (done % images_every == 0 or done == config.num_train_steps):
      evaluation.log_images(visualise, state, local, writer, workdir, done, config.get("log_images_count", 4))
    if learns_template and (done % config.template.update_every == 0 or done == config.num_train_steps):
      offset = templating.mean_offset(config, model, *jax.device_get((state.params, state.batch_stats)))
      offset = distributed.process_mean(offset).astype(np.float32)   # each process averaged its shard
      moved = float(np.sqrt(np.mean(np.sum((offset - np.asarray(jax.device_get(state.template_offset))) ** 2, -1))))
      state = state.replace(template_offset=distributed.replicate(offset, replicated))
      logging.info("step %d: template updated by the mean offset (RMS move %.4f)", done, moved)
    saved = done % config.checkpoint.every == 0 or done == config.num_train_steps
    if saved:
      save(done)
    if preemption.reached(done):
      log(done)       # the window so far: a resumed run's first window starts after this checkpoint
      if not saved:
        save(done)
      preempted = True
      break
  preemption.close()      # from here on a SIGTERM ends the process: training is saved
  manager.wait_until_finished()
  if preempted:
    logging.warning("SIGTERM: stopped after step %d of %d with a checkpoint in %s; run the same command to "
                    "resume", done, config.num_train_steps, str(manager.directory))
    if writer is not None:
      writer.close()
    return {"preempted": True, "step": done, "train_history": history}

  results = {}
  if learns_template:
    directory = template_dir(config, workdir)
    if jax.process_index() == 0:
      learned = templating.export(config, model, sphere, state, directory)
      if config.data.dataset == "synthetic":
        results.update(templating.quality(config, learned, sphere))
        logging.info("Template quality: %s", {k: round(v, 4) for k, v in results.items()})
    distributed.barrier("template written")   # stage 2 (any process) reads what process 0 wrote
  eval_step = jax.jit(evaluation.make_eval_step(config, model, sphere))     # compiled once for every split
  eval_state, eval_writer = state, writer
  if jax.process_count() > 1:
    # Each process evaluates its shard of each split on its own devices (host-local parameters: the
    # evaluator's inputs are process-local) and the per-image means are combined over processes.
    eval_state = state.replace(step=jax.device_get(state.step), params=jax.device_get(state.params),
                               batch_stats=jax.device_get(state.batch_stats))
    eval_writer = None
  for split in config.eval.get("splits", (config.eval.split,)):
    split_results = evaluation.evaluate(config, model, sphere, eval_state, eval_writer, split=split,
                                        eval_step=eval_step)
    if jax.process_count() > 1:
      split_results = distributed.merge_eval_results(split_results)
      if writer is not None:
        for k, v in split_results.items():
          if k.startswith("eval/") and not k.endswith(("num_images", "kp_pairs")):
            writer.add_scalar(k, v, int(eval_state.step))
    results.update(split_results)
  results["train_history"] = history
  if jax.process_index() == 0:
    with open(os.path.join(workdir, workdir_lib.METRICS_FILE), "w") as f:
      json.dump({k: v for k, v in results.items() if k != "train_history"}, f, indent=1)
  if writer is not None:
    writer.close()
  return results


