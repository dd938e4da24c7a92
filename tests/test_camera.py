"""Quaternions against scipy, projection round trips, the y convention, guarded gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jaxrecon import render
from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh
from jaxrecon.geometry.camera import project_to_screen


def _random_quats(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


def _to_scipy(q):
  q = np.asarray(q, np.float64)
  return Rotation.from_quat(q[..., [1, 2, 3, 0]])  # scipy is scalar-last


def test_quat_to_matrix_matches_scipy():
  q = _random_quats(64)
  np.testing.assert_allclose(camera.quat_to_matrix(jnp.asarray(q)), _to_scipy(q).as_matrix(), atol=1e-5)


def test_quat_rotate_matches_scipy():
  q = _random_quats(8, seed=1)
  points = np.random.default_rng(2).normal(size=(8, 5, 3)).astype(np.float32)
  expected = np.stack([_to_scipy(q[i]).apply(points[i]) for i in range(8)])
  np.testing.assert_allclose(camera.quat_rotate(jnp.asarray(q), jnp.asarray(points)), expected, atol=1e-5)


def test_quat_multiply_composes_like_scipy():
  a, b = _random_quats(16, 3), _random_quats(16, 4)
  an = camera.quat_normalize(jnp.asarray(a))
  bn = camera.quat_normalize(jnp.asarray(b))
  composed = camera.quat_to_matrix(camera.quat_multiply(an, bn))
  np.testing.assert_allclose(composed, (_to_scipy(a) * _to_scipy(b)).as_matrix(), atol=1e-5)
  # q * conj(q) is the identity.
  np.testing.assert_allclose(camera.quat_multiply(an, camera.quat_conjugate(an)),
                             np.tile([1.0, 0, 0, 0], (16, 1)), atol=1e-6)


def test_quat_from_axis_angle_matches_scipy():
  rng = np.random.default_rng(5)
  axis = rng.normal(size=(10, 3)).astype(np.float32)
  angle = rng.uniform(-np.pi, np.pi, size=10).astype(np.float32)
  unit = axis / np.linalg.norm(axis, axis=1, keepdims=True)
  expected = Rotation.from_rotvec(unit * angle[:, None]).as_matrix()
  q = camera.quat_from_axis_angle(jnp.asarray(axis), jnp.asarray(angle))
  np.testing.assert_allclose(camera.quat_to_matrix(q), expected, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(q, axis=-1), 1.0, atol=1e-6)


def test_zero_quaternion_is_identity_with_finite_gradient():
  zero = jnp.zeros((2, 4))
  np.testing.assert_allclose(camera.quat_normalize(zero), [[1, 0, 0, 0]] * 2)
  points = jnp.ones((2, 3, 3))
  g = jax.grad(lambda q: jnp.sum(camera.quat_rotate(q, points) ** 2))(zero)
  assert np.all(np.isfinite(g))
  g = jax.grad(lambda a: jnp.sum(camera.quat_from_axis_angle(a, jnp.ones(2))))(jnp.zeros((2, 3)))
  assert np.all(np.isfinite(g))


def test_project_convention_y_down_and_scale():
  # Identity rotation: image y follows the canonical +y (down in the image), scaled and shifted.
  cam = jnp.array([0.5, 0.1, -0.2, 1.0, 0.0, 0.0, 0.0])
  points = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
  xy, depth = camera.project(points, cam)
  np.testing.assert_allclose(xy, [[0.1, 0.3], [0.6, -0.2], [0.1, -0.2]], atol=1e-6)
  np.testing.assert_allclose(depth, [0.0, 0.0, 1.0], atol=1e-6)
  screen = camera.image_to_screen(xy, depth)
  np.testing.assert_allclose(screen[:, 1], -xy[:, 1])
  np.testing.assert_allclose(screen[:, 2], depth + 5.0)
  np.testing.assert_allclose(camera.screen_to_image(screen), xy)


def test_project_unproject_round_trip_batched():
  rng = np.random.default_rng(7)
  cams = np.concatenate([rng.uniform(0.3, 1.5, (4, 1)), rng.normal(0, 0.2, (4, 2)), _random_quats(4, 8)], 1)
  points = rng.normal(size=(4, 50, 3))
  xy, depth = jax.jit(camera.project)(jnp.asarray(points, jnp.float32), jnp.asarray(cams, jnp.float32))
  back = camera.unproject(xy, depth, jnp.asarray(cams, jnp.float32))
  np.testing.assert_allclose(back, points, atol=2e-5)


def test_look_at_and_perspective_match_softras_formulas():
  eye = np.array([0.0, 0.0, -2.732])
  points = np.random.default_rng(9).normal(0, 0.3, (1, 20, 3))
  cam_points = camera.look_at(jnp.asarray(points, jnp.float32), jnp.asarray(eye[None], jnp.float32))
  # Looking at the origin from -z with up +y is a pure translation (UMR's eye, NVlabs/UMR nnutils/smr.py).
  np.testing.assert_allclose(cam_points, points - eye, atol=1e-5)
  screen = camera.perspective(cam_points, angle_degrees=30.0)
  width = np.tan(np.deg2rad(30.0))
  expected = (points - eye)[..., :2] / ((points - eye)[..., 2:] * width)
  np.testing.assert_allclose(screen[..., :2], expected, rtol=1e-5)
  # A general eye: the rotation is orthonormal and maps (at - eye) onto +z.
  eye2 = jnp.array([[1.0, 2.0, -3.0]])
  p = camera.look_at(jnp.zeros((1, 1, 3)), eye2)
  np.testing.assert_allclose(p[0, 0], [0, 0, np.linalg.norm([1.0, 2.0, -3.0])], atol=1e-5)


def test_perspective_behind_camera_is_finite():
  pts = jnp.array([[[0.1, 0.2, 0.0], [0.1, 0.2, -1.0]]])
  assert np.all(np.isfinite(camera.perspective(pts)))
  g = jax.grad(lambda p: jnp.sum(camera.perspective(p)))(pts)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("quat", [[0.0, 0.0, 0.0, 0.0], [1e-8, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
def test_projection_gradients_finite(quat):
  cam = jnp.array([0.7, 0.0, 0.0, *quat])
  points = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]])  # poles and centre
  g_cam, g_pts = jax.grad(lambda c, p: jnp.sum(camera.project(p, c)[0] ** 2), argnums=(0, 1))(cam, points)
  assert np.all(np.isfinite(g_cam)) and np.all(np.isfinite(g_pts))


def test_view_quaternions_match_the_synthetic_cameras():
  from jaxrecon.data import synthetic  # pylint: disable=g-import-not-at-top
  azimuths, elevation = np.array([0.0, 45.0, 180.0, 270.0]), 12.0
  q = np.asarray(camera.view_quaternions(azimuths, elevation))
  for a, qa in zip(azimuths, q):
    expected = synthetic.camera_from_angles(a, elevation, 1.0, (0.0, 0.0))[3:]
    np.testing.assert_allclose(np.abs(qa @ expected), 1.0, atol=1e-6)   # same rotation (q ~ -q)
  # The side view: the object's up axis points up in the image (image y is down).
  side = camera.view_quaternions(np.zeros(1))[0]
  xy, _ = camera.project(jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), jnp.concatenate([jnp.array([1.0, 0, 0]), side]))
  np.testing.assert_allclose(np.asarray(xy), [[0.0, -1.0], [1.0, 0.0]], atol=1e-6)


@pytest.mark.parametrize("az,el", [(20.0, 10.0), (170.0, -5.0), (60.0, 30.0), (-100.0, 45.0)])
def test_mirror_twin_and_horizontal_flip_in_the_generator_angles(az, el):
  """twin: (azimuth, elevation) -> (-azimuth, -elevation); flip: -> (180 - azimuth, elevation)."""
  from jaxrecon.data import synthetic
  from jaxrecon.metrics import shape
  cam = jnp.asarray(synthetic.camera_from_angles(az, el, 0.8, (0.1, -0.2)), jnp.float32)
  twin = synthetic.camera_from_angles(-az, -el, 0.8, (0.1, -0.2))
  flipped = synthetic.camera_from_angles(180.0 - az, el, 0.8, (-0.1, -0.2))
  assert float(shape.rotation_error_degrees(camera.mirror_twin(cam[3:]), twin[3:])) < 1e-3
  got = camera.flip_horizontal(cam)
  assert float(shape.rotation_error_degrees(got[3:], flipped[3:])) < 1e-3
  np.testing.assert_allclose(got[:3], flipped[:3], atol=1e-6)
  np.testing.assert_allclose(camera.flip_horizontal(got), cam, atol=1e-6)       # an involution
  both = camera.flip_horizontal(cam.at[3:].set(camera.mirror_twin(cam[3:])))[3:]
  assert float(shape.rotation_error_degrees(both, camera.mirror_twin(got[3:]))) < 1e-3   # they commute


def _birds_and_cameras(n=4, subdivisions=2):
  from jaxrecon.data import synthetic
  sphere = mesh.symmetric_sphere(subdivisions)
  rng = np.random.default_rng(0)
  vertices = np.stack([synthetic.bird_vertices(synthetic.sample_bird(rng), sphere) for _ in range(n)])
  cams = np.stack([synthetic.sample_camera(rng)[0] for _ in range(n)]).astype(np.float32)
  cams[:, 0] = 0.9 / np.abs(vertices).max((1, 2))      # in frame
  cams[:, 1:3] = rng.uniform(-0.1, 0.1, (n, 2))
  return sphere, jnp.asarray(vertices, jnp.float32), jnp.asarray(cams)


def _silhouettes(sphere, vertices, cams, size=32):
  screen = project_to_screen(vertices, cams)
  return render.soft_rasterize(mesh.face_vertices(screen, jnp.asarray(sphere.faces)), None, image_size=size,
                               sigma=1e-4, dist_eps=1e-10)[..., 3]


def test_mirror_twins_render_identical_silhouettes():
  """The ambiguity is real: a mirror-symmetric bird seen from a camera and from its twin; the bird
  turned by 180° about its up axis is not a twin (its silhouette differs)."""
  sphere, vertices, cams = _birds_and_cameras()
  alpha = _silhouettes(sphere, vertices, cams)
  twin = _silhouettes(sphere, vertices, cams.at[:, 3:].set(camera.mirror_twin(cams[:, 3:])))
  assert float(alpha.mean()) > 0.1
  np.testing.assert_allclose(twin, alpha, atol=1e-5)
  turned = cams.at[:, 3:].set(camera.quat_multiply(cams[:, 3:], jnp.asarray([0.0, 0.0, 0.0, 1.0])))
  assert float(jnp.abs(_silhouettes(sphere, vertices, turned) - alpha).mean()) > 0.02


def test_flipped_camera_renders_the_flipped_silhouette():
  sphere, vertices, cams = _birds_and_cameras()
  alpha = _silhouettes(sphere, vertices, cams)
  flipped = _silhouettes(sphere, vertices, camera.flip_horizontal(cams))
  np.testing.assert_allclose(flipped, alpha[:, :, ::-1], atol=1e-5)
