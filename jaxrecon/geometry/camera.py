"""Quaternions, UMR's weak-perspective camera, SoftRas-style look-at/perspective, and the one
conversion from image coordinates to the rasterizer's screen convention.

Conventions (docs/architecture.md repeats them):

* Quaternions are ``[w, x, y, z]`` (scalar first, Hamilton product), acting on column vectors:
  ``R(q) @ p``. `quat_normalize` is guarded, so a zero quaternion gives the identity with a finite
  (zero) gradient instead of NaN.
* A weak-perspective camera is an array ``(..., 7) = [s, tx, ty, qw, qx, qy, qz]`` (UMR's, NVlabs/UMR
  ``nnutils/cub_mesh.py`` ``Camera`` and ``nnutils/geom_utils.py`` ``orthographic_proj_withz``).
  `project` maps a canonical point X to **image coordinates** ``s * (R X)_{xy} + (tx, ty)``: x to the
  right, **y down**, in [-1, 1] over the image — exactly grid_sample's convention and that of the
  normalised keypoints — plus a depth ``s * (R X)_z``.
* The rasterizer (SoftRas's conventions, see `jaxrecon.render.rasterize`) uses **screen coordinates**:
  x right, **y up**, z = positive depth. `image_to_screen` is the only place where one turns into
  the other (y flipped, depth offset, UMR's ``offset_z = 5`` from NVlabs/UMR ``nnutils/smr.py``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_IDENTITY = (1.0, 0.0, 0.0, 0.0)


def quat_normalize(q, eps: float = 1e-12):
  """Unit quaternion; the zero quaternion maps to the identity with a finite gradient.

  Args:
    q: (..., 4) ``[w, x, y, z]``.
  Returns:
    (..., 4).
  """
  n2 = jnp.sum(q * q, axis=-1, keepdims=True)
  ok = n2 > eps
  safe = jnp.where(ok, q, jnp.asarray(_IDENTITY, q.dtype)) / jnp.sqrt(jnp.where(ok, n2, 1.0))
  return jnp.where(ok, safe, jnp.asarray(_IDENTITY, q.dtype))


def quat_conjugate(q):
  """(..., 4) -> (..., 4): the inverse rotation of a unit quaternion."""
  return q * jnp.asarray([1.0, -1.0, -1.0, -1.0], q.dtype)


def quat_multiply(a, b):
  """Hamilton product ``a * b`` (apply b, then a): (..., 4), (..., 4) -> (..., 4)."""
  aw, ax, ay, az = jnp.moveaxis(a, -1, 0)
  bw, bx, by, bz = jnp.moveaxis(b, -1, 0)
  return jnp.stack([
      aw * bw - ax * bx - ay * by - az * bz,
      aw * bx + ax * bw + ay * bz - az * by,
      aw * by - ax * bz + ay * bw + az * bx,
      aw * bz + ax * by - ay * bx + az * bw,
  ], axis=-1)


def quat_from_axis_angle(axis, angle):
  """Rotation by `angle` radians about `axis`: (..., 3), (...) -> (..., 4). The axis is normalised."""
  n2 = jnp.sum(axis * axis, axis=-1, keepdims=True)
  ok = n2 > 1e-24
  unit = jnp.where(ok, axis, 0.0) / jnp.sqrt(jnp.where(ok, n2, 1.0))
  half = 0.5 * jnp.asarray(angle)[..., None]
  return jnp.concatenate([jnp.cos(half), jnp.sin(half) * unit], axis=-1)


def quat_to_matrix(q):
  """Rotation matrix of a (normalised here) quaternion: (..., 4) -> (..., 3, 3)."""
  w, x, y, z = jnp.moveaxis(quat_normalize(q), -1, 0)
  return jnp.stack([
      jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
      jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
      jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
  ], axis=-2)


def view_quaternions(azimuths_deg, elevation_deg=0.0):
  """Camera rotations of views around the object, in the house frame (x forward, y left, z up).

  Azimuth 0 is the canonical side view: object x → image right, z → image up, its right side (−y)
  facing the camera. The object turns by `azimuth` about its up axis, then the camera rises by
  `elevation` (its back shows). (N,) degrees -> (N, 4) quaternions [w, x, y, z].
  """
  az = jnp.deg2rad(jnp.asarray(azimuths_deg, jnp.float32))
  side = quat_from_axis_angle(jnp.array([1.0, 0.0, 0.0]), jnp.pi / 2)      # z up -> image up
  tilt = quat_from_axis_angle(jnp.array([1.0, 0.0, 0.0]), jnp.deg2rad(jnp.float32(elevation_deg)))
  turn = quat_from_axis_angle(jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), az.shape + (3,)), az)
  return quat_multiply(quat_multiply(tilt, side), turn)


def quat_rotate(q, points):
  """Rotate points by q: (..., 4), (..., N, 3) -> (..., N, 3)."""
  return jnp.einsum("...ij,...nj->...ni", quat_to_matrix(q), points)


def mirror_twin(q):
  """The camera rotation whose silhouette of a mirror-symmetric shape (about y = 0) equals `q`'s.

  With M = diag(1, −1, 1) the mirror and Z = diag(1, 1, −1) the depth flip, ``Z R M`` projects the
  mirrored shape (the shape itself) to the same image points with depths negated. Both are −1 times a
  180° turn (M = −R_y(π), Z = −R_z(π)), so the twin is the rotation ``R_z(π) R R_y(π)``; in the
  synthetic generator's angles, (azimuth, elevation) → (−azimuth, −elevation). (..., 4) -> (..., 4).
  """
  qz = jnp.asarray([0.0, 0.0, 0.0, 1.0], jnp.float32)
  qy = jnp.asarray([0.0, 0.0, 1.0, 0.0], jnp.float32)
  return quat_multiply(quat_multiply(qz, quat_normalize(q)), qy)


def flip_horizontal(cams):
  """The camera of the horizontally flipped image of a mirror-symmetric shape: (..., 7) -> (..., 7).

  Flipping the image negates image x: ``F_x (s R X + t)`` with F_x = diag(−1, 1, 1). Since the shape
  is its own mirror image (X ~ M X), this is the shape seen by ``R' = F_x R M``, a rotation
  (F_x = −R_x(π), M = −R_y(π): R' = R_x(π) R R_y(π)), with ``t' = (−tx, ty)`` and the same scale;
  in the synthetic generator's angles, (azimuth, elevation) → (180° − azimuth, elevation). It is an
  involution, and it commutes with `mirror_twin`.
  """
  qx = jnp.asarray([0.0, 1.0, 0.0, 0.0], jnp.float32)
  qy = jnp.asarray([0.0, 0.0, 1.0, 0.0], jnp.float32)
  quat = quat_multiply(quat_multiply(qx, quat_normalize(cams[..., 3:7])), qy)
  return jnp.concatenate([cams[..., 0:1], -cams[..., 1:2], cams[..., 2:3], quat], axis=-1)


def project(points, cam):
  """UMR's weak-perspective (orthographic) projection to image coordinates (Eq. 1's renderer input).

  Args:
    points: (..., N, 3) canonical-frame points.
    cam: (..., 7) ``[s, tx, ty, qw, qx, qy, qz]``.
  Returns:
    xy: (..., N, 2) image coordinates in grid_sample's convention (x right, y down, [-1, 1]).
    depth: (..., N) ``s * (R X)_z``, larger is farther.
  """
  scale, trans, quat = cam[..., 0:1], cam[..., 1:3], cam[..., 3:7]
  rotated = quat_rotate(quat, points)
  xy = scale[..., None, :] * rotated[..., :2] + trans[..., None, :]
  depth = scale * rotated[..., 2]
  return xy, depth


def unproject(xy, depth, cam):
  """Inverse of `project`: (..., N, 2), (..., N), (..., 7) -> (..., N, 3) canonical points."""
  scale, trans, quat = cam[..., 0:1], cam[..., 1:3], cam[..., 3:7]
  rotated = jnp.concatenate([(xy - trans[..., None, :]), depth[..., None]], axis=-1)
  rotated = rotated / scale[..., None, :]
  return quat_rotate(quat_conjugate(quat_normalize(quat)), rotated)


def image_to_screen(xy, depth, depth_offset: float = 5.0):
  """Image coordinates (y down) + depth -> the rasterizer's screen vertices (y up, z > 0).

  This is the only place the two y conventions meet. With UMR's orthographic camera at
  ``offset_z = 5`` the object sits at z ≈ 5 ± s, inside SoftRas's default [near, far] = [1, 100].

  Args:
    xy: (..., N, 2); depth: (..., N).
  Returns:
    (..., N, 3) ``(x, -y, depth + depth_offset)``.
  """
  return jnp.stack([xy[..., 0], -xy[..., 1], depth + depth_offset], axis=-1)


def screen_to_image(screen):
  """Inverse of `image_to_screen` without the depth: (..., N, 3) -> (..., N, 2) y-down coordinates."""
  return jnp.stack([screen[..., 0], -screen[..., 1]], axis=-1)


def project_to_screen(points, cam, depth_offset: float = 5.0):
  """`project` followed by `image_to_screen`: (..., N, 3), (..., 7) -> (..., N, 3)."""
  xy, depth = project(points, cam)
  return image_to_screen(xy, depth, depth_offset)


def look_at(points, eye, at=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)):
  """SoftRas's ``look_at`` transform into camera coordinates (ShichenLiu/SoftRas ``functional/look_at.py``).

  The camera looks along +z from `eye` toward `at`: ``z_axis = normalize(at - eye)``,
  ``x_axis = normalize(cross(up, z_axis))``, ``y_axis = normalize(cross(z_axis, x_axis))``.

  Args:
    points: (..., N, 3); eye, at, up: (..., 3) or 3-sequences.
  Returns:
    (..., N, 3) camera-frame points ``R (p - eye)``.
  """
  eye = jnp.asarray(eye, jnp.float32)
  at = jnp.broadcast_to(jnp.asarray(at, eye.dtype), eye.shape)
  up = jnp.broadcast_to(jnp.asarray(up, eye.dtype), eye.shape)

  def normalize(v):
    n2 = jnp.sum(v * v, axis=-1, keepdims=True)
    return v / jnp.sqrt(jnp.maximum(n2, 1e-10))  # = v / max(|v|, 1e-5), torch's F.normalize.

  z_axis = normalize(at - eye)
  x_axis = normalize(jnp.cross(up, z_axis))
  y_axis = normalize(jnp.cross(z_axis, x_axis))
  rotation = jnp.stack([x_axis, y_axis, z_axis], axis=-2)                 # (..., 3, 3)
  return jnp.einsum("...ij,...nj->...ni", rotation, points - eye[..., None, :])


def perspective(points, angle_degrees: float = 30.0, min_depth: float = 1e-5):
  """SoftRas's perspective divide: ``(x, y, z) -> (x / (z tan a), y / (z tan a), z)``.

  SoftRas divides by z unguarded (ShichenLiu/SoftRas ``functional/perspective.py``); here depth is
  clamped to `min_depth` so points at or behind the camera give large but finite coordinates
  instead of inf/NaN.

  Args:
    points: (..., N, 3) camera-frame points.
  Returns:
    (..., N, 3) screen vertices (x right, y up, z depth) for the rasterizer.
  """
  width = np.tan(np.deg2rad(angle_degrees))
  z = jnp.maximum(points[..., 2], min_depth)
  return jnp.stack([points[..., 0] / (z * width), points[..., 1] / (z * width), points[..., 2]], -1)
