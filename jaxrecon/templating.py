"""Stage 1's template learning and the semantic template export (floor 3, used by `train`).

Stage 1 (`config.stage = 'template'`; UMR's is NVlabs/UMR experiments/train_s1.py) trains a
single-camera model on the sphere and, every `config.template.update_every` steps, moves the
template to the dataset-mean shape:
V_temp ← V_temp + δ̄ with δ̄ the mean of D_shape's offsets over the training images (UMR computes
f_shape(mean z); its f_shape is linear, so that is the same mean). `train.TrainState` explains why
the state keeps δ̄ instead of rewriting the model. At the end, `export` writes the template folder
(`jaxrecon.template`): the shape V_temp + δ̄ and the part labels from the averaged UV part maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxrecon import components
from jaxrecon import template as template_lib
from jaxrecon.data import builders
from jaxrecon.geometry import camera


def _images(config, max_images: int, keys=("image",)):
  """Batches (dicts of `keys`) of the training split in a fixed order, at most `max_images` images
  in all (0: every image), the last batch kept."""
  loader = components.make_data(config, "train", shuffle=False, num_epochs=1, drop_remainder=False)
  seen = 0
  for batch in loader:
    if max_images and seen >= max_images:
      return
    take = batch["image"].shape[0] if not max_images else min(batch["image"].shape[0], max_images - seen)
    seen += take
    yield {k: np.asarray(batch[k][:take]) for k in keys}


_FORWARDS: dict = {}   # id(model) -> (model, jitted forward); Flax modules holding arrays are unhashable


def _eval_forward(model):
  """jit of the eval-mode network, compiled once per model: (params, batch_stats, images) -> the
  half offsets (B, V_half, 3)."""
  if id(model) not in _FORWARDS:
    def forward(params, batch_stats, images):
      pred = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
      return pred.half_offsets
    _FORWARDS[id(model)] = (model, jax.jit(forward))
  return _FORWARDS[id(model)][1]


def mean_offset(config, model, params, batch_stats) -> np.ndarray:
  """δ̄: the mean of D_shape's offsets (V_half, 3) over `config.template.update_images` training
  images (0: all), in eval mode."""
  forward = _eval_forward(model)
  total, count = None, 0
  for batch in _images(config, config.template.update_images):
    offsets = forward(params, batch_stats, jnp.asarray(batch["image"]))
    part = np.asarray(offsets, np.float64).sum(0)
    total = part if total is None else total + part
    count += offsets.shape[0]
  if not count:
    raise ValueError("the training split is empty: nothing to average the template over")
  return (total / count).astype(np.float32)


def _part_reader(config, model, sphere):
  """jit of (params, batch_stats, images, part maps) -> (UV part maps summed (Hu, Wu, P), visible
  vertex reads summed (V, P)): the predicted flow carries the maps into UV space; the predicted
  vertices, projected by the most probable hypothesis, read the maps where they are visible (their
  screen depth within `config.template.visibility_tolerance` of the rendered depth at their pixel)."""
  rasterize = components.make_rasterizer(config)
  screen_faces = components.make_screen_faces(config, sphere.faces)
  s, tol = config.data.image_size, config.template.visibility_tolerance

  def read(params, batch_stats, images, part_maps):
    pred = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    b = images.shape[0]
    cam = pred.cam_hypotheses[jnp.arange(b), jnp.argmax(pred.cam_probs, axis=1)]
    _, aux = rasterize(screen_faces(pred.vertices, cam), jnp.zeros((b, sphere.num_faces, 1, 3)), return_aux=True)
    xy, depth = camera.project(pred.vertices, cam)                                      # (B, V, 2), (B, V)
    pixel = jnp.clip(jnp.floor((xy + 1) * s / 2).astype(jnp.int32), 0, s - 1)
    rendered = aux["depth"][jnp.arange(b)[:, None], pixel[..., 1], pixel[..., 0]]        # (B, V)
    visible = depth + config.render.depth_offset <= rendered + tol
    uv = jnp.sum(template_lib.uv_part_probabilities(part_maps, pred.uv_flow), axis=0)
    return uv, template_lib.vertex_part_reads(part_maps, xy, visible)

  return jax.jit(read)


def part_statistics(config, model, sphere, params, batch_stats):
  """Over `config.template.semantic_images` training images (0: all): the mean UV part map
  (Hu, Wu, P), the summed visible vertex reads (V, P) and the image count."""
  read = _part_reader(config, model, sphere)
  uv_total, vertex_total, count = 0.0, 0.0, 0
  for batch in _images(config, config.template.semantic_images, keys=("image", "parts")):
    uv, reads = read(params, batch_stats, jnp.asarray(batch["image"]), jnp.asarray(batch["parts"]))
    uv_total = uv_total + np.asarray(uv, np.float64)
    vertex_total = vertex_total + np.asarray(reads, np.float64)
    count += batch["image"].shape[0]
  return (uv_total / count).astype(np.float32), (vertex_total / count).astype(np.float32), count


def part_names(config) -> list[str]:
  if config.data.dataset == "synthetic":
    from jaxrecon.data import synthetic  # pylint: disable=g-import-not-at-top
    return list(synthetic.PART_NAMES)
  return ["background", "head", "neck", "back", "belly"]     # SCOPS's CUB parts (UMR experiments/avg_uv.py)


def export(config, model, sphere, state, directory: str) -> template_lib.Template:
  """Write the stage-1 result: V_temp = the model's template + δ̄, and the semantic labels."""
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  vertices_half = np.asarray(model.template_half, np.float32) + np.asarray(jax.device_get(state.template_offset))
  uv_probs, vertex_reads, count = part_statistics(config, model, sphere, params, batch_stats)
  labelling = config.template.labelling
  if labelling not in ("vertex_projection", "uv_flow"):
    raise ValueError(f"config.template.labelling must be 'vertex_projection' or 'uv_flow', got {labelling!r}")
  provenance = {"step": int(state.step), "images_averaged": count, "dataset": config.data.dataset,
                "averaging": "plain mean over the training images"}
  if config.data.dataset == "synthetic":
    provenance["synthetic_config"] = config.data.synthetic_config
  result = template_lib.save(directory, sphere, vertices_half, uv_probs, components.make_uv_sampler(config, sphere),
                             part_names(config), provenance,
                             vertex_part_probs=vertex_reads if labelling == "vertex_projection" else None)
  logging.info("Wrote the template to %s: %s vertices per part from %d images", directory,
               result.meta["part_vertex_counts"], count)
  return result


