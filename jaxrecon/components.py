"""What a config builds, shared by the trainer, the evaluator and the predictor (floor 3).

`make_model` (the reconstructor on the config's template), `make_rasterizer` (the soft rasterizer
with the config's SoftRas settings), `make_screen_faces` (vertices + cameras -> the rasterizer's
screen-space faces), camera turns for novel views (Eq. 36) and `make_data` (a loader of a split of
the configured dataset). Everything here turns `config` fields into plain arguments of floors 1-2.
"""

from __future__ import annotations

import functools

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxrecon import losses, ops, render
from jaxrecon import template as template_lib
from jaxrecon.data import builders, cub, pipeline
from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon.models import reconstructor


def initial_camera_quaternions(config) -> tuple | None:
  """D_cam's starting rotations: `config.model.camera_init` = 'identity' (UMR: every hypothesis at
  the identity, a view from above in the house frame) or 'azimuths' (H side views evenly spaced in
  azimuth about the up axis: the hypotheses start apart and in the views CUB-like photos have)."""
  init, h = config.model.camera_init, config.model.num_hypotheses
  if init == "identity":
    return None
  if init == "azimuths":
    quats = np.asarray(camera.view_quaternions(np.arange(h) * 360.0 / h))
    return tuple(tuple(float(x) for x in q) for q in quats)
  raise ValueError(f"config.model.camera_init must be 'identity' or 'azimuths', got {init!r}")


def load_template(config, sphere: mesh_lib.SymmetricMesh) -> template_lib.Template | None:
  """The stage-1 template folder named by `config.model.template_dir` (checked against the mesh), or
  None when unset (the sphere of radius `config.model.template_scale` is then the template)."""
  directory = config.model.get("template_dir")
  return template_lib.load(directory, sphere) if directory else None


REDUCTIONS = ("xla", "ordered")
BATCH_AXIS = "data"          # the mesh axis the batch is split over (distributed.data_mesh)


def batch_axis(config) -> str | None:
  """The shard_map axis of the per-device train step under ``config.reduction='ordered'`` (sums in
  device order, `jaxrecon.train`), None under 'xla' (the default: jit's global view)."""
  value = config.get("reduction", "xla")
  if value not in REDUCTIONS:
    raise ValueError(f"config.reduction={value!r}: must be one of {', '.join(REDUCTIONS)}")
  return BATCH_AXIS if value == "ordered" else None


def make_model(config, sphere: mesh_lib.SymmetricMesh) -> reconstructor.Reconstructor:
  """The reconstructor on V_temp: the learned template of `config.model.template_dir` (stage 2), or
  the sphere scaled by `config.model.template_scale` and stretched by `config.model.template_axes`
  (stage 1 and single-stage runs). Its BatchNorm
  statistics sum over `batch_axis(config)` when training under ``config.reduction='ordered'``."""
  m = config.model
  learned = load_template(config, sphere)
  if learned is not None:
    template = learned.vertices_half
  else:   # (older workdirs' config.json predate template_axes: a sphere)
    axes = np.asarray(m.get("template_axes", (1.0, 1.0, 1.0)), np.float32)
    template = sphere.half(sphere.vertices) * m.template_scale * axes
  return reconstructor.Reconstructor(
      template_half=np.asarray(template, np.float32), image_size=config.data.image_size,
      feature_dim=m.feature_dim, encoder_conv_channels=m.encoder_conv_channels,
      resnet_widths=tuple(m.resnet_widths), num_hypotheses=m.num_hypotheses, camera_width=m.camera_width,
      flow_base_channels=m.flow_base_channels, flow_stages=m.flow_stages,
      use_variance=config.variance.mode != "none", variance_base_channels=m.variance_base_channels,
      variance_stages=m.variance_stages, num_side=sphere.num_side,
      initial_quaternions=initial_camera_quaternions(config), batch_axis=batch_axis(config))


def make_rasterizer(config, for_evaluation: bool = False):
  """`render.soft_rasterize` with the config's image size and SoftRas settings (`config.render`).

  `for_evaluation`: with the silhouette softness of the evaluation protocol, `config.eval.sigma`
  (when set), so that scores do not depend on how soft training renders (a wider training sigma
  reaches mask pixels further from the boundary, but would blur the scored silhouette).
  """
  r = config.render
  sigma = r.sigma
  if for_evaluation and config.get("eval") is not None and config.eval.get("sigma") is not None:
    sigma = config.eval.sigma
  return functools.partial(render.soft_rasterize, image_size=config.data.image_size, sigma=sigma,
                           gamma=r.gamma, dist_eps=r.dist_eps)


def make_uv_sampler(config, sphere: mesh_lib.SymmetricMesh):
  """φ: the (F, T², 2) UV coordinates of every texel (Eq. 7-9) for `config.mesh`."""
  return jnp.asarray(sphere.uv_sampler(config.mesh.texels_per_edge, config.mesh.symmetric_uv))


def face_flow(uv_flow, uv_sampler):
  """(B, H, W, 2) UV flow, (F, T², 2) φ -> (B, F, T², 2) image coordinates of every texel."""
  b = uv_flow.shape[0]
  return ops.grid_sample(uv_flow, jnp.broadcast_to(uv_sampler, (b,) + uv_sampler.shape), align_corners=True)


def sample_texture(config, image, flow, variance):
  """Per-texel colours sampled from the image by the flow, through the sampler of
  ``config.variance`` (Eq. 11 for 'paper': GS(I·V); 'adaptive' samples GS(I) and changes only the
  flow's gradient; 'none' or no variance map: plain bilinear). Training and evaluation both call
  it, so a model is scored on the texture it was trained to produce.

  (B, H, W, C), (B, F, T², 2), (B, H, W, 1) or None -> (B, F, T², C).
  """
  if config.variance.mode == "none" or variance is None:
    return ops.grid_sample(image, flow, align_corners=True)
  return ops.variance_grid_sample(image, flow, variance, mode=config.variance.mode,
                                  combine=config.variance.combine, align_corners=True)


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


class AddBarrier(grain.MapTransform):
  """Adds the texture distance-transform barrier of the mask (`losses.distance_transform_barrier`)."""

  def map(self, example):
    out = dict(example)
    out["barrier"] = losses.distance_transform_barrier(np.asarray(example["mask"])[..., 0])[..., None]
    return out


TRAIN_KEYS = ("image", "mask", "barrier")


_CUB_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def make_data(config, split: str, shuffle: bool, num_epochs=None, preprocess=(), drop_remainder=True):
  """A grain loader of `split` ('train', 'validation', 'test') of `config.data.dataset`."""
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
    source = cub.CubSource(d.cub_dir, d.cub_cache_dir, _CUB_SPLITS[split], scops_dir=d.scops_dir,
                           on_bad_record=d.on_bad_record)
    preprocess = [cub.CubPreprocess(d.image_size, train=(split == "train")), *preprocess]
  else:
    raise ValueError(f"config.data.dataset must be 'synthetic' or 'cub', got {d.dataset!r}")
  return pipeline.make_loader(source, batch_size=config.batch_size, image_size=d.image_size,
                              seed=config.seed, shuffle=shuffle, num_epochs=num_epochs, preprocess=preprocess,
                              drop_remainder=drop_remainder)


def sphere_for(config) -> mesh_lib.SymmetricMesh:
  """The template mesh topology: the icosphere refined `config.mesh.subdivisions` times."""
  return mesh_lib.symmetric_sphere(config.mesh.subdivisions)
