"""`jaxrecon.models.layers.BatchNorm`: flax's BatchNorm bit for bit, and under `jax.shard_map` with
`batch_axis` the statistics (and gradients) of the global batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrecon.models import layers

DEVICES = 4


@pytest.mark.parametrize("shape", [(8, 5, 5, 6), (8, 6)])
@pytest.mark.parametrize("train", [True, False])
def test_equals_flax_batchnorm(shape, train):
  x = jnp.asarray(np.random.RandomState(0).randn(*shape) * 3 + 1, jnp.float32)
  ours, theirs = layers.BatchNorm(epsilon=1e-3), nn.BatchNorm(momentum=0.9, epsilon=1e-3)
  variables = theirs.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.structure(ours.init(jax.random.key(0), x, False)) == jax.tree.structure(variables)
  # Non-trivial parameters and running statistics.
  rng = np.random.RandomState(1)
  variables = jax.tree.map(lambda v: v + jnp.asarray(rng.rand(*v.shape), jnp.float32), variables)
  out, new = ours.apply(variables, x, not train, mutable=["batch_stats"])
  ref, ref_new = theirs.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  for key in ("mean", "var"):
    np.testing.assert_array_equal(np.asarray(new["batch_stats"][key]), np.asarray(ref_new["batch_stats"][key]))


def test_statistics_over_the_batch_axis_are_the_global_batch():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("data",))
  x = jnp.asarray(np.random.RandomState(2).randn(DEVICES * 2, 3, 3, 5) * 2 + 0.5, jnp.float32)
  variables = layers.BatchNorm().init(jax.random.key(0), x, False)
  variables = {"params": jax.tree.map(lambda v: v + 0.3, variables["params"]),
               "batch_stats": variables["batch_stats"]}
  weights = jnp.asarray(np.random.RandomState(3).randn(*x.shape), jnp.float32)

  def global_loss(params, v):
    y, new = layers.BatchNorm().apply({"params": params, "batch_stats": variables["batch_stats"]}, v, False,
                                      mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y) * weights), (y, new)

  # Global view: the whole batch at once.
  (_, (y_ref, stats_ref)), grads_ref = jax.value_and_grad(global_loss, argnums=(0, 1), has_aux=True)(
      variables["params"], x)

  def per_device(params, v, w):
    module = layers.BatchNorm(batch_axis="data")
    def local(p, u):
      y, new = module.apply({"params": p, "batch_stats": variables["batch_stats"]}, u, False, mutable=["batch_stats"])
      return jnp.sum(jnp.tanh(y) * w), (y, new)
    (_, (y, new)), (g_params, g_x) = jax.value_and_grad(local, argnums=(0, 1), has_aux=True)(params, v)
    # Parameter gradients: each device holds its samples' share; summed here (a test-side psum).
    return y, new, jax.lax.psum(g_params, "data"), g_x

  y, stats, g_params, g_x = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P("data"), P(), P(), P("data")),
      check_vma=False))(variables["params"], x, weights)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(np.asarray(stats["batch_stats"][key]), np.asarray(stats_ref["batch_stats"][key]),
                               rtol=1e-5, atol=1e-6)
  # The input gradient includes the path through the other devices' statistics.
  np.testing.assert_allclose(np.asarray(g_x), np.asarray(grads_ref[1]), rtol=1e-4, atol=1e-5)
  for key in ("scale", "bias"):
    np.testing.assert_allclose(np.asarray(g_params[key]), np.asarray(grads_ref[0][key]), rtol=1e-4, atol=1e-5)
  # Without the axis each device would normalise by its own two samples: a different answer.
  local_only = layers.BatchNorm().apply(variables, x[:2], False, mutable=["batch_stats"])[0]
  assert not np.allclose(np.asarray(local_only), np.asarray(y_ref[:2]), atol=1e-3)
