"""The preview job (floor 3): the untrained template through every floor-1 convention.

Builds the category mesh, maps a UV checkerboard onto its texels through the fixed sphere sampler φ,
places it with weak-perspective cameras and renders it with the soft rasterizer: vertex/face layout,
texel layout, UV sampler, camera, screen conversion and rasterizer in one picture. Run it with
``--config=configs/preview.py``.
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import trimesh

from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon import render


def checkerboard_texels(uv, cells: int = 8):
  """Per-texel colours of a UV checkerboard: (F, T*T, 2) UV in [-1, 1] -> (F, T*T, 3) in [0, 1]."""
  u, v = (uv[..., 0] + 1) / 2, (uv[..., 1] + 1) / 2
  parity = (jnp.floor(u * cells) + jnp.floor(v * cells)) % 2
  return jnp.stack([0.25 + 0.7 * u, 0.25 + 0.5 * parity, 0.25 + 0.7 * v], axis=-1)


def orbit_cameras(num_views: int, scale: float, elevation_degrees: float):
  """(N, 7) weak-perspective cameras at evenly spaced azimuths about the vertical image axis."""
  azimuth = jnp.linspace(0.0, 2 * jnp.pi, num_views, endpoint=False)
  yaw = camera.quat_from_axis_angle(jnp.array([0.0, 1.0, 0.0]), azimuth)
  pitch = camera.quat_from_axis_angle(jnp.array([1.0, 0.0, 0.0]), jnp.deg2rad(elevation_degrees))
  quats = camera.quat_multiply(jnp.broadcast_to(pitch, yaw.shape), yaw)
  scales = jnp.full((num_views, 1), scale)
  return jnp.concatenate([scales, jnp.zeros((num_views, 2)), quats], axis=-1)


def render_preview(config: ml_collections.ConfigDict):
  """Render the template sphere with a UV checkerboard from `config.preview` cameras.

  Returns:
    (N, S, S, 4) RGBA images in [0, 1], the mesh, and the cameras (N, 7).
  """
  sphere = mesh_lib.symmetric_sphere(config.mesh.subdivisions)
  uv = sphere.uv_sampler(config.mesh.texels_per_edge, symmetric=config.mesh.symmetric_uv)
  textures = checkerboard_texels(jnp.asarray(uv))
  cams = orbit_cameras(config.preview.num_views, config.preview.scale, config.preview.elevation_degrees)
  vertices = jnp.asarray(sphere.vertices, jnp.float32)

  @jax.jit
  def render_views(cams):
    screen = jax.vmap(lambda c: camera.project_to_screen(vertices, c, config.render.depth_offset))(cams)
    faces = mesh_lib.face_vertices(screen, sphere.faces)                     # (N, F, 3, 3)
    face_textures = jnp.broadcast_to(textures, (cams.shape[0],) + textures.shape)
    return render.soft_rasterize(faces, face_textures, image_size=config.render.image_size,
                                 sigma=config.render.sigma, gamma=config.render.gamma)

  return render_views(cams), sphere, cams


def _image_grid(rgba: np.ndarray) -> np.ndarray:
  """(N, S, S, 4) -> (2S, N*S, 3) uint8: RGB on top, alpha below."""
  rgb = np.concatenate(list(rgba[..., :3]), axis=1)
  alpha = np.concatenate(list(np.repeat(rgba[..., 3:], 3, axis=-1)), axis=1)
  return (np.clip(np.concatenate([rgb, alpha], axis=0), 0, 1) * 255).round().astype(np.uint8)


def run(config: ml_collections.ConfigDict, workdir: str):
  """Write preview.png, template.obj and preview.json into `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  rgba, sphere, cams = render_preview(config)
  rgba = np.asarray(rgba)
  if not np.all(np.isfinite(rgba)):
    raise FloatingPointError("preview render produced non-finite pixels")
  Image.fromarray(_image_grid(rgba)).save(os.path.join(workdir, "preview.png"))
  trimesh.Trimesh(sphere.vertices, sphere.faces, process=False).export(
      os.path.join(workdir, "template.obj"))
  summary = {
      "job": "preview",
      "num_vertices": sphere.num_vertices,
      "num_faces": sphere.num_faces,
      "cameras": np.asarray(cams).round(6).tolist(),
      "silhouette_coverage": [float(a) for a in rgba[..., 3].mean(axis=(1, 2))],
  }
  with open(os.path.join(workdir, "preview.json"), "w") as f:
    json.dump(summary, f, indent=1)
  logging.info("Wrote preview.png, template.obj and preview.json to %s", workdir)
  return summary
