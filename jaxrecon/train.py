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

from absl import logging
import flax
import flax.struct
import grain.python as grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxrecon import losses
from jaxrecon import ops
from jaxrecon import render
from jaxrecon.data import builders
from jaxrecon.data import pipeline
from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon.models import reconstructor

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


def make_model(config, sphere: mesh_lib.SymmetricMesh) -> reconstructor.Reconstructor:
  m = config.model
  template = sphere.half(sphere.vertices) * m.template_scale
  return reconstructor.Reconstructor(
      template_half=np.asarray(template, np.float32), image_size=config.data.image_size,
      feature_dim=m.feature_dim, encoder_conv_channels=m.encoder_conv_channels,
      resnet_widths=tuple(m.resnet_widths), num_hypotheses=m.num_hypotheses, camera_width=m.camera_width,
      flow_base_channels=m.flow_base_channels, flow_stages=m.flow_stages,
      use_variance=config.variance.mode != "none", variance_base_channels=m.variance_base_channels,
      variance_stages=m.variance_stages, num_side=sphere.num_side)


def learning_rate(config):
  """UMR's schedule: lr / (1 + decay · step) (umr.md §2.3)."""
  return lambda step: config.optim.learning_rate / (1.0 + config.optim.decay * step)


def random_novel_cameras(key, cams):
  """Eq. 36: rotate each camera about the object's vertical image axis by U(0°, 360°). (B, 7)."""
  angle = jax.random.uniform(key, cams.shape[:1], minval=0.0, maxval=2 * jnp.pi)
  turn = camera.quat_from_axis_angle(jnp.array([0.0, 1.0, 0.0]), angle)
  return cams.at[:, 3:].set(camera.quat_multiply(turn, cams[:, 3:]))


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
  r = config.render
  s = config.data.image_size
  rasterize = functools.partial(render.soft_rasterize, image_size=s, sigma=r.sigma, gamma=r.gamma)

  def screen_faces(vertices, cams):
    """(B, V, 3), (B, 7) -> (B, F, 3, 3) screen-space faces."""
    screen = jax.vmap(lambda v, c: camera.project_to_screen(v, c, r.depth_offset))(vertices, cams)
    return mesh_lib.face_vertices(screen, faces)

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

  def loss_fn(params, batch_stats, disc_params, batch, key, colour_grad):
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
    terms["texture_l1"], (_, aux) = texture_l1(tex_faces, colours, sil_best, image, mask)
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

    # Adversarial (Eq. 36-39): a novel view of the predicted textured mesh vs real masked images.
    if w.gan > 0:
      novel_key, gp_key = jax.random.split(key)
      novel_cams = random_novel_cameras(novel_key, cam)
      novel = rasterize(screen_faces(pred.vertices, novel_cams), jax.lax.stop_gradient(colours))
      fake = jnp.concatenate([novel[..., :3] * novel[..., 3:], novel[..., 3:]], -1)
      real = jnp.concatenate([image * mask, mask], -1)
      disc = lambda p, x: discriminator.apply({"params": p}, x)
      terms["gan"] = losses.generator_loss(disc(jax.lax.stop_gradient(disc_params), fake))
      disc_terms = losses.discriminator_loss(disc(disc_params, real), disc(disc_params, jax.lax.stop_gradient(fake)))
      gp = losses.gradient_penalty(lambda x: disc(disc_params, x), real, jax.lax.stop_gradient(fake), gp_key)
      disc_loss = jnp.mean(disc_terms) + config.optim.gradient_penalty * jnp.mean(gp)
    else:
      disc_loss = jnp.zeros(())

    means = {k: jnp.mean(v) for k, v in terms.items()}
    # Zero-weight terms are logged but kept out of the objective (0 * NaN would still poison it).
    total = sum(getattr(w, k) * v for k, v in means.items() if getattr(w, k) != 0)
    return total + disc_loss, (means, disc_loss, updates["batch_stats"])

  use_lookahead = (config.variance.mode == "adaptive" and w.variance_lookahead > 0)

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(state.key, state.step)
    colour_grad = colour_gradient(state.params, state.batch_stats, batch) if use_lookahead else None
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)
    (_, (terms, disc_loss, batch_stats)), (grads, disc_grads) = grad_fn(
        state.params, state.batch_stats, state.disc_params, batch, key, colour_grad)
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
  """(params, batch_stats, batch) -> per-image mask IoU and texture L1, using the most probable camera
  and no sampling (deterministic evaluation; UMR samples, umr.md §7.2)."""
  s = config.data.image_size
  uv_sampler = jnp.asarray(sphere.uv_sampler(config.mesh.texels_per_edge, config.mesh.symmetric_uv))

  def eval_step(params, batch_stats, batch):
    image, mask = batch["image"], batch["mask"][..., 0]
    pred = model.apply({"params": params, "batch_stats": batch_stats}, image, train=False)
    b = image.shape[0]
    cam = pred.cam_hypotheses[jnp.arange(b), jnp.argmax(pred.cam_probs, axis=1)]
    screen = jax.vmap(lambda v, c: camera.project_to_screen(v, c, config.render.depth_offset))(pred.vertices, cam)
    flow = ops.grid_sample(pred.uv_flow, jnp.broadcast_to(uv_sampler, (b,) + uv_sampler.shape), align_corners=True)
    colours = ops.grid_sample(image, flow, align_corners=True)
    rgba = render.soft_rasterize(mesh_lib.face_vertices(screen, sphere.faces), colours, image_size=s,
                                 sigma=config.render.sigma, gamma=config.render.gamma)
    iou = 1.0 - losses.mask_iou_loss(rgba[..., 3][:, None], mask)
    l1 = losses.masked_l1(rgba[..., :3], rgba[..., 3:], image, mask[..., None])
    return {"mask_iou": iou, "texture_l1": l1}, rgba

  return eval_step


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


