"""The config-to-objects helpers of jaxrecon.components."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrecon import components, ops


@pytest.mark.parametrize("mode", ["none", "adaptive", "paper"])
def test_sample_texture_is_what_training_renders(mode):
  """Evaluation and training share `sample_texture`: for 'paper' (Eq. 11) the colours are those of
  the variance-modulated image, for the others those of the image."""
  config = ml_collections.ConfigDict({"variance": {"mode": mode, "combine": "replace"}})
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  image = jax.random.uniform(k1, (2, 8, 8, 3))
  flow = jax.random.uniform(k2, (2, 5, 4, 2), minval=-1, maxval=1)
  variance = jax.random.uniform(k3, (2, 8, 8, 1), minval=0.5, maxval=2.0)
  colours = components.sample_texture(config, image, flow, variance)
  plain = ops.grid_sample(image, flow, align_corners=True)
  modulated = ops.grid_sample(image * variance, flow, align_corners=True)
  expected = modulated if mode == "paper" else plain
  np.testing.assert_allclose(colours, expected, atol=1e-6)
  assert float(jnp.abs(modulated - plain).max()) > 0.1     # the two readings differ on this input
  np.testing.assert_allclose(components.sample_texture(config, image, flow, None), plain, atol=1e-6)


def test_template_axes_stretch_the_sphere():
  """`model.template_axes` scales the template sphere's radii along (forward, across, up); the
  template stays mirror-symmetric and (1, 1, 1) is the sphere of radius template_scale."""
  from configs import synthetic   # pylint: disable=g-import-not-at-top
  from jaxrecon.geometry import mesh as mesh_lib   # pylint: disable=g-import-not-at-top
  sphere = mesh_lib.symmetric_sphere()
  config = synthetic.get_config()
  extents = {}
  for axes in ((1.0, 1.0, 1.0), (1.0, 0.5, 0.25)):
    config.model.template_axes = axes
    half = np.asarray(components.make_model(config, sphere).template_half)
    vertices = np.asarray(mesh_lib.symmetrize(half, sphere.num_side))
    extents[axes] = vertices.max(0) - vertices.min(0)
    np.testing.assert_allclose(vertices.mean(0)[1], 0.0, atol=1e-6)      # still symmetric in y
  np.testing.assert_allclose(extents[(1.0, 1.0, 1.0)], 2 * config.model.template_scale, rtol=1e-5)
  np.testing.assert_allclose(extents[(1.0, 0.5, 0.25)], [1.0, 0.5, 0.25], rtol=1e-5)
