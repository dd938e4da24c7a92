"""Keypoint-transfer PCK on CUB, UMR's protocol (NVlabs/UMR ``experiments/test_kp.py`` and
``data/cub_kp_transfer.py``).

The benchmark: for random pairs (i, j) of test images, move the 15 ground-truth keypoints of image i
onto image j through the two predictions, and count a transferred keypoint as correct when it lies
within ``alpha · max(bbox side)`` of image j's ground-truth keypoint. UMR scores both directions of
every pair, only keypoints visible in both images, with ``alpha`` = 0.1 and 0.15, and reports the
mean over keypoint types of (correct / visible). This module holds the per-pair steps as pure
functions; drawing the pairs (UMR: ``RandomState(len(test)).choice`` with replacement, 10,000 pairs)
and running the model belong to the evaluation script.

Transfer routes (all coordinates are image coordinates: x right, y down, [-1, 1] over the crop):

* `transfer_keypoints_flow`: UMR's default "flow" mode, through the texture flow. A keypoint picks
  the face whose source flow samples lie closest to it (Gaussian response, σ = 3 px); the face's
  mean target flow is the transferred keypoint.
* `transfer_keypoints`: through the predicted meshes and cameras (both meshes share one vertex
  order). Without ``faces`` it picks the nearest projected source vertex (UMR's "cam" mode, which
  projects the mean shape with both cameras, then moves the result onto the target's predicted
  foreground with `snap_to_mask`); with ``faces`` it picks the front-most surface point under the
  keypoint (`locate_on_surface`), so occluded parts of the mesh are never chosen.

Invisible keypoints (zeroed by the data pipeline) are transferred like any other point; `pck` leaves
them out through its ``visible`` argument.

Scoring (`pck`): keypoints are normalised to [-1, 1] over a square crop of side
``(1 + 2·padding_frac) · max(bbox side)`` (CMR/UMR preprocessing, padding 0.05 at test time), so a
distance d in crop coordinates is ``d · (1 + 2·padding_frac) / 2`` bbox sides. The threshold is
therefore ``alpha · max(bbox side)`` (UMR's ``err_scaling``), not ``alpha`` · image size; with
``padding_frac = 0`` the same formula measures in units of the crop side (image-size normalisation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrecon.geometry import camera


def _squared_distances_2d(p, q):
  """(B, K, 2), (B, N, 2) -> (B, K, N)."""
  diff = p[:, :, None, :] - q[:, None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def nearest_vertex(points, vertices, cam, vertex_mask=None):
  """Index of the projected vertex nearest to each image point (UMR's ``distChamfer`` lookup).

  Args:
    points: (B, K, 2+) image coordinates (a visibility column, if any, is ignored).
    vertices: (B, V, 3) canonical-frame vertices.
    cam: (B, 7) weak-perspective camera.
    vertex_mask: optional (B, V) bool; False vertices are never chosen (e.g. occluded ones).
  Returns:
    (B, K) int32 vertex indices.
  """
  xy, _ = camera.project(jnp.asarray(vertices, jnp.float32), cam)
  d2 = _squared_distances_2d(jnp.asarray(points, jnp.float32)[..., :2], xy)
  if vertex_mask is not None:
    d2 = jnp.where(vertex_mask[:, None, :], d2, jnp.inf)
  return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def locate_on_surface(points, vertices, faces, cam, area_eps: float = 1e-12):
  """The front-most surface point of a mesh under each image point.

  Under the weak-perspective (affine) camera, barycentric coordinates in the image plane are those
  of the 3D surface point, so the point is ``Σ_i w_i X[faces[f, i]]``. Faces are double-sided (any
  winding); of the faces whose projection contains the point, the one with the smallest interpolated
  depth (nearest the camera, `camera.project`'s depth) is taken. A point outside the projected mesh
  falls back to the nearest projected vertex (``hit`` is False there): a face that holds it, with a
  one-hot barycentric.

  Args:
    points: (B, K, 2+) image coordinates.
    vertices: (B, V, 3); faces: (F, 3) int vertex indices; cam: (B, 7).
    area_eps: projected faces with |2·area| below this (edge-on) are skipped.
  Returns:
    face: (B, K) int32; barycentric: (B, K, 3) summing to 1; hit: (B, K) bool.
  """
  points = jnp.asarray(points, jnp.float32)[..., :2]
  faces = jnp.asarray(faces, jnp.int32)
  xy, depth = camera.project(jnp.asarray(vertices, jnp.float32), cam)
  tri = xy[:, faces]                                                      # (B, F, 3, 2)
  tri_depth = depth[:, faces]                                             # (B, F, 3)

  def cross(u, v):
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

  p = points[:, :, None, :]                                               # (B, K, 1, 2)
  v0, v1, v2 = (tri[:, None, :, i, :] for i in range(3))                  # (B, 1, F, 2)
  area = cross(v1 - v0, v2 - v0)                                          # (B, 1, F)
  ok = jnp.abs(area) > area_eps
  safe_area = jnp.where(ok, area, 1.0)
  w0 = cross(v1 - p, v2 - p) / safe_area
  w1 = cross(v2 - p, v0 - p) / safe_area
  bary = jnp.stack([w0, w1, 1.0 - w0 - w1], axis=-1)                      # (B, K, F, 3)
  inside = ok & jnp.all(bary >= -1e-6, axis=-1)
  z = jnp.sum(bary * tri_depth[:, None], axis=-1)
  z = jnp.where(inside, z, jnp.inf)
  hit_face = jnp.argmin(z, axis=-1).astype(jnp.int32)                     # (B, K)
  hit = jnp.any(inside, axis=-1)
  hit_bary = jnp.take_along_axis(bary, hit_face[..., None, None], axis=2)[:, :, 0]

  # Fallback: the nearest projected vertex, as a corner of the first face that uses it.
  vertex = jnp.argmin(_squared_distances_2d(points, xy), axis=-1)         # (B, K)
  uses = faces[None, None] == vertex[..., None, None]                     # (B, K, F, 3)
  fallback_face = jnp.argmax(jnp.any(uses, axis=-1), axis=-1).astype(jnp.int32)
  corner = jnp.argmax(faces[fallback_face] == vertex[..., None], axis=-1)
  fallback_bary = jax.nn.one_hot(corner, 3, dtype=jnp.float32)

  face = jnp.where(hit, hit_face, fallback_face)
  barycentric = jnp.where(hit[..., None], hit_bary, fallback_bary)
  return face, barycentric, hit


def transfer_keypoints(kp_src, verts_src, cam_src, verts_tgt, cam_tgt, faces=None, vertex_mask=None):
  """Move source keypoints to the target image through the two predicted meshes and cameras.

  Each source keypoint is attached to a point of the source mesh, and the same point of the target
  mesh (same vertex order, e.g. the 642-vertex symmetric mesh) is projected with the target camera:

  * ``faces=None``: the nearest projected source vertex (`nearest_vertex`, optionally restricted by
    ``vertex_mask``). With the mean shape passed as both meshes and `snap_to_mask` applied to the
    result, this is UMR's "cam" mode.
  * ``faces`` given: the front-most surface point under the keypoint (`locate_on_surface`), carried
    by its barycentric coordinates; keypoints off the projected mesh fall back to the nearest vertex.

  Args:
    kp_src: (B, K, 2+) source keypoints in image coordinates.
    verts_src, verts_tgt: (B, V, 3) predicted canonical-frame vertices; cam_src, cam_tgt: (B, 7).
    faces: optional (F, 3) int faces of the shared topology.
    vertex_mask: optional (B, V) bool candidate vertices for the ``faces=None`` route.
  Returns:
    (B, K, 2) transferred keypoints in the target's image coordinates.
  """
  verts_tgt = jnp.asarray(verts_tgt, jnp.float32)
  if faces is None:
    index = nearest_vertex(kp_src, verts_src, cam_src, vertex_mask)
    points = jnp.take_along_axis(verts_tgt, index[..., None], axis=1)    # (B, K, 3)
  else:
    face, bary, _ = locate_on_surface(kp_src, verts_src, faces, cam_src)
    corners = jnp.asarray(faces, jnp.int32)[face]                         # (B, K, 3)
    corner_xyz = jax.vmap(lambda v, c: v[c])(verts_tgt, corners)          # (B, K, 3, 3)
    points = jnp.sum(bary[..., None] * corner_xyz, axis=-2)
  xy, _ = camera.project(points, cam_tgt)
  return xy


def transfer_keypoints_flow(kp_src, flow_src, flow_tgt, sigma: float = 3.0, image_size: int = 256):
  """UMR's "flow" keypoint transfer through per-face texture flow (``map_kp_img1_to_img2_flow``).

  The source keypoint becomes a Gaussian heatmap of σ = `sigma` pixels, each face's response is its
  mean over the face's flow samples, and the argmax face's mean *target* flow is the transferred
  keypoint. Two departures from UMR, both only in degenerate cases: the Gaussian is analytic (UMR
  draws it truncated at 3σ, so a keypoint more than 3σ from every sample gives all-zero responses
  and an arbitrary face), evaluated in log space so it never underflows; and the target face's
  location is the plain mean of its flow samples (UMR samples a coordinate grid with zero padding,
  which pulls samples outside [-1, 1] toward 0).

  Args:
    kp_src: (B, K, 2+) source keypoints in image coordinates.
    flow_src, flow_tgt: (B, F, T, 2) per-face texture-flow samples (image coordinates), i.e. the
      UV flow read at each face's texel points (`train`'s per-face flow).
    sigma: heatmap σ in pixels of an `image_size` image (UMR: 3 px at 256).
  Returns:
    (B, K, 2) transferred keypoints in the target's image coordinates.
  """
  kp = jnp.asarray(kp_src, jnp.float32)[..., :2]
  flow_src = jnp.asarray(flow_src, jnp.float32)
  sigma_norm = 2.0 * sigma / image_size                 # pixels -> [-1, 1] units (spacing 2/S)
  diff = flow_src[:, None] - kp[:, :, None, None, :]   # (B, K, F, T, 2)
  log_response = jax.nn.logsumexp(-jnp.sum(diff * diff, axis=-1) / (2.0 * sigma_norm ** 2), axis=-1)
  face = jnp.argmax(log_response, axis=-1)               # (B, K); the 1/T of the mean is constant
  centres = jnp.mean(jnp.asarray(flow_tgt, jnp.float32), axis=2)             # (B, F, 2)
  return jnp.take_along_axis(centres, face[..., None], axis=1)


def pixel_centres(height: int, width: int):
  """(H, W, 2) image coordinates of pixel centres: x = (2c+1−W)/W, y = (2r+1−H)/H (y down).

  The rasterizer's pixel centres (`render.rasterize`) seen in image coordinates.
  """
  x = (2.0 * jnp.arange(width) + 1.0 - width) / width
  y = (2.0 * jnp.arange(height) + 1.0 - height) / height
  return jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)


def snap_to_mask(points, mask, threshold: float = 0.0):
  """Move each point to the nearest foreground pixel centre (UMR's "cam" mode, last step).

  UMR's foreground is ``mask > 0`` of the soft rendered mask (``torch.nonzero``); `threshold`
  generalises it. Where a mask has no foreground the points are returned unchanged.

  Args:
    points: (B, K, 2+) image coordinates.
    mask: (B, H, W) or (B, H, W, 1).
  Returns:
    (B, K, 2).
  """
  mask = jnp.asarray(mask, jnp.float32)
  if mask.ndim == 4:
    mask = mask[..., 0]
  b, h, w = mask.shape
  points = jnp.asarray(points, jnp.float32)[..., :2]
  centres = jnp.broadcast_to(pixel_centres(h, w).reshape(1, h * w, 2), (b, h * w, 2))
  foreground = mask.reshape(b, h * w) > threshold
  d2 = jnp.where(foreground[:, None, :], _squared_distances_2d(points, centres), jnp.inf)
  snapped = jnp.take_along_axis(centres, jnp.argmin(d2, axis=-1)[..., None], axis=1)
  return jnp.where(jnp.any(foreground, axis=-1)[:, None, None], snapped, points)


def pck(pred, target, visible, alpha: float = 0.1, padding_frac: float = 0.05):
  """Correct and scored keypoint counts per keypoint type, UMR's scoring (see the module docstring).

  A keypoint is scored when `visible`, and correct when
  ``|pred − target| · (1 + 2·padding_frac) / 2 < alpha`` (strict), i.e. within
  ``alpha · max(bbox side)`` of the ground truth. Sum the counts over all pairs (both directions),
  then `pck_score`.

  Args:
    pred: (B, K, 2) transferred keypoints; target: (B, K, 2+) ground-truth target keypoints, both in
      the target's crop coordinates.
    visible: (B, K) bool or 0/1: UMR scores keypoints visible in *both* images,
      ``kp_src[..., 2] * kp_tgt[..., 2]``.
    alpha: PCK threshold in bbox sides (UMR: 0.1 and 0.15).
    padding_frac: the crop's padding per side (0.05 at test time in CMR/UMR).
  Returns:
    correct: (K,) int32; total: (K,) int32.
  """
  diff = jnp.asarray(pred, jnp.float32)[..., :2] - jnp.asarray(target, jnp.float32)[..., :2]
  err = jnp.sqrt(jnp.sum(diff * diff, axis=-1)) * ((1.0 + 2.0 * padding_frac) / 2.0)
  visible = jnp.asarray(visible) > 0
  correct = jnp.sum(visible & (err < alpha), axis=0, dtype=jnp.int32)
  return correct, jnp.sum(visible, axis=0, dtype=jnp.int32)


def pck_score(correct, total):
  """Mean over keypoint types of correct / total (UMR's ``(n_correct / n_vis).mean()``).

  A type never scored (total 0) is left out of the mean instead of making it NaN as in UMR.

  Args:
    correct, total: (K,) counts summed over pairs.
  Returns:
    scalar in [0, 1] (NaN only if no type was scored).
  """
  correct = jnp.asarray(correct, jnp.float32)
  total = jnp.asarray(total, jnp.float32)
  scored = total > 0
  per_type = jnp.where(scored, correct / jnp.where(scored, total, 1.0), 0.0)
  return jnp.sum(per_type) / jnp.sum(scored)
