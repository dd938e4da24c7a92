"""Chamfer distance and F-score against scipy's cKDTree; rotations against scipy's Rotation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from jaxrecon.metrics import shape


def _clouds(seed, b=3, n=200, m=150):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, n, 3)).astype(np.float32)
  y = (rng.normal(size=(b, m, 3)) * 0.9 + 0.1).astype(np.float32)
  return x, y


def _kdtree_distances(x, y):
  """Euclidean nearest-neighbour distances x -> y and y -> x for one pair, float64."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  return cKDTree(y).query(x)[0], cKDTree(x).query(y)[0]


def _wxyz_to_scipy(q):
  return Rotation.from_quat(np.asarray(q, np.float64)[..., [1, 2, 3, 0]])


def test_chamfer_matches_kdtree():
  x, y = _clouds(0)
  ours = np.asarray(jax.jit(shape.chamfer_distance)(x, y))
  expected = []
  for xb, yb in zip(x, y):
    dx, dy = _kdtree_distances(xb, yb)
    expected.append(np.mean(dx ** 2) + np.mean(dy ** 2))  # squared, sum of the two directions
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shape.chamfer_distance(x, x), 0.0, atol=1e-7)
  np.testing.assert_allclose(shape.chamfer_distance(x, y), shape.chamfer_distance(y, x), rtol=1e-6)


def test_chamfer_of_a_translated_copy():
  # A single point per set: the chamfer distance is twice the squared offset.
  x = np.zeros((1, 1, 3), np.float32)
  y = np.array([[[0.3, 0.0, 0.4]]], np.float32)
  np.testing.assert_allclose(shape.chamfer_distance(x, y), [2 * 0.25], rtol=1e-6)


@pytest.mark.parametrize("threshold", [0.2, 0.5])
def test_f_score_matches_kdtree(threshold):
  x, y = _clouds(1)
  ours = np.asarray(jax.jit(shape.f_score)(x, y, threshold))
  expected = []
  for xb, yb in zip(x, y):
    dx, dy = _kdtree_distances(xb, yb)
    precision, recall = np.mean(dx < threshold), np.mean(dy < threshold)
    expected.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
  assert 0.05 < np.min(expected) and np.max(expected) < 0.999  # the thresholds are not trivial
  np.testing.assert_allclose(ours, expected, atol=1e-6)
  # A per-shape threshold, and the degenerate ends.
  np.testing.assert_allclose(shape.f_score(x, y, jnp.full((3,), threshold)), expected, atol=1e-6)
  np.testing.assert_allclose(shape.f_score(x, y + 100.0, threshold), 0.0)
  np.testing.assert_allclose(shape.f_score(x, x, threshold), 1.0)


def test_rotation_error_matches_scipy():
  rng = np.random.default_rng(2)
  q1 = rng.normal(size=(64, 4)).astype(np.float32) * rng.uniform(0.5, 2.0, size=(64, 1)).astype(np.float32)
  q2 = rng.normal(size=(64, 4)).astype(np.float32)
  # Small angles too, where acos-based formulas lose precision.
  nearby = _wxyz_to_scipy(q1[:16]) * Rotation.from_rotvec(rng.normal(size=(16, 3)) * 1e-3)
  small = nearby.as_quat()[:, [3, 0, 1, 2]].astype(np.float32)
  q2[:16] = small * np.sign(rng.normal(size=(16, 1))).astype(np.float32)  # random sign flips
  expected = np.degrees((_wxyz_to_scipy(q1).inv() * _wxyz_to_scipy(q2)).magnitude())
  ours = np.asarray(jax.jit(shape.rotation_error_degrees)(q1, q2))
  np.testing.assert_allclose(ours, expected, atol=2e-4)
  assert np.all(expected[:16] < 0.5) and np.all(ours[16:] >= 0) and np.all(ours <= 180.0)
  np.testing.assert_allclose(shape.rotation_error_degrees(q1, -q1), 0.0, atol=2e-4)


def test_align_to_camera_frame_against_scipy_rotation():
  rng = np.random.default_rng(3)
  verts = rng.normal(size=(2, 100, 3)).astype(np.float32) * [1.0, 0.5, 0.3]
  quat = rng.normal(size=(2, 4)).astype(np.float32)
  cam = np.concatenate([rng.uniform(0.5, 1.5, (2, 1)), rng.normal(size=(2, 2)), quat], -1).astype(np.float32)
  rotated = np.stack([_wxyz_to_scipy(q).apply(v.astype(np.float64)) for q, v in zip(quat, verts)])
  centred = rotated - rotated.mean(axis=1, keepdims=True)
  rms = np.sqrt(np.mean(np.sum(centred ** 2, -1), -1))[:, None, None]
  np.testing.assert_allclose(jax.jit(shape.align_to_camera_frame)(verts, cam), centred / rms, atol=1e-5)
  unscaled = shape.align_to_camera_frame(verts, cam, normalize_scale=False)
  np.testing.assert_allclose(unscaled, centred, atol=1e-5)


