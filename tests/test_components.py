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
