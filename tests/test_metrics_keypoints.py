"""Keypoint transfer and PCK against constructed truths, a ray caster, cKDTree and UMR's scoring."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from jaxrecon.geometry import mesh
from jaxrecon.metrics import keypoints

_SPHERE_VERTS, _SPHERE_FACES = mesh.icosphere(3)  # 642 vertices, 1280 faces
_transfer = jax.jit(keypoints.transfer_keypoints)  # one compilation instead of one per eager op


def _rotation(q):
  return Rotation.from_quat(np.asarray(q, np.float64)[[1, 2, 3, 0]])


def _project_np(points, cam):
  """Weak perspective from scipy's rotation: s·(R X)_xy + t, float64."""
  return cam[0] * _rotation(cam[3:]).apply(points)[..., :2] + cam[1:3]


def _umr_scores(pred, gt, vis, alpha, padding_frac):
  """UMR test_kp.py's scoring, restated in NumPy: per-type correct/visible, then the mean."""
  err = np.sqrt(np.sum((pred - gt) ** 2, axis=2)) * (1 + 2 * padding_frac) / 2.0
  n_vis = np.sum(vis, axis=0)
  n_correct = np.sum((err < alpha) * vis, axis=0)
  return n_correct, n_vis, (n_correct / n_vis).mean()


def _ray_cast_front(vertices, faces, origin, direction):
  """Möller–Trumbore against every face (double-sided); the nearest hit point along +direction."""
  v0, v1, v2 = (vertices[faces[:, i]] for i in range(3))
  e1, e2 = v1 - v0, v2 - v0
  p = np.cross(direction, e2)
  det = np.einsum("fi,fi->f", e1, p)
  ok = np.abs(det) > 1e-12
  inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
  s = origin - v0
  u = np.einsum("fi,fi->f", s, p) * inv
  q = np.cross(s, e1)
  v = (q @ direction) * inv
  t = np.einsum("fi,fi->f", e2, q) * inv
  hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
  assert hit.any()
  return origin + np.min(np.where(hit, t, np.inf)) * direction


def test_pck_matches_umr_scoring():
  rng = np.random.default_rng(0)
  gt = rng.uniform(-1, 1, size=(200, 15, 2)).astype(np.float32)
  pred = (gt + rng.normal(scale=0.15, size=gt.shape)).astype(np.float32)
  vis = (rng.random((200, 15)) < 0.7).astype(np.float32)
  for alpha in (0.1, 0.15):
    correct, total = jax.jit(keypoints.pck, static_argnames="alpha")(pred, gt, vis, alpha=alpha)
    n_correct, n_vis, expected = _umr_scores(pred, gt, vis, alpha, 0.05)
    np.testing.assert_array_equal(correct, n_correct)
    np.testing.assert_array_equal(total, n_vis)
    assert 0.2 < expected < 0.9
    np.testing.assert_allclose(keypoints.pck_score(correct, total), expected, rtol=1e-6)


def test_pck_threshold_is_alpha_bbox_sides():
  # Crop coordinates span (1 + 2·0.05)·bbox over 2 units: an offset d is d·0.55 bbox sides.
  gt = np.zeros((1, 4, 2), np.float32)
  d = np.array([0.17, 0.18, 0.183, 0.3], np.float32)  # 0.1 / 0.55 = 0.1818
  pred = np.stack([d, np.zeros_like(d)], -1)[None]
  correct, total = keypoints.pck(pred, gt, np.ones((1, 4)), alpha=0.1)
  np.testing.assert_array_equal(correct, [1, 1, 0, 0])
  np.testing.assert_array_equal(total, [1, 1, 1, 1])
  # padding_frac = 0 measures in crop sides (the crop spans 2 units): d / 2 < alpha.
  correct, _ = keypoints.pck(pred, gt, np.ones((1, 4)), alpha=0.1, padding_frac=0.0)
  np.testing.assert_array_equal(correct, [1, 1, 1, 0])
  # Types never scored are left out of the mean.
  np.testing.assert_allclose(keypoints.pck_score(np.array([2, 0, 1]), np.array([4, 0, 1])), 0.75)


def _sphere_batch(cams):
  cams = np.asarray(cams, np.float32)
  verts = np.broadcast_to(_SPHERE_VERTS.astype(np.float32), (len(cams),) + _SPHERE_VERTS.shape)
  return verts, cams


