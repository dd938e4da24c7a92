"""Evaluation and visualisation of a trained reconstructor (floor 3).

`make_eval_step` (per-image metrics under the documented protocol), `evaluate` (every image of a
split, means keyed 'eval/<split>/<metric>'), `make_visualise` (the reconstruction grid) and
`log_images` (that grid to TensorBoard and PNG).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrecon import components, losses, ops
from jaxrecon.metrics import image as image_metrics
from jaxrecon.metrics import shape as shape_metrics


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
  uv_sampler = components.make_uv_sampler(config, sphere)
  rasterize = components.make_rasterizer(config)

  screen_faces = components.make_screen_faces(config, sphere.faces)

  def eval_step(params, batch_stats, batch):
    image, mask = batch["image"], batch["mask"]
    pred = model.apply({"params": params, "batch_stats": batch_stats}, image, train=False)
    b = image.shape[0]
    cam = pred.cam_hypotheses[jnp.arange(b), jnp.argmax(pred.cam_probs, axis=1)]
    flow = components.face_flow(pred.uv_flow, uv_sampler)
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
  rasterize = components.make_rasterizer(config)
  screen_faces = components.make_screen_faces(config, sphere.faces)

  @jax.jit
  def panels(params, batch_stats, image, mask):
    _, out = eval_step(params, batch_stats, {"image": image, "mask": mask})
    pred, cam, b = out["pred"], out["cam"], image.shape[0]
    views = []
    for k in range(num_novel):
      novel_cam = components.turn_cameras(cam, jnp.full((b,), 2 * jnp.pi * (k + 1) / (num_novel + 1)))
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


def log_images(visualise, state, local_batch, writer, workdir, step, count):
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
  loader = components.make_data(config, split, shuffle=False, num_epochs=1, drop_remainder=False)
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
