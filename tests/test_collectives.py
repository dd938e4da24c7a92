"""Ordered cross-device sums (`jaxrecon.ops.collectives`) on 4 emulated devices: exactly the
device-order sum (numpy's left fold), gradients equal to `lax.psum`'s, and `psum_tree`'s chunking."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxrecon.ops import collectives

DEVICES = 4


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


def _per_device(fn, out_specs=P()):
  """fn(local block) under shard_map over the rows of its argument."""
  return jax.jit(jax.shard_map(fn, mesh=_mesh(), in_specs=P("data"), out_specs=out_specs, check_vma=False))


def _spread(shape, seed=0):
  """Values over many magnitudes, so that the order of additions shows in the last bits."""
  rng = np.random.RandomState(seed)
  return (rng.randn(*shape) * np.exp(3 * rng.randn(*shape))).astype(np.float32)


def _left_fold(rows):
  total = rows[0].copy()
  for row in rows[1:]:
    total = total + row
  return total


def test_psum_is_the_device_order_sum_bit_for_bit():
  x = _spread((DEVICES, 5000))
  out = _per_device(lambda v: collectives.psum(v[0], "data"))(x)
  np.testing.assert_array_equal(np.asarray(out), _left_fold(x))
  # Some other order gives other bits, so the comparison above can fail.
  assert not np.array_equal(_left_fold(x[::-1]), _left_fold(x))


def test_pmean_and_gather_batch():
  x = _spread((DEVICES * 3, 7), seed=1)
  mean = _per_device(lambda v: collectives.pmean(jnp.mean(v, axis=0), "data"))(x)
  np.testing.assert_allclose(np.asarray(mean), x.mean(0), rtol=1e-5, atol=1e-5 * np.abs(x).max())
  gathered = _per_device(lambda v: collectives.gather_batch(v, "data")[None], out_specs=P("data"))(x)
  for device in range(DEVICES):                      # every device holds the global batch in order
    np.testing.assert_array_equal(np.asarray(gathered)[device], x)


def test_gradients_match_lax_psum():
  """A loss coupling the devices (a BatchNorm-like mean): d/dx through the ordered sum equals
  d/dx through lax.psum and the global-view reference."""
  x = np.random.RandomState(2).randn(DEVICES * 2, 3).astype(np.float32)
  w = np.linspace(0.5, 2.0, 3).astype(np.float32)

  def local_loss(v, total_fn):
    mean = total_fn(jnp.sum(v, axis=0)) / (DEVICES * v.shape[0])
    return total_fn(jnp.sum(jnp.tanh((v - mean) * w) ** 2))

  def grad_of(total_fn):
    # Each device differentiates its copy of the (replicated) loss; the copies' gradients add up
    # to D times the gradient, as in the trainer.
    return _per_device(lambda v: jax.grad(local_loss)(v, total_fn) / DEVICES, out_specs=P("data"))(x)

  ordered = grad_of(lambda t: collectives.psum(t, "data"))
  xla = grad_of(lambda t: jax.lax.psum(t, "data"))

  def global_loss(v):
    return jnp.sum(jnp.tanh((v - jnp.mean(v, axis=0)) * w) ** 2)

  np.testing.assert_allclose(np.asarray(ordered), np.asarray(xla), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(ordered), np.asarray(jax.grad(global_loss)(x)), rtol=1e-5, atol=1e-6)


def test_psum_tree_chunks_reassemble_exactly():
  # Sizes that do not divide by the device count (the flat vector is padded) and a non-float leaf.
  tree = {"a": _spread((DEVICES, 3, 5), seed=3), "b": _spread((DEVICES, 7), seed=4),
          "c": np.arange(DEVICES * 2, dtype=np.int32).reshape(DEVICES, 2)}

  def body(local):
    return jax.tree.map(lambda v: v[None], collectives.psum_tree(jax.tree.map(lambda v: v[0], local), "data"))

  out = jax.jit(jax.shard_map(body, mesh=_mesh(), in_specs=P("data"), out_specs=P("data"), check_vma=False))(tree)
  for key, value in tree.items():
    for device in range(DEVICES):
      np.testing.assert_array_equal(np.asarray(out[key])[device], _left_fold(value))
    assert out[key].dtype == value.dtype
  mean = jax.jit(jax.shard_map(lambda v: collectives.pmean_tree(v[0], "data"), mesh=_mesh(), in_specs=P("data"),
                               out_specs=P(), check_vma=False))(tree["b"])
  np.testing.assert_array_equal(np.asarray(mean), _left_fold(tree["b"]) / DEVICES)


def test_all_gather_check_grads():
  """The custom backward against finite differences (reverse mode, as every custom_vjp here)."""
  from jax.test_util import check_grads
  x = np.random.RandomState(5).randn(DEVICES, 3).astype(np.float32)
  weights = jnp.arange(1.0, 1.0 + DEVICES * 3).reshape(DEVICES, 3)
  f = _per_device(lambda u: jnp.sum(jnp.sin(collectives.all_gather(u[0], "data")) * weights))
  check_grads(f, (x,), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)
