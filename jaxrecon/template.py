"""The learned template V_temp and its semantic parts (paper §3 "two stages", §4.1; NVlabs/UMR
experiments/train_s1.py learns the template, experiments/avg_uv.py labels its parts).

Stage 1 learns V_temp from the sphere; from the stage-1 model, the part probability maps of the
training images (SCOPS for CUB, the generator's maps for `synthetic_birds`) give every vertex and
face a part label, in one of two ways (`labels_from` in template.json):

* 'vertex_projection' (default): each image's predicted vertices, projected by its predicted
  camera, read the part map where they land, if visible (not behind the rendered surface); the
  reads are summed over the dataset and over mirror pairs; a vertex takes the largest foreground
  part, a face the largest of its corners' summed reads. This uses the shape and camera, which
  stage 1 learns first.
* 'uv_flow' (UMR's route, experiments/avg_uv.py): the part maps are carried into UV space by the predicted
  texture flow and averaged; a face takes the majority label of its texels, a vertex that of its
  faces. It needs a good texture flow; after a short stage 1 it labels worse (BENCHMARKS.md).

Either way the UV map of the flow route is saved too. Averaging is a plain mean over every training
image (UMR sums the 5 images per batch nearest to one exemplar; the mean needs no perceptual network
and no exemplar search, and its labels are measured against the generator's ground truth in
BENCHMARKS.md). Labels are taken over the foreground parts only: every surface point belongs to
some part.

One folder, one layout (UMR reads and writes its vertex lists in different places: experiments/avg_uv.py
saves ``*_vertices.npy`` in its output folder, nnutils/loss_utils.py reads them from ``vertices_idx/``):

  template.json       format, mesh sizes, faces checksum, part names, UV settings, provenance
  vertices_half.npy   (V_half, 3) float32: V_temp's free vertices, what D_shape's offsets add to (Eq. 2)
  vertices.npy        (V, 3) float32: the symmetric template
  template.obj        the template mesh, for any viewer
  uv_part_probs.npy   (Hu, Wu, P) float32: the dataset-averaged part probabilities in UV space
  vertex_part_probs.npy  (V, P) float32: the summed visible reads per vertex ('vertex_projection')
  uv_parts.png        (Hu, Wu) uint8: labels 1..P-1 (0 where no image saw a foreground part)
  face_parts.npy      (F,) int32 labels 1..P-1;  vertex_parts.npy (V,) int32 labels 1..P-1
  part_vertices.json  {part name: [vertex indices]} for parts 1..P-1 (Eq. 13's V_i)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax.numpy as jnp
import numpy as np

from jaxrecon import ops
from jaxrecon.geometry import mesh as mesh_lib

FORMAT = "jaxrecon-template/1"
STAGE1_HINT = ("train stage 1 first (python -m jaxrecon.main --config=configs/synthetic_stage1.py, or the "
               "whole pipeline: --config=configs/synthetic_pipeline.py)")


def faces_checksum(faces) -> str:
  """SHA-1 of the (F, 3) face indices as int32: identifies the mesh topology a template belongs to."""
  return hashlib.sha1(np.ascontiguousarray(np.asarray(faces, np.int32)).tobytes()).hexdigest()


def uv_part_probabilities(part_maps, uv_flow):
  """Part maps carried into UV space by the UV flow (Eq. 7-8's sampling applied to the part maps).

  Args:
    part_maps: (B, S, S, P) part probabilities, background first.
    uv_flow: (B, Hu, Wu, 2) image coordinates in [-1, 1] (grid_sample convention).
  Returns:
    (B, Hu, Wu, P): the part probabilities each UV point sees.
  """
  return ops.grid_sample(jnp.asarray(part_maps), jnp.asarray(uv_flow), align_corners=True)


def foreground_labels(probs, eps: float = 1e-6) -> np.ndarray:
  """(..., P) probabilities -> (...,) int32 labels 1..P-1 (argmax over the foreground parts), 0 where
  every foreground probability is below eps."""
  probs = np.asarray(probs)
  fg = probs[..., 1:]
  return np.where(fg.sum(-1) > eps, 1 + np.argmax(fg, -1), 0).astype(np.int32)


def vertex_part_reads(part_maps, xy, visible):
  """Eq. 13's vertex-part relation read from images: the part probabilities under each projected
  vertex, kept where the vertex is visible.

  Args:
    part_maps: (B, S, S, P); xy: (B, V, 2) projected vertices in image coordinates (x right, y down,
      [-1, 1], pixel centres at (2c+1)/S − 1); visible: (B, V) bool or 0/1.
  Returns:
    (V, P): the reads summed over the batch.
  """
  reads = ops.grid_sample(jnp.asarray(part_maps), jnp.asarray(xy)[:, :, None, :], align_corners=False)[:, :, 0]
  return jnp.sum(reads * jnp.asarray(visible, reads.dtype)[..., None], axis=0)


def labels_from_vertex_reads(vertex_reads, faces, vertex_mirror=None):
  """(V, P) summed reads -> ((V,) vertex labels, (F,) face labels), foreground parts 1..P-1; with
  `vertex_mirror`, mirror pairs pool their reads (the template is symmetric)."""
  reads = np.asarray(vertex_reads, np.float64)
  if vertex_mirror is not None:
    reads = reads + reads[np.asarray(vertex_mirror)]
  return foreground_labels(reads), foreground_labels(reads[np.asarray(faces)].sum(1))


def face_labels(uv_part_probs, uv_sampler) -> np.ndarray:
  """Each face's majority label over its T² texels.

  Args:
    uv_part_probs: (Hu, Wu, P) averaged part probabilities in UV space.
    uv_sampler: (F, T², 2) the texels' UV coordinates (`SymmetricMesh.uv_sampler`).
  Returns:
    (F,) int32 labels 1..P-1 (0 only if no texel of the face saw a foreground part).
  """
  probs = np.asarray(ops.grid_sample(jnp.asarray(uv_part_probs)[None], jnp.asarray(uv_sampler)[None],
                                     align_corners=True))[0]                 # (F, T², P)
  texel = foreground_labels(probs)                                           # (F, T²)
  num = probs.shape[-1]
  # A face's label ignores texels that saw no foreground, unless all of them did.
  counts = np.zeros((texel.shape[0], num), np.int64)
  np.add.at(counts, (np.arange(texel.shape[0])[:, None], texel), 1)
  fg = counts[:, 1:]
  return np.where(fg.sum(-1) > 0, 1 + np.argmax(fg, -1), 0).astype(np.int32)


def vertex_labels(face_parts, faces, num_vertices: int) -> np.ndarray:
  """Each vertex's majority label over its incident faces (ties: the lowest label). (V,) int32."""
  face_parts = np.asarray(face_parts)
  num = int(face_parts.max()) + 1
  counts = np.zeros((num_vertices, num), np.int64)
  for corner in range(3):
    np.add.at(counts, (np.asarray(faces)[:, corner], face_parts), 1)
  fg = counts[:, 1:]
  return np.where(fg.sum(-1) > 0, 1 + np.argmax(fg, -1), 0).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Template:
  """A loaded template folder."""
  vertices_half: np.ndarray        # (V_half, 3)
  vertices: np.ndarray             # (V, 3)
  face_parts: np.ndarray           # (F,)
  vertex_parts: np.ndarray         # (V,)
  part_vertices: dict              # name -> (N_i,) int32
  uv_part_probs: np.ndarray        # (Hu, Wu, P)
  meta: dict

  @property
  def part_names(self) -> list[str]:
    return list(self.meta["part_names"])


def save(directory: str, mesh: mesh_lib.SymmetricMesh, vertices_half, uv_part_probs, uv_sampler,
         part_names, provenance: dict | None = None, vertex_part_probs=None) -> Template:
  """Label the template's faces and vertices and write the folder (layout above): from
  `vertex_part_probs` (V, P) when given ('vertex_projection'), else from `uv_part_probs` ('uv_flow').
  Writes template.json last, so a folder with it is complete."""
  vertices_half = np.asarray(vertices_half, np.float32)
  if vertices_half.shape != (mesh.num_half_vertices, 3):
    raise ValueError(f"vertices_half has shape {vertices_half.shape}, the mesh needs ({mesh.num_half_vertices}, 3)")
  uv_part_probs = np.asarray(uv_part_probs, np.float32)
  if uv_part_probs.shape[-1] != len(part_names):
    raise ValueError(f"uv_part_probs has {uv_part_probs.shape[-1]} channels but {len(part_names)} part names")
  os.makedirs(directory, exist_ok=True)
  vertices = np.asarray(mesh_lib.symmetrize(vertices_half, mesh.num_side), np.float32)
  if vertex_part_probs is not None:
    vertex_part_probs = np.asarray(vertex_part_probs, np.float32)
    vertex_l, faces_l = labels_from_vertex_reads(vertex_part_probs, mesh.faces, mesh.vertex_mirror)
    np.save(os.path.join(directory, "vertex_part_probs.npy"), vertex_part_probs)
  else:
    faces_l = face_labels(uv_part_probs, uv_sampler)
    vertex_l = vertex_labels(faces_l, mesh.faces, mesh.num_vertices)
  part_vertices = {name: np.flatnonzero(vertex_l == k).astype(np.int32) for k, name in enumerate(part_names) if k}
  np.save(os.path.join(directory, "vertices_half.npy"), vertices_half)
  np.save(os.path.join(directory, "vertices.npy"), vertices)
  np.save(os.path.join(directory, "uv_part_probs.npy"), uv_part_probs)
  np.save(os.path.join(directory, "face_parts.npy"), faces_l)
  np.save(os.path.join(directory, "vertex_parts.npy"), vertex_l)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(foreground_labels(uv_part_probs).astype(np.uint8)).save(os.path.join(directory, "uv_parts.png"))
  with open(os.path.join(directory, "part_vertices.json"), "w") as f:
    json.dump({k: v.tolist() for k, v in part_vertices.items()}, f)
  import trimesh  # pylint: disable=g-import-not-at-top
  trimesh.Trimesh(vertices, mesh.faces, process=False).export(os.path.join(directory, "template.obj"))
  meta = {
      "format": FORMAT,
      "num_vertices": int(mesh.num_vertices), "num_half_vertices": int(mesh.num_half_vertices),
      "num_faces": int(mesh.num_faces), "faces_sha1": faces_checksum(mesh.faces),
      "part_names": list(part_names), "uv_shape": list(uv_part_probs.shape[:2]),
      "labels_from": "vertex_projection" if vertex_part_probs is not None else "uv_flow",
      "part_vertex_counts": {k: int(v.size) for k, v in part_vertices.items()},
      "provenance": provenance or {},
  }
  with open(os.path.join(directory, "template.json"), "w") as f:
    json.dump(meta, f, indent=1)
  return Template(vertices_half, vertices, faces_l, vertex_l, part_vertices, uv_part_probs, meta)


def exists(directory: str | None) -> bool:
  return bool(directory) and os.path.exists(os.path.join(directory, "template.json"))


def load(directory: str, mesh: mesh_lib.SymmetricMesh) -> Template:
  """Read a template folder written by `save`, checking it against `mesh`; clear errors otherwise."""
  meta_path = os.path.join(directory, "template.json")
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f"config.model.template_dir={directory!r} holds no template.json: {STAGE1_HINT}")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this jaxrecon reads {FORMAT!r}")
  expected = {"num_vertices": mesh.num_vertices, "num_half_vertices": mesh.num_half_vertices,
              "num_faces": mesh.num_faces, "faces_sha1": faces_checksum(mesh.faces)}
  wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
  if wrong:
    raise ValueError(f"{meta_path} was made for another mesh ({', '.join(f'{k}: {a} in the file, {b} here' for k, (a, b) in wrong.items())}); "
                     f"check config.mesh.subdivisions or {STAGE1_HINT}")
  def read(name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing from the template folder (an interrupted write?): {STAGE1_HINT}")
    return np.load(path)
  vertices_half = read("vertices_half.npy").astype(np.float32)
  face_parts, vertex_parts = read("face_parts.npy"), read("vertex_parts.npy")
  shapes = {"vertices_half.npy": (vertices_half.shape, (mesh.num_half_vertices, 3)),
            "face_parts.npy": (face_parts.shape, (mesh.num_faces,)),
            "vertex_parts.npy": (vertex_parts.shape, (mesh.num_vertices,))}
  for name, (got, want) in shapes.items():
    if tuple(got) != want:
      raise ValueError(f"{os.path.join(directory, name)} has shape {tuple(got)}, the mesh needs {want}")
  with open(os.path.join(directory, "part_vertices.json")) as f:
    part_vertices = {k: np.asarray(v, np.int32) for k, v in json.load(f).items()}
  return Template(vertices_half, mesh_lib.symmetrize(vertices_half, mesh.num_side), face_parts, vertex_parts,
                  part_vertices, read("uv_part_probs.npy"), meta)