def test_alignment_removes_exactly_the_weak_perspective_ambiguities():
  """(s, X) and (s/k, k·X + shift) render the same image up to t: the aligned shapes agree."""
  from jaxrecon.geometry import camera  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  verts = rng.normal(size=(1, 80, 3)).astype(np.float32)
  cam = np.array([[0.8, 0.1, -0.2, 0.9, 0.2, -0.3, 0.1]], np.float32)
  k, shift = 2.5, np.array([0.3, -1.0, 2.0], np.float32)
  verts2 = k * verts + shift
  cam2 = cam.copy()
  cam2[0, 0] /= k
  rotated_shift = _wxyz_to_scipy(cam[0, 3:]).apply(shift.astype(np.float64))
  cam2[0, 1:3] -= cam2[0, 0] * rotated_shift[:2]  # t absorbs the image-plane part of the shift
  np.testing.assert_allclose(camera.project(verts2, cam2)[0], camera.project(verts, cam)[0], atol=1e-5)
  a, b = shape.align_to_camera_frame(verts, cam), shape.align_to_camera_frame(verts2, cam2)
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(shape.chamfer_distance(a, b), 0.0, atol=1e-9)
  # A different rotation is *not* absorbed.
  cam3 = cam.copy()
  cam3[0, 3:] = [1.0, 0.0, 0.0, 0.0]
  assert float(shape.chamfer_distance(a, shape.align_to_camera_frame(verts, cam3))[0]) > 0.05


def _true_cameras(n=60, seed=0):
  """Cameras drawn as the synthetic generator draws them, as (N, 4) quaternions."""
  from jaxrecon.data import synthetic
  rng = np.random.default_rng(seed)
  return np.stack([synthetic.sample_camera(rng)[0][3:] for _ in range(n)]).astype(np.float32)


def _change_of_frame(turn_deg, flip):
  """The quaternion of the turn about y, after the 180° turn about x when `flip`."""
  g = Rotation.from_euler("y", turn_deg, degrees=True)
  if flip:
    g = g * Rotation.from_euler("x", 180, degrees=True)
  return g.as_quat()[[3, 0, 1, 2]].astype(np.float32)


@pytest.mark.parametrize("turn_deg,flip", [(0.0, False), (137.25, False), (212.6, True), (359.9, True)])
def test_aligned_camera_error_is_zero_for_true_cameras_in_any_symmetric_frame(turn_deg, flip):
  from jaxrecon.geometry import camera
  q_gt = _true_cameras()
  g = _change_of_frame(turn_deg, flip)
  # A model whose canonical frame is G⁻¹ of the generator's predicts R_gt G⁻¹.
  q_pred = np.asarray(camera.quat_multiply(jnp.asarray(q_gt), camera.quat_conjugate(jnp.asarray(g))))
  raw = np.asarray(shape.rotation_error_degrees(q_pred, q_gt))
  fit = shape.fit_camera_frame(q_pred, q_gt)
  assert float(np.max(fit["errors"])) <= 0.26       # a quarter of the 0.5° grid step, plus rounding
  assert float(np.max(fit["twin_errors"])) <= 0.26
  assert fit["flip"] == flip and abs((fit["turn_deg"] - turn_deg + 180) % 360 - 180) <= 0.25
  if turn_deg or flip:
    assert np.median(raw) > 20                       # the raw error cannot tell this model is right


def test_aligned_camera_error_of_wrong_cameras_is_large():
  q_gt = _true_cameras(seed=1)
  q_random = Rotation.random(len(q_gt), random_state=2).as_quat()[:, [3, 0, 1, 2]].astype(np.float32)
  fit = shape.fit_camera_frame(q_random, q_gt)
  assert np.median(fit["errors"]) > 45 and np.median(fit["twin_errors"]) > 30


def test_mirror_twins_are_the_twin_aware_error():
  from jaxrecon.geometry import camera
  # Every other camera a twin: the aligned error sees it, the twin-aware error does not.
  q_gt = _true_cameras(seed=3)
  q_pred = np.array(q_gt)
  q_pred[::2] = np.asarray(camera.mirror_twin(jnp.asarray(q_gt[::2])))
  fit = shape.fit_camera_frame(q_pred, q_gt)
  assert np.max(fit["twin_errors"]) < 0.3 and np.mean(fit["errors"]) > 20
