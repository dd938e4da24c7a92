"""Tests for jaxrecon.ops.bilinear: grid_sample against torch, its autodiff reference and itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrecon.ops import grid_sample
from jaxrecon.ops import grid_sample_reference

PADDING_MODES = ("zeros", "border", "reflection")
# (H, W, C): non-square, odd, single-row/column, C in {1, 2, 3, 5}.
SHAPES = ((5, 7, 1), (4, 9, 2), (7, 4, 3), (3, 6, 5), (1, 6, 2), (5, 1, 3))


def _special_points(height, width, align_corners):
  """(M, 2) normalised points: exact pixel centres, the image ends, corners and beyond."""
  def centres(size):
    i = np.arange(size, dtype=np.float32)
    if align_corners:
      return -1.0 + 2.0 * i / max(size - 1, 1)
    return (2.0 * i + 1.0) / size - 1.0
  xs = np.concatenate([centres(width), [-1.0, 1.0, 0.0, -1.5, 1.5, -3.25, 3.0]])
  ys = np.concatenate([centres(height), [-1.0, 1.0, 0.0, 1.5, -1.5, 2.0, -3.0]])
  n = max(len(xs), len(ys))
  xs, ys = np.resize(xs, n), np.resize(ys, n)[::-1]
  corners = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1], [1.0001, 0.3], [-1.0001, -0.3]])
  return np.concatenate([np.stack([xs, ys], -1), corners]).astype(np.float32)


def _inputs(shape, align_corners, seed=0, batch=2):
  height, width, channels = shape
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
  special = _special_points(height, width, align_corners)
  special = np.broadcast_to(special, (batch,) + special.shape)
  num_random = 24 + (-special.shape[1]) % 4
  random = rng.uniform(-2.5, 2.5, size=(batch, num_random, 2)).astype(np.float32)
  grid = np.concatenate([random, special], axis=1).reshape(batch, -1, 4, 2)
  cotangent = rng.normal(size=grid.shape[:-1] + (channels,)).astype(np.float32)
  return image, grid, cotangent


@functools.lru_cache(maxsize=None)
def _value_and_grads(fn, align_corners, padding_mode):
  def loss(image, grid, cotangent):
    out = fn(image, grid, align_corners=align_corners, padding_mode=padding_mode)
    return jnp.sum(out * cotangent), out
  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def _torch_value_and_grads(image, grid, cotangent, align_corners, padding_mode):
  torch = pytest.importorskip("torch")
  image_t = torch.tensor(image.transpose(0, 3, 1, 2), requires_grad=True)
  grid_t = torch.tensor(grid, requires_grad=True)
  out = torch.nn.functional.grid_sample(image_t, grid_t, mode="bilinear", padding_mode=padding_mode,
                                        align_corners=align_corners)
  (out * torch.tensor(cotangent.transpose(0, 3, 1, 2))).sum().backward()
  return (out.detach().numpy().transpose(0, 2, 3, 1), image_t.grad.numpy().transpose(0, 2, 3, 1),
          grid_t.grad.numpy())


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_torch(align_corners, padding_mode):
  pytest.importorskip("torch")
  # Two shapes per mode (every shape is met twice over the six modes): compiles dominate the time.
  k0 = 2 * PADDING_MODES.index(padding_mode) + int(align_corners)
  for k in (k0 % len(SHAPES), (k0 + 3) % len(SHAPES)):
    shape = SHAPES[k]
    image, grid, cotangent = _inputs(shape, align_corners, seed=k)
    want_out, want_dimage, want_dgrid = _torch_value_and_grads(image, grid, cotangent,
                                                               align_corners, padding_mode)
    for fn in (grid_sample, grid_sample_reference):
      (dimage, dgrid), out = _value_and_grads(fn, align_corners, padding_mode)(image, grid,
                                                                               cotangent)
      where = f"{fn.__name__} {shape}"
      np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=0, err_msg=where)
      np.testing.assert_allclose(dimage, want_dimage, atol=1e-5, rtol=0, err_msg=where)
      np.testing.assert_allclose(dgrid, want_dgrid, atol=1e-5, rtol=0, err_msg=where)


def test_fast_matches_reference_without_torch():
  # The same comparison as above with the autodiff reference as oracle, so it runs without torch.
  for align_corners, padding_mode in ((False, "zeros"), (True, "border"), (False, "reflection")):
    if True:
      image, grid, cotangent = _inputs((6, 9, 3), align_corners, seed=7)
      (dimage, dgrid), out = _value_and_grads(grid_sample, align_corners, padding_mode)(
          image, grid, cotangent)
      (rimage, rgrid), rout = _value_and_grads(grid_sample_reference, align_corners,
                                               padding_mode)(image, grid, cotangent)
      np.testing.assert_allclose(out, rout, atol=1e-6)
      np.testing.assert_allclose(dimage, rimage, atol=1e-6)
      np.testing.assert_allclose(dgrid, rgrid, atol=1e-5)


def test_known_values_align_corners():
  # Pixel centres read the pixels; midpoints average neighbours; -1/1 are the corner centres
  # (align_corners=True) or their outer edges (False: half a pixel of zero padding).
  image = jnp.arange(12.0).reshape(1, 3, 4, 1)
  grid = jnp.array([[[-1.0, -1.0], [1.0, 1.0], [-1.0 / 3.0, -1.0], [0.0, 0.0]]])
  out = grid_sample(image, grid, align_corners=True)[0, :, 0]
  np.testing.assert_allclose(out, [0.0, 11.0, 1.0, 5.5], atol=1e-6)
  out = grid_sample(image, grid, align_corners=False)[0, :, 0]
  np.testing.assert_allclose(out[:2], [0.0 * 0.25, 11.0 * 0.25], atol=1e-6)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_check_grads_rev(padding_mode):
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    image = jnp.asarray(rng.normal(size=(2, 4, 5, 2)))
    grid = jnp.asarray(rng.uniform(-1.3, 1.3, size=(2, 6, 2)))
    for align_corners in (False, True):
      fn = functools.partial(grid_sample, align_corners=align_corners, padding_mode=padding_mode)
      # Order 2 differentiates the hand-written backward rule as well.
      check_grads(fn, (image, grid), order=2, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


def test_check_grads_detects_a_wrong_rule():
  # Guard against a vacuous check_grads: a deliberately wrong VJP must be caught.
  @jax.custom_vjp
  def wrong(image, grid):
    return grid_sample(image, grid)

  wrong.defvjp(lambda i, g: (grid_sample(i, g), (i, g)),
               lambda res, ct: jax.vjp(grid_sample, *res)[1](1.01 * ct))
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    args = (jnp.asarray(rng.normal(size=(1, 4, 5, 2))), jnp.asarray(rng.uniform(-1, 1, (1, 6, 2))))
    with pytest.raises(AssertionError):
      check_grads(wrong, args, order=1, modes=["rev"], eps=1e-6, atol=1e-5, rtol=1e-5)


def test_finite_at_pixel_centres_and_borders():
  for align_corners in (False, True):
    for padding_mode in PADDING_MODES:
      image, grid, cotangent = _inputs((4, 6, 3), align_corners, seed=1)
      grid, cotangent = grid[:, 6:], cotangent[:, 6:]  # the special points
      (dimage, dgrid), out = _value_and_grads(grid_sample, align_corners, padding_mode)(
          image, grid, cotangent)
      for array in (out, dimage, dgrid):
        assert np.all(np.isfinite(array))
  # With align_corners=True a pixel centre reads exactly that pixel.
  image, _, _ = _inputs((4, 6, 3), True, seed=1)
  centres = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 1, 6), jnp.linspace(-1, 1, 4)), -1)
  out = grid_sample(image, jnp.broadcast_to(centres, (2, 4, 6, 2)), align_corners=True)
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_flat_image_gives_zero_grid_gradient():
  # Eq. 26: over a constant image the coordinates receive exactly no gradient.
  image = jnp.full((1, 8, 8, 3), 0.7)
  grid = jnp.asarray(np.random.default_rng(0).uniform(-0.8, 0.8, (1, 10, 2)), jnp.float32)
  dgrid = jax.grad(lambda g: jnp.sum((grid_sample(image, g) - 0.2) ** 2))(grid)
  assert np.all(dgrid == 0.0)


def test_grid_shapes_and_validation():
  image = jnp.ones((2, 4, 5, 3))
  assert grid_sample(image, jnp.zeros((2, 2))).shape == (2, 3)
  assert grid_sample(image, jnp.zeros((2, 7, 2))).shape == (2, 7, 3)
  assert grid_sample(image, jnp.zeros((2, 3, 1, 4, 2))).shape == (2, 3, 1, 4, 3)
  with pytest.raises(ValueError):
    grid_sample(image, jnp.zeros((2, 7, 2)), padding_mode="wrap")
  with pytest.raises(ValueError):
    grid_sample(image, jnp.zeros((3, 7, 2)))
  with pytest.raises(ValueError):
    grid_sample(image, jnp.zeros((2, 7, 3)))
  with pytest.raises(ValueError):
    grid_sample(image[0], jnp.zeros((2, 7, 2)))


def test_jit_and_vmap():
  image, grid, cotangent = _inputs((5, 6, 2), False, seed=2)
  fn = functools.partial(grid_sample, padding_mode="border")
  eager = fn(image, grid)
  np.testing.assert_allclose(jax.jit(fn)(image, grid), eager, atol=1e-6)
  # vmap over an extra leading axis equals a Python loop, forward and backward.
  images, grids = np.stack([image, image[::-1]]), np.stack([grid, -grid])
  batched = jax.vmap(fn)(images, grids)
  for k in range(2):
    np.testing.assert_allclose(batched[k], fn(images[k], grids[k]), atol=1e-6)
  loss = lambda i, g: jnp.sum(fn(i, g) * cotangent)
  grads = jax.vmap(jax.grad(loss, argnums=(0, 1)))(images, grids)
  for k in range(2):
    want = jax.grad(loss, argnums=(0, 1))(images[k], grids[k])
    np.testing.assert_allclose(grads[0][k], want[0], atol=1e-6)
    np.testing.assert_allclose(grads[1][k], want[1], atol=1e-5)


@pytest.mark.parametrize("mode", ["plain", "adaptive"])
def test_sampler_partitions_along_a_sharded_batch(mode):
  # With the batch sharded over devices, every device samples its own images: the compiled forward
  # and backward hold no collective. (Indices into the whole flattened batch made XLA all-reduce
  # the samples of the global batch on every device.)
  from jaxrecon.ops import variance_grid_sample  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:4]
  if len(devices) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py emulates 8 CPU devices)")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.uniform(size=(8, 16, 16, 3)), jnp.float32)
  variance = jnp.asarray(rng.uniform(0.5, 2.0, size=(8, 16, 16, 1)), jnp.float32)
  grid = jnp.asarray(rng.uniform(-1.1, 1.1, size=(8, 50, 2)), jnp.float32)

  def sample(image, variance, grid):
    if mode == "plain":
      return grid_sample(image, grid, align_corners=True)
    return variance_grid_sample(image, grid, variance, mode="adaptive", align_corners=True)

  def forward_and_back(image, variance, grid, cotangent):
    out, vjp = jax.vjp(sample, image, variance, grid)
    return out, vjp(cotangent)

  cotangent = jnp.ones((8, 50, 3), jnp.float32)
  args = (image, variance, grid, cotangent)
  compiled = jax.jit(forward_and_back, in_shardings=(sharded,) * 4, out_shardings=sharded).lower(*args).compile()
  hlo = compiled.as_text()
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op
  out, grads = compiled(*args)
  want_out, want_grads = forward_and_back(*args)          # unsharded
  np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