def test_identity_transfer_gives_pck_one():
  verts, cams = _sphere_batch([[0.7, 0.1, -0.05, 0.9, 0.3, -0.2, 0.1], [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
  rng = np.random.default_rng(1)
  # Vertex route: keypoints that are projected vertices come back exactly.
  index = rng.integers(0, len(_SPHERE_VERTS), size=(2, 15))
  kp = np.stack([_project_np(_SPHERE_VERTS[i], c) for i, c in zip(index, cams)]).astype(np.float32)
  out = _transfer(kp, verts, cams, verts, cams)
  np.testing.assert_allclose(out, kp, atol=1e-6)
  # Surface route: any point on the silhouette comes back (its barycentric point).
  radius = 0.9 * cams[:, :1, None] * np.sqrt(rng.random((2, 15, 1)))
  angle = rng.uniform(0, 2 * np.pi, (2, 15, 1))
  kp = (cams[:, None, 1:3] + radius * np.concatenate([np.cos(angle), np.sin(angle)], -1)).astype(np.float32)
  out = _transfer(kp, verts, cams, verts, cams, faces=_SPHERE_FACES)
  np.testing.assert_allclose(out, kp, atol=1e-5)
  correct, total = keypoints.pck(out, kp, np.ones((2, 15)), alpha=0.01)
  np.testing.assert_array_equal(correct, total)
  assert float(keypoints.pck_score(correct, total)) == 1.0


def test_shifted_target_camera_gives_the_computable_fraction():
  base = [0.8, 0.0, 0.0, 0.95, 0.1, 0.25, 0.0]
  shifts = [0.05, 0.15, 0.2, 0.3]  # 0.1 bbox sides = 0.1818 crop units: the first two pass
  src_verts, src_cams = _sphere_batch([base] * 4)
  tgt_cams = src_cams.copy()
  tgt_cams[:, 1] += shifts
  rng = np.random.default_rng(2)
  index = rng.integers(0, len(_SPHERE_VERTS), size=(4, 15))
  kp = np.stack([_project_np(_SPHERE_VERTS[i], c) for i, c in zip(index, src_cams)]).astype(np.float32)
  for faces in (None, _SPHERE_FACES):
    out = np.asarray(_transfer(kp, src_verts, src_cams, src_verts, tgt_cams, faces=faces))
    np.testing.assert_allclose(out - kp, np.broadcast_to(np.array(shifts)[:, None, None] * [1, 0], kp.shape),
                               atol=1e-5)
    correct, total = keypoints.pck(out, kp, np.ones((4, 15)), alpha=0.1)
    assert float(keypoints.pck_score(correct, total)) == 0.5


def test_surface_transfer_matches_ray_casting():
  rng = np.random.default_rng(3)
  # A squashed, shifted sphere so that the shape is not rotation invariant.
  shape_verts = (_SPHERE_VERTS * [1.0, 0.6, 0.4] + [0.1, 0.0, 0.05]).astype(np.float32)
  cam_src = np.array([0.8, 0.05, -0.1, *Rotation.random(random_state=3).as_quat()[[3, 0, 1, 2]]], np.float32)
  cam_tgt = np.array([0.6, -0.2, 0.1, *Rotation.random(random_state=4).as_quat()[[3, 0, 1, 2]]], np.float32)
  # Projected vertices pulled toward the projected centre: strictly inside the convex silhouette.
  on_mesh = _project_np(shape_verts[rng.integers(0, len(shape_verts), 15)], cam_src)
  centre = _project_np(np.array([0.1, 0.0, 0.05]), cam_src)
  kp = (centre + rng.uniform(0.2, 0.95, (15, 1)) * (on_mesh - centre)).astype(np.float32)
  rot = _rotation(cam_src[3:])
  expected = []
  for p in kp.astype(np.float64):
    # The camera ray through p, in the canonical frame; the first hit is the visible surface point.
    origin = rot.inv().apply(np.array([*(p - cam_src[1:3]) / cam_src[0], -10.0]))
    direction = rot.inv().apply(np.array([0.0, 0.0, 1.0]))
    hit = _ray_cast_front(shape_verts.astype(np.float64), _SPHERE_FACES, origin, direction)
    expected.append(_project_np(hit, cam_tgt.astype(np.float64)))
  out = _transfer(kp[None], shape_verts[None], cam_src[None], shape_verts[None],
                                     cam_tgt[None], faces=_SPHERE_FACES)
  np.testing.assert_allclose(out[0], np.array(expected), atol=1e-4)
  _, _, hit = keypoints.locate_on_surface(kp[None], shape_verts[None], _SPHERE_FACES, cam_src[None])
  assert bool(jnp.all(hit))


def test_nearest_vertex_with_mask_matches_kdtree():
  rng = np.random.default_rng(5)
  verts, cams = _sphere_batch([[0.9, 0.0, 0.1, 0.8, -0.3, 0.4, 0.2]])
  kp = rng.uniform(-1, 1, size=(1, 15, 2)).astype(np.float32)
  projected = _project_np(_SPHERE_VERTS, cams[0].astype(np.float64))
  depth = _rotation(cams[0, 3:]).apply(_SPHERE_VERTS)[:, 2]
  front = depth < 0  # nearer half (depth grows away from the camera)
  for vertex_mask, allowed in ((None, np.arange(len(projected))), (front[None], np.flatnonzero(front))):
    index = keypoints.nearest_vertex(kp, verts, cams, vertex_mask)
    np.testing.assert_array_equal(index[0], allowed[cKDTree(projected[allowed]).query(kp[0])[1]])


def test_off_mesh_keypoints_fall_back_to_the_nearest_vertex():
  verts, cams = _sphere_batch([[0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
  kp = np.array([[[0.9, 0.0], [0.0, -0.95]]], np.float32)  # outside the radius-0.5 disc
  face, bary, hit = keypoints.locate_on_surface(kp, verts, _SPHERE_FACES, cams)
  assert not bool(jnp.any(hit))
  vertex = np.asarray(keypoints.nearest_vertex(kp, verts, cams))[0]
  points = np.einsum("kc,kcd->kd", np.asarray(bary[0]), _SPHERE_VERTS[_SPHERE_FACES[np.asarray(face[0])]])
  np.testing.assert_allclose(points, _SPHERE_VERTS[vertex], atol=1e-6)


def test_flow_transfer_picks_the_face_under_the_keypoint():
  rng = np.random.default_rng(6)
  # 8×8 faces on a grid 16 px apart at 256 px; each face's 9 flow samples within ±1 px of its centre.
  grid = (np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1).reshape(64, 2) * 16 + 64) / 128.0 - 1.0
  flow_src = grid[:, None] + rng.uniform(-1, 1, (64, 9, 2)) / 128.0
  flow_tgt = rng.uniform(-0.9, 0.9, (64, 1, 2)) + rng.uniform(-0.05, 0.05, (64, 9, 2))
  chosen = rng.integers(0, 64, 15)
  kp = grid[chosen] + rng.uniform(-3, 3, (15, 2)) / 128.0  # within 3 px of the face, 13 px from others
  kp[0] = grid[0] - 60 / 128.0  # 60 px beyond the first face: a truncated heatmap would be all zero
  chosen[0] = 0
  f32 = lambda x: x[None].astype(np.float32)
  out = jax.jit(keypoints.transfer_keypoints_flow)(f32(kp), f32(flow_src), f32(flow_tgt))
  np.testing.assert_allclose(out[0], flow_tgt[chosen].mean(axis=1), atol=1e-6)


def test_snap_to_mask_matches_kdtree_over_foreground_pixels():
  rng = np.random.default_rng(7)
  h, w = 24, 32
  mask = np.zeros((2, h, w, 1), np.float32)
  mask[0, 5:12, 20:30] = 0.3
  mask[0, 15, 3] = 1.0
  rows, cols = np.nonzero(mask[0, ..., 0])
  centres = np.stack([(2 * cols + 1 - w) / w, (2 * rows + 1 - h) / h], -1)  # x right, y down
  points = rng.uniform(-1.2, 1.2, size=(2, 10, 2)).astype(np.float32)
  out = np.asarray(jax.jit(keypoints.snap_to_mask)(points, mask))
  np.testing.assert_allclose(out[0], centres[cKDTree(centres).query(points[0])[1]], atol=1e-6)
  np.testing.assert_allclose(out[1], points[1])  # empty mask: unchanged
  # A higher threshold drops the 0.3 block, leaving the single pixel.
  out = np.asarray(keypoints.snap_to_mask(points, mask, threshold=0.5))
  np.testing.assert_allclose(out[0], np.broadcast_to([(2 * 3 + 1 - w) / w, (2 * 15 + 1 - h) / h], (10, 2)),
                             atol=1e-6)