def ground_truth(config, split: str = "train", max_images: int = 0):
  """Synthetic data only: the ground-truth mean shape (V, 3) (the generator's shapes are in vertex
  correspondence with the sphere, so the mean is well defined) and each vertex's majority part
  label (V,) over the split's shapes."""
  if config.data.dataset != "synthetic":
    raise ValueError("ground truth templates exist only for config.data.dataset='synthetic'")
  builder = builders.make_builder(config.data.synthetic_config, data_dir=config.data.data_dir,
                                  **{k: v for k, v in config.data.overrides.items() if v is not None})
  source = builder.as_data_source(split)
  n = len(source) if not max_images else min(max_images, len(source))
  sphere_faces = components.sphere_for(config).faces
  vertices, votes = 0.0, None
  for i in range(n):
    example = source[i]
    vertices = vertices + np.asarray(example["vertices"], np.float64)
    labels = template_lib.vertex_labels(example["face_parts"], sphere_faces, example["vertices"].shape[0])
    one_hot = np.eye(5, dtype=np.int64)[labels]
    votes = one_hot if votes is None else votes + one_hot
  fg = votes[:, 1:]
  return (vertices / n).astype(np.float32), (1 + np.argmax(fg, -1)).astype(np.int32)


def quality(config, learned: template_lib.Template, sphere) -> dict:
  """Synthetic data only: how close the learned template is to the ground truth.

    template/chamfer_sphere   `metrics.shape.symmetric_frame_chamfer` of the starting sphere vs the
                              ground-truth mean shape of the training split
    template/chamfer_learned  the same for the learned template (lower is closer)
    template/part_agreement   fraction of template vertices whose label equals the ground-truth
                              majority label of the nearest ground-truth mean-shape vertex, after the
                              same alignment
    template/part_agreement_constant   the same for the best constant label (the majority
                              ground-truth label of those vertices): the chance level to beat
  """
  from jaxrecon.metrics import shape as shape_metrics  # pylint: disable=g-import-not-at-top
  gt_mean, gt_labels = ground_truth(config, "train", max_images=config.template.semantic_images)
  chamfer_sphere, _ = shape_metrics.symmetric_frame_chamfer(sphere.vertices, gt_mean)
  chamfer_learned, aligned = shape_metrics.symmetric_frame_chamfer(learned.vertices, gt_mean)
  target = np.asarray(shape_metrics.normalize_shape(jnp.asarray(gt_mean)[None])[0])
  nearest = np.argmin(((np.asarray(aligned)[:, None] - target[None]) ** 2).sum(-1), axis=1)
  truth = gt_labels[nearest]
  agreement = float(np.mean(learned.vertex_parts == truth))
  constant = float(np.max(np.bincount(truth)) / truth.size)
  return {"template/chamfer_sphere": float(chamfer_sphere), "template/chamfer_learned": float(chamfer_learned),
          "template/part_agreement": agreement, "template/part_agreement_constant": constant}
