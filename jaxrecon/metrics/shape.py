"""3D metrics for synthetic data, where ground-truth shapes and cameras exist.

* `chamfer_distance` and `f_score` compare point sets (mesh vertices, or points sampled on surfaces).
* `align_to_camera_frame` puts a predicted and a ground-truth shape into a common frame before they
  are compared: each is rotated into its own camera's view frame, then centred and scaled to unit RMS
  radius (the reasoning is in its docstring).
* `rotation_error_degrees` is the geodesic angle between predicted and true camera rotations.

All functions are pure ``jnp`` and jit-able. Nearest neighbours are found by brute force: the
``(B, N, M)`` matrix of squared distances is formed, which is cheap for meshes of a few thousand
vertices (642 × 642 here) and exact (differences, not ``|x|² + |y|² − 2x·y``, so no cancellation).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrecon.geometry import camera


def _squared_distances(x, y):
  """(B, N, 3), (B, M, 3) -> (B, N, M) squared Euclidean distances."""
  diff = x[:, :, None, :] - y[:, None, :, :]
  return jnp.sum(diff * diff, axis=-1)


def nearest_squared_distances(x, y):
  """Squared distance from each point to the nearest point of the other set.

  Args:
    x: (B, N, 3); y: (B, M, 3).
  Returns:
    x_to_y: (B, N) ``min_j |x_i − y_j|²``; y_to_x: (B, M) ``min_i |x_i − y_j|²``.
  """
  d2 = _squared_distances(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  return jnp.min(d2, axis=2), jnp.min(d2, axis=1)


def chamfer_distance(x, y):
  """Symmetric Chamfer distance with **squared** distances (PyTorch3D's and CMR's convention).

  ``mean_i min_j |x_i − y_j|² + mean_j min_i |x_i − y_j|²``: the *sum* of the two directional means
  (not their average), in squared units of the input (take the square root yourself for a length).

  Args:
    x: (B, N, 3); y: (B, M, 3).
  Returns:
    (B,).
  """
  x_to_y, y_to_x = nearest_squared_distances(x, y)
  return jnp.mean(x_to_y, axis=1) + jnp.mean(y_to_x, axis=1)


def f_score(pred, gt, threshold):
  """F-score at a distance threshold (Tatarchenko et al., CVPR'19), per shape.

  precision = fraction of `pred` points whose nearest `gt` point is closer than `threshold`
  (a Euclidean distance, not squared; strict ``<``); recall = the same from `gt` to `pred`;
  ``F = 2PR / (P + R)``, and 0 where P + R = 0.

  Args:
    pred: (B, N, 3); gt: (B, M, 3); threshold: scalar or (B,) distance.
  Returns:
    (B,) in [0, 1].
  """
  pred_to_gt, gt_to_pred = nearest_squared_distances(pred, gt)
  t2 = jnp.square(jnp.asarray(threshold, jnp.float32))
  t2 = t2[..., None] if t2.ndim else t2
  precision = jnp.mean((pred_to_gt < t2).astype(jnp.float32), axis=1)
  recall = jnp.mean((gt_to_pred < t2).astype(jnp.float32), axis=1)
  total = precision + recall
  return jnp.where(total > 0, 2 * precision * recall / jnp.where(total > 0, total, 1.0), 0.0)


def align_to_camera_frame(vertices, cam, normalize_scale: bool = True, eps: float = 1e-12):
  """A shape in its camera's view frame, centred and (by default) scaled to unit RMS radius.

  The comparison frame for predicted vs ground-truth shapes on synthetic data: call it once with the
  predicted vertices and camera and once with the true ones, then compare the results (e.g. with
  `chamfer_distance`). Steps:

  1. Rotate by the camera's quaternion, ``R(q) X`` (`camera.quat_rotate`, the rotation inside
     `camera.project`), without the scale `s` or the translation `t`. A single image determines the
     shape as seen from its camera: a prediction whose canonical shape is rotated and whose camera
     rotation compensates renders the same image and gets the same view-frame shape, so such a pose
     change is not counted as a shape error; the view-frame depth is compared as part of the shape.
  2. Subtract the centroid (the unweighted mean of the points). Under weak perspective the depth
     offset is unobservable and the image-plane offset belongs to ``t``.
  3. Divide by the RMS radius ``sqrt(mean |X − c|²)`` (skipped with ``normalize_scale=False``). Under
     weak perspective ``(s, X)`` and ``(s/k, k X)`` render the same image, so the absolute size of a
     predicted shape is a gauge, not a prediction; normalising removes it. The RMS radius is used
     rather than the bounding box because it depends on every point (stable under outliers).

  Args:
    vertices: (B, N, 3) canonical-frame points.
    cam: (B, 7) ``[s, tx, ty, qw, qx, qy, qz]``; only the quaternion is used.
    normalize_scale: divide by the RMS radius (True) or keep the canonical scale (False).
    eps: a shape whose RMS radius is below sqrt(eps) (a single point) is only centred.
  Returns:
    (B, N, 3) view-frame points with zero mean (and unit RMS radius).
  """
  rotated = camera.quat_rotate(cam[..., 3:7], jnp.asarray(vertices, jnp.float32))
  centred = rotated - jnp.mean(rotated, axis=-2, keepdims=True)
  if not normalize_scale:
    return centred
  ms = jnp.mean(jnp.sum(centred * centred, axis=-1), axis=-1)[..., None, None]
  return centred / jnp.sqrt(jnp.maximum(ms, eps))


def rotation_error_degrees(q_pred, q_gt):
  """Geodesic angle between two rotations given as quaternions, in degrees (UCMR's rotation error).

  The angle of ``R_pred⁻¹ R_gt``: ``2·atan2(|v|, |w|)`` for ``(w, v) = q_pred* ⊗ q_gt`` after
  normalising both, which is invariant to the sign of either quaternion (q and −q are one rotation)
  and, unlike ``2·acos|⟨q_pred, q_gt⟩|``, accurate for small angles.

  Args:
    q_pred, q_gt: (..., 4) ``[w, x, y, z]``, any norm (zero maps to the identity).
  Returns:
    (...,) in [0, 180].
  """
  rel = camera.quat_multiply(camera.quat_conjugate(camera.quat_normalize(q_pred)),
                             camera.quat_normalize(q_gt))
  sin_half = jnp.linalg.norm(rel[..., 1:], axis=-1)
  return jnp.degrees(2.0 * jnp.arctan2(sin_half, jnp.abs(rel[..., 0])))


def normalize_shape(points, eps: float = 1e-12):
  """Centre (B, N, 3) point sets at their mean and scale them to unit RMS radius (weak-perspective
  shapes are only defined up to scale and translation)."""
  centred = points - jnp.mean(points, axis=-2, keepdims=True)
  rms = jnp.sqrt(jnp.mean(jnp.sum(centred**2, -1), -1) + eps)
  return centred / rms[..., None, None]


def symmetric_frame_chamfer(pred, target, num_angles: int = 360):
  """Chamfer distance between two mirror-symmetric shapes (N, 3), (M, 3) whose canonical frames may
  differ: both normalised (`normalize_shape`), then `pred` turned about the mirror-plane normal (y)
  by the best of `num_angles` evenly spaced angles, with or without the mirror x → −x. These are the
  changes of frame that keep the plane y = 0, which is all two unsupervised symmetric frames share.

  Returns:
    (chamfer (the minimum, squared units of the unit-RMS shapes), the aligned `pred` (N, 3)).
  """
  p, t = normalize_shape(jnp.asarray(pred)[None])[0], normalize_shape(jnp.asarray(target)[None])[0]
  angles = jnp.arange(num_angles) * (2 * jnp.pi / num_angles)
  c, s = jnp.cos(angles), jnp.sin(angles)
  zero, one = jnp.zeros_like(c), jnp.ones_like(c)
  turns = jnp.stack([jnp.stack([c, zero, s], -1), jnp.stack([zero, one, zero], -1),
                     jnp.stack([-s, zero, c], -1)], -2)                       # (A, 3, 3) about y
  mirror = jnp.diag(jnp.array([-1.0, 1.0, 1.0]))
  frames = jnp.concatenate([turns, turns @ mirror], 0)                      # (2A, 3, 3)
  candidates = jnp.einsum("aij,nj->ani", frames, p)
  scores = chamfer_distance(candidates, jnp.broadcast_to(t, (frames.shape[0],) + t.shape))
  best = jnp.argmin(scores)
  return scores[best], candidates[best]


# ----------------------------------------------------------------------------------------------
# Camera error between two mirror-symmetric canonical frames
# ----------------------------------------------------------------------------------------------
#
# A network that learns a symmetric shape without 3D supervision fixes its canonical frame only up
# to the changes of frame that keep the mirror plane y = 0: a turn G about the plane's normal (y),
# possibly after the 180° turn about x (y → −y). If the prediction is right, its view-frame shape
# R_p X_p equals the truth's R_gt X_gt with X_p = G X_gt, i.e. R_p G = R_gt for ONE G for the whole
# split. Comparing raw rotations cannot tell a reconstruction from noise (uniformly random rotations
# are 126° off on average); the aligned error fits G once per model and split.


def plane_preserving_frames(num_angles: int = 720):
  """Candidate changes of frame G as quaternions: turns about y by ``k·360°/num_angles`` (first
  `num_angles` rows), then the same turns after the 180° turn about x. Returns (2A, 4)."""
  angles = jnp.arange(num_angles) * (2 * jnp.pi / num_angles)
  turns = camera.quat_from_axis_angle(jnp.broadcast_to(jnp.array([0.0, 1.0, 0.0]), (num_angles, 3)), angles)
  flip = jnp.array([0.0, 1.0, 0.0, 0.0])                                   # 180° about x
  return jnp.concatenate([turns, camera.quat_multiply(turns, flip)], 0)


def fit_camera_frame(q_pred, q_gt, num_angles: int = 720):
  """The change of frame G (`plane_preserving_frames`) that best aligns predicted to true cameras.

  Minimises the mean over images of ``rotation_error_degrees(q_pred ⊗ G, q_gt)`` (a robust L1 of
  angles; one G for the whole set). The grid step is ``360°/num_angles`` (0.5° by default), so the
  fitted error is within a quarter step of the continuous optimum's for each image. The twin-aware
  errors (a camera or its `camera.mirror_twin` counts as right: what silhouettes alone can decide) are
  fitted the same way with their own G, so a model that consistently predicts twins scores 0 there.

  Args:
    q_pred, q_gt: (N, 4) quaternions of the predicted and true cameras.
  Returns:
    dict: ``frame`` (4,) the quaternion G, ``turn_deg`` its turn about y in [0, 360), ``flip`` whether
    it includes the 180° turn about x, ``errors`` (N,) the aligned errors in degrees and
    ``twin_errors`` (N,) the twin-aware errors (after their own change of frame).
  """
  frames = plane_preserving_frames(num_angles)
  q_pred = camera.quat_normalize(jnp.asarray(q_pred, jnp.float32))
  q_gt = jnp.asarray(q_gt, jnp.float32)
  aligned = camera.quat_multiply(q_pred[None], frames[:, None])           # (2A, N, 4)
  errors = rotation_error_degrees(aligned, q_gt[None])                    # (2A, N)
  twin = jnp.minimum(errors, rotation_error_degrees(aligned, camera.mirror_twin(q_gt)[None]))
  best = int(jnp.argmin(jnp.mean(errors, axis=1)))
  best_twin = int(jnp.argmin(jnp.mean(twin, axis=1)))
  return {"frame": frames[best], "turn_deg": float(360.0 * (best % num_angles) / num_angles),
          "flip": bool(best >= num_angles), "errors": errors[best], "twin_errors": twin[best_twin]}