def _data(config, split: str, shuffle: bool, num_epochs=None, preprocess=()):
  builder = builders.make_builder(config.data.synthetic_config, data_dir=config.data.data_dir,
                                  **dict(config.data.overrides))
  builders.prepare(builder)
  if builder.builder_config.image_size != config.data.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} but synthetic_birds/"
                     f"{builder.builder_config.name} has {builder.builder_config.image_size}")
  source = builder.as_data_source(split)
  return pipeline.make_loader(source, batch_size=config.batch_size, image_size=config.data.image_size,
                              seed=config.seed, shuffle=shuffle, num_epochs=num_epochs, preprocess=preprocess)


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
  state = jax.device_put(state, replicated)
  train_step, _ = make_train_step(config, model, discriminator, sphere, tx, disc_tx)
  p_train_step = jax.jit(train_step, in_shardings=(replicated, data_sharding),
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
  start_step = int(state.step)
  history = []
  t0, last_log, last_step = time.time(), time.time(), start_step
  for step in range(start_step, config.num_train_steps):
    local = {k: v for k, v in next(data_iter).items() if k in _TRAIN_KEYS}
    batch = pipeline.global_batch(local, data_sharding)
    state, metrics = p_train_step(state, batch)
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
    if done % config.checkpoint.every == 0 or done == config.num_train_steps:
      manager.save(done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          extra=ocp.args.JsonSave({"data_state": data_iter.get_state().decode(), "step": done})))
  manager.wait_until_finished()

  results = evaluate(config, model, sphere, state, writer)
  results["train_history"] = history
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump({k: v for k, v in results.items() if k != "train_history"}, f, indent=1)
  if writer is not None:
    writer.close()
  return results


def evaluate(config, model, sphere, state, writer=None) -> dict:
  """Mask IoU and texture L1 on `config.eval.split` (most probable camera; see `make_eval_step`)."""
  eval_step = jax.jit(make_eval_step(config, model, sphere))
  loader = _data(config, config.eval.split, shuffle=False, num_epochs=1)
  ious, l1s = [], []
  for i, batch in enumerate(loader):
    if config.eval.max_batches and i >= config.eval.max_batches:
      break
    out, _ = eval_step(state.params, state.batch_stats, {k: jnp.asarray(batch[k]) for k in ("image", "mask")})
    ious.append(np.asarray(out["mask_iou"]))
    l1s.append(np.asarray(out["texture_l1"]))
  results = {"eval/mask_iou": float(np.mean(np.concatenate(ious))),
             "eval/texture_l1": float(np.mean(np.concatenate(l1s))),
             "eval/num_images": int(sum(len(x) for x in ious)), "step": int(state.step)}
  if writer is not None:
    for k in ("eval/mask_iou", "eval/texture_l1"):
      writer.add_scalar(k, results[k], int(state.step))
  logging.info("Evaluation on %s: %s", config.eval.split, results)
  return results
