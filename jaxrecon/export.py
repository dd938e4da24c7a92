"""Textured-mesh export: the predicted shape with its UV texture as OBJ+MTL+PNG and GLB (trimesh).

What is exported (the simplest correct form of our texture model):

* The texture image is the predicted **UV texture**: the input image sampled by the UV flow
  (`uv_texture_image`). Its pixel grid is the sphere UV square [-1, 1]² with align_corners=True
  pixel centres, exactly the coordinates the renderer's texel sampler φ reads the flow at
  (`components.face_flow`), so the mesh's texture is the network's, resampled at a chosen size.
* Per-vertex UVs are `mesh.sphere_uv` of the **unit-sphere** vertices (as φ, `SymmetricMesh.uv_sampler`),
  turned into OBJ/glTF texture coordinates (`texcoords`: origin bottom-left; a UV at a pixel centre maps to
  that pixel's centre). A viewer interpolates them linearly across a face, where the renderer samples
  φ at each texel's sphere point; on the 1280-face sphere the two differ by a fraction of a texel.
* Seams (`corner_uvs`): jaxrecon's default symmetric UV (``config.mesh.symmetric_uv``) has no seam
  (u = 2·atan2(|y|, x)/π − 1 is continuous; mirror images share texels). UMR's UV has one at
  y = 0, x < 0, where u jumps from 1 to −1: a face whose corners span more than half the u range
  gets its negative-u corners shifted by one texture width (texture coordinate s + 1), which viewers
  wrap back onto the image (glTF's default sampler and OBJ both repeat). At the poles (points on the
  z axis, where u is undefined) a corner takes the mean u of the face's other corners. Vertices are
  duplicated wherever one vertex needs two texture coordinates.
* Geometry: the predicted canonical-frame vertices (the data's house frame: x forward, y left, z up)
  rotated to the y-up convention of glTF and most viewers, ``(x, y, z) -> (x, z, -y)`` (`Y_UP`).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from jaxrecon import ops
from jaxrecon.geometry import mesh as mesh_lib

# House frame (x forward, y left, z up) -> y up: a proper rotation (det +1).
Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

_POLE_EPS = 1e-9


def uv_grid(height: int, width: int):
  """(H, W, 2) UV coordinates of the pixel centres of an H×W texture: align_corners=True, so column
  c has u = −1 + 2c/(W−1) and row r has v = −1 + 2r/(H−1) (u along width, v along height)."""
  u = jnp.linspace(-1.0, 1.0, width)
  v = jnp.linspace(-1.0, 1.0, height)
  return jnp.stack(jnp.meshgrid(u, v, indexing="xy"), axis=-1)


def uv_texture_image(image, uv_flow, height: int, width: int):
  """The UV texture: (B, S, S, 3) images, (B, Hu, Wu, 2) UV flows -> (B, height, width, 3) in [0, 1].

  Each texture pixel reads the flow at its UV (`uv_grid`, bilinear, as `components.face_flow` reads
  it at texel UVs) and samples the input there (as the renderer's colours).
  """
  b = image.shape[0]
  grid = jnp.broadcast_to(uv_grid(height, width), (b, height, width, 2))
  flow = ops.grid_sample(uv_flow, grid, align_corners=True)
  return ops.grid_sample(image, flow, align_corners=True)


def corner_uvs(sphere: mesh_lib.SymmetricMesh, symmetric: bool = True) -> np.ndarray:
  """(F, 3, 2) sphere UV of every face corner, seam- and pole-corrected (see the module docstring).

  Corner u values beyond 1 mean "one texture width to the right" (`texcoords` maps them to s > 1).
  """
  unit = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
  uv = np.asarray(mesh_lib.sphere_uv(unit, symmetric=symmetric, xp=np), np.float64)
  corners = uv[sphere.faces].copy()                                     # (F, 3, 2)
  on_pole = (np.hypot(unit[:, 0], unit[:, 1]) < _POLE_EPS)[sphere.faces]  # (F, 3)
  u = corners[..., 0]
  if not symmetric:   # UMR's seam: u jumps from 1 to -1 at y = 0, x < 0
    free = np.where(on_pole, np.nan, u)
    crossing = (np.nanmax(free, axis=1) - np.nanmin(free, axis=1)) > 1.0
    u = np.where(crossing[:, None] & (u < 0) & ~on_pole, u + 2.0, u)
  others = np.where(on_pole, 0.0, u).sum(1, keepdims=True) / np.maximum((~on_pole).sum(1, keepdims=True), 1)
  corners[..., 0] = np.where(on_pole, others, u)
  return corners


def texcoords(uv, height: int, width: int) -> np.ndarray:
  """UV in [-1, 1] (align_corners pixel centres, v down) -> OBJ/glTF texture coordinates (s, t),
  origin at the bottom-left corner: s = ((u+1)/2·(W−1) + ½)/W, t = 1 − ((v+1)/2·(H−1) + ½)/H."""
  uv = np.asarray(uv, np.float64)
  s = ((uv[..., 0] + 1.0) / 2.0 * (width - 1) + 0.5) / width
  t = 1.0 - ((uv[..., 1] + 1.0) / 2.0 * (height - 1) + 0.5) / height
  wrapped = uv[..., 0] > 1.0 + 1e-9          # seam-shifted corners: exactly one texture width right
  s = np.where(wrapped, ((uv[..., 0] - 2.0 + 1.0) / 2.0 * (width - 1) + 0.5) / width + 1.0, s)
  return np.stack([s, t], axis=-1)


def unweld(vertices, faces, corner_texcoords):
  """Give every distinct (vertex, texture coordinate) pair its own vertex.

  Args:
    vertices: (V, 3); faces: (F, 3); corner_texcoords: (F, 3, 2).
  Returns:
    vertices (V', 3), faces (F, 3), texcoords (V', 2), source (V',) index into the input vertices.
  """
  corner_vertex = np.asarray(faces).reshape(-1)
  tc = np.asarray(corner_texcoords).reshape(-1, 2)
  keys = np.concatenate([corner_vertex[:, None].astype(np.float64), np.round(tc, 9)], axis=1)
  unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
  del unique
  source = corner_vertex[first]
  return np.asarray(vertices)[source], inverse.reshape(-1, 3).astype(np.int64), tc[first], source


def textured_mesh(vertices, sphere: mesh_lib.SymmetricMesh, texture, symmetric_uv: bool = True,
                  name: str = "mesh"):
  """A `trimesh.Trimesh` of predicted vertices (V, 3) with the UV texture (H, W, 3) in [0, 1].

  Vertices are rotated to y-up (`Y_UP`), UVs per `corner_uvs`/`texcoords`, duplicated by `unweld`;
  the material (and so the OBJ's texture file) is called `name`.
  """
  import trimesh  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  texture = np.asarray(texture)
  h, w = texture.shape[:2]
  tc = texcoords(corner_uvs(sphere, symmetric_uv), h, w)
  verts, faces, vertex_tc, _ = unweld(np.asarray(vertices, np.float64) @ Y_UP.T, sphere.faces, tc)
  image = Image.fromarray(np.round(np.clip(texture, 0.0, 1.0) * 255).astype(np.uint8))
  # The OBJ writer names the texture file after the material: <name>.png.
  material = trimesh.visual.material.SimpleMaterial(image=image, diffuse=(255, 255, 255, 255), name=name)
  visual = trimesh.visual.TextureVisuals(uv=vertex_tc, image=image, material=material)
  return trimesh.Trimesh(vertices=verts, faces=faces, visual=visual, process=False)


def export_mesh(mesh, out_dir: str, name: str) -> dict:
  """Write <name>.obj (+ <name>.mtl, <name>.png) and <name>.glb into out_dir; returns their paths."""
  import trimesh  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  obj_path = os.path.join(out_dir, f"{name}.obj")
  # trimesh names the texture and material files after `mtl_name`; write them next to the OBJ.
  files = trimesh.exchange.obj.export_obj(mesh, include_texture=True, return_texture=True,
                                          mtl_name=f"{name}.mtl", include_normals=False)
  text, extra = files
  with open(obj_path, "w") as f:
    f.write(text)
  for fname, data in extra.items():
    with open(os.path.join(out_dir, fname), "wb") as f:
      f.write(data)
  glb_path = os.path.join(out_dir, f"{name}.glb")
  mesh.export(glb_path, file_type="glb")
  return {"obj": obj_path, "glb": glb_path, **{os.path.splitext(k)[1][1:]: os.path.join(out_dir, k) for k in extra}}


def to_uint8(image) -> np.ndarray:
  return np.round(np.clip(np.asarray(image), 0.0, 1.0) * 255).astype(np.uint8)


def save_gif(frames, path: str, fps: float = 12.0):
  """Write (N, H, W, 3) frames in [0, 1] as a looping GIF (PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = [Image.fromarray(to_uint8(f)) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
  return path

