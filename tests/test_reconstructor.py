"""The reconstruction network: shapes, symmetry, initial state, and UMR's sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon.models import reconstructor


def _tiny(sphere, **kw):
  return reconstructor.Reconstructor(
      template_half=sphere.half(sphere.vertices), image_size=64, feature_dim=16, encoder_conv_channels=8,
      resnet_widths=(4, 4, 8, 8), num_hypotheses=3, camera_width=8, flow_base_channels=8, flow_stages=2,
      variance_base_channels=8, variance_stages=1, num_side=sphere.num_side, **kw)


def test_tiny_network_outputs():
  sphere = mesh_lib.symmetric_sphere()
  model = _tiny(sphere)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), images)
  pred, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
  assert "batch_stats" in updates
  assert pred.vertices.shape == (2, 642, 3)
  np.testing.assert_allclose(pred.vertices[:, sphere.vertex_mirror] * jnp.array([1, -1, 1]),
                             pred.vertices.at[:, :32, 1].multiply(-1), atol=1e-6)
  # D_shape starts near zero offsets: the prediction is the template.
  assert float(jnp.abs(pred.half_offsets).max()) < 0.05
  assert pred.cam_hypotheses.shape == (2, 3, 7)
  np.testing.assert_allclose(jnp.linalg.norm(pred.cam_hypotheses[..., 3:], axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(pred.cam_probs.sum(-1), 1.0, atol=1e-6)
  assert np.all(pred.cam_hypotheses[..., 0] > 0)
  assert pred.uv_flow.shape == (2, 16, 32, 2) and float(jnp.abs(pred.uv_flow).max()) <= 1.0
  np.testing.assert_array_equal(pred.variance, 1.0)          # D_var starts as plain sampling
  assert pred.variance.shape == (2, 64, 64, 1)
  no_var = _tiny(sphere, use_variance=False)
  assert jax.eval_shape(lambda v, x: no_var.apply(v, x), variables, images).variance is None
  # The cameras-only path is D_cam of the same parameters.
  hypotheses, probs = jax.jit(lambda v, x: model.apply(v, x, train=False, cameras_only=True))(variables, images)
  full = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  np.testing.assert_allclose(hypotheses, full.cam_hypotheses, atol=1e-6)
  np.testing.assert_allclose(probs, full.cam_probs, atol=1e-6)


def test_umr_sizes():
  sphere = mesh_lib.symmetric_sphere()
  model = reconstructor.Reconstructor(template_half=sphere.half(sphere.vertices))
  images = jnp.zeros((1, 256, 256, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  out = jax.eval_shape(lambda v: model.apply(v, images), shapes)
  assert out.uv_flow.shape == (1, 128, 256, 2)
  assert out.cam_hypotheses.shape == (1, 8, 7)
  assert out.variance.shape == (1, 256, 256, 1)
  flow_fc = shapes["params"]["flow"]["fc"]["dense_1"]["kernel"].shape
  assert flow_fc == (8192, 8192)  # UMR's 67M-parameter texture-flow layer


def test_too_small_images_are_refused():
  sphere = mesh_lib.symmetric_sphere()
  with pytest.raises(ValueError, match="at least 64 px"):
    jax.eval_shape(lambda: _tiny(sphere).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_discriminator():
  disc = reconstructor.Discriminator(base_channels=4, num_layers=3)
  x = jnp.ones((3, 32, 32, 4))
  variables = disc.init(jax.random.key(0), x)
  assert disc.apply(variables, x).shape == (3,)
