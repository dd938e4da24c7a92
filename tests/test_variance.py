"""Tests for jaxrecon.ops.variance: the variance branch (Eq. 11, 16-17, 27-30), Eq. 31-32."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrecon.ops import grid_sample
from jaxrecon.ops import grid_sample_reference
from jaxrecon.ops import lookahead_loss
from jaxrecon.ops import variance_grid_sample
from jaxrecon.ops import variance_grid_sample_reference

# (align_corners, padding_mode) pairs: each padding mode once, each align_corners setting.
SETTINGS = ((True, "zeros"), (False, "border"), (True, "reflection"))


def _inputs(variance_channels, seed=0, shape=(2, 5, 7, 3), dtype=np.float32):
  rng = np.random.default_rng(seed)
  image = rng.uniform(0.1, 1.0, size=shape).astype(dtype)
  variance = rng.uniform(0.3, 3.0, size=shape[:3] + (variance_channels,)).astype(dtype)
  grid = rng.uniform(-1.2, 1.2, size=(shape[0], 4, 3, 2)).astype(dtype)
  cotangent = rng.normal(size=grid.shape[:-1] + shape[-1:]).astype(dtype)
  return image, grid, variance, cotangent


@functools.lru_cache(maxsize=None)
def _grads(fn, mode, combine, align_corners, padding_mode):
  """jit(d/d(image, grid, variance) of sum(cotangent * out)), with out as aux."""
  def loss(image, grid, variance, cotangent):
    out = fn(image, grid, variance, mode=mode, combine=combine, align_corners=align_corners,
             padding_mode=padding_mode)
    return jnp.sum(out * cotangent), out
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.lru_cache(maxsize=None)
def _plain_grads(fn, align_corners, padding_mode):
  def loss(image, grid, cotangent):
    return jnp.sum(fn(image, grid, align_corners=align_corners, padding_mode=padding_mode)
                   * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("align_corners,padding_mode,variance_channels",
                         [s + (1,) for s in SETTINGS] + [SETTINGS[0] + (3,)])
def test_adaptive_rule(align_corners, padding_mode, variance_channels):
  image, grid, variance, cotangent = _inputs(variance_channels)
  modulated = image * variance
  plain_dimage, plain_dgrid = _plain_grads(grid_sample_reference, align_corners, padding_mode)(
      image, grid, cotangent)
  _, modulated_dgrid = _plain_grads(grid_sample_reference, align_corners, padding_mode)(
      modulated, grid, cotangent)
  expected_out = grid_sample_reference(image, grid, align_corners=align_corners,
                                       padding_mode=padding_mode)
  for fn in (variance_grid_sample, variance_grid_sample_reference):
    for combine, want_dgrid in (("replace", modulated_dgrid),
                                ("add", plain_dgrid + modulated_dgrid)):
      (dimage, dgrid, dvariance), out = _grads(fn, "adaptive", combine, align_corners,
                                               padding_mode)(image, grid, variance, cotangent)
      where = f"{fn.__name__} {combine}"
      # True colours forward (Eq. 27 keeps C_xy), usual image cotangent, no first-order variance
      # gradient, and the coordinates get the gradient of GS(I * I_var) (Eq. 17, 27-30).
      np.testing.assert_allclose(out, expected_out, atol=1e-6, err_msg=where)
      np.testing.assert_allclose(dimage, plain_dimage, atol=1e-6, err_msg=where)
      np.testing.assert_allclose(dvariance, 0.0, atol=1e-6, err_msg=where)
      np.testing.assert_allclose(dgrid, want_dgrid, atol=2e-5, rtol=1e-5, err_msg=where)
  # Guard: the test is not vacuous, the modulated gradient differs from the plain one.
  assert np.max(np.abs(modulated_dgrid - plain_dgrid)) > 0.1


def test_unit_variance_is_plain_sampling():
  image, grid, _, cotangent = _inputs(1, seed=1)
  ones = np.ones(image.shape[:3] + (1,), np.float32)
  for align_corners, padding_mode in SETTINGS[1:]:
    plain_dimage, plain_dgrid = _plain_grads(grid_sample, align_corners, padding_mode)(
        image, grid, cotangent)
    plain_out = grid_sample(image, grid, align_corners=align_corners, padding_mode=padding_mode)
    for mode, combine, factor in (("adaptive", "replace", 1.0), ("adaptive", "add", 2.0),
                                  ("paper", "replace", 1.0), ("none", "replace", 1.0)):
      (dimage, dgrid, _), out = _grads(variance_grid_sample, mode, combine, align_corners,
                                       padding_mode)(image, grid, ones, cotangent)
      np.testing.assert_allclose(out, plain_out, atol=1e-6)
      np.testing.assert_allclose(dimage, plain_dimage, atol=1e-6)
      np.testing.assert_allclose(dgrid, factor * plain_dgrid, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("mode", ["paper", "none"])
def test_paper_and_none_modes(mode):
  image, grid, variance, cotangent = _inputs(1, seed=2)
  for align_corners, padding_mode in SETTINGS[:2]:
    (dimage, dgrid, dvariance), out = _grads(variance_grid_sample, mode, "replace", align_corners,
                                             padding_mode)(image, grid, variance, cotangent)
    # The oracle: plain autodiff of GS(I * V) (Eq. 11) or of GS(I).
    def loss(i, g, v):
      sampled = i * v if mode == "paper" else i
      return jnp.sum(grid_sample_reference(sampled, g, align_corners=align_corners,
                                           padding_mode=padding_mode) * cotangent)
    want = jax.grad(loss, argnums=(0, 1, 2))(image, grid, variance)
    np.testing.assert_allclose(dimage, want[0], atol=1e-5)
    np.testing.assert_allclose(dgrid, want[1], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dvariance, want[2], atol=1e-5)
    if mode == "paper":
      assert np.max(np.abs(dvariance)) > 0.01  # Eq. 11 does train the variance directly


def test_check_grads_rev():
  with jax.enable_x64(True):
    image, grid, variance, _ = _inputs(3, seed=4, shape=(1, 4, 5, 3), dtype=np.float64)
    paper = functools.partial(variance_grid_sample, mode="paper", padding_mode="border")
    check_grads(paper, (image, grid, variance), order=2, modes=["rev"], eps=1e-6, atol=1e-5,
                rtol=1e-5)
    # 'adaptive' is deliberately not the true derivative w.r.t. the grid; what must be exact is its
    # derivative w.r.t. the variance (used by Eq. 31-32) and w.r.t. the image.
    def adaptive_grid_gradient(image, variance):
      loss = lambda g: jnp.sum(variance_grid_sample(image, g, variance, align_corners=True) ** 2)
      return jax.grad(loss)(grid)
    check_grads(adaptive_grid_gradient, (image, variance), order=1, modes=["rev"], eps=1e-6,
                atol=1e-5, rtol=1e-5)


def test_adaptive_escapes_a_flat_region():
  # Eq. 26: on a constant image the plain gradient is exactly zero; a variance that rises towards
  # the target turns it into a descent direction towards the target (Fig. 4).
  image = jnp.full((1, 9, 9, 1), 0.5)
  target_value = 0.9  # brighter than the flat region
  ramp = jnp.linspace(1.0, 2.0, 9)
  variance = jnp.broadcast_to(ramp[None, None, :, None], (1, 9, 9, 1))  # grows to the right (+x)
  grid = jnp.array([[[-0.31, 0.07], [0.12, -0.4]]])
  def grad_for(mode):
    loss = lambda g: jnp.sum(
        (variance_grid_sample(image, g, variance, mode=mode, align_corners=True) - target_value)
        ** 2)
    return jax.grad(loss)(grid)
  np.testing.assert_array_equal(grad_for("none"), 0.0)
  adaptive = grad_for("adaptive")
  assert np.all(adaptive[..., 0] < -1e-3)  # -gradient points to +x, where the variance grows
  np.testing.assert_allclose(adaptive[..., 1], 0.0, atol=1e-6)


def test_lookahead_meta_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    image, grid, variance, _ = _inputs(1, seed=5, shape=(1, 6, 7, 3), dtype=np.float64)
    target_colour = jnp.asarray(np.random.default_rng(6).uniform(0.1, 1.0, (1, 4, 3, 3)))
    pseudo_label = grid + 0.05  # Y_pse of Eq. 31
    reconstruction = lambda g, v, fn: jnp.sum(
        (fn(image, g, v, align_corners=True) - target_colour) ** 2)  # Eq. 19
    alignment = lambda g: jnp.sum((g - pseudo_label) ** 2)  # Eq. 31
    def meta(v, fn, outer):
      return lookahead_loss(lambda g, v_: reconstruction(g, v_, fn), outer, grid, v,
                            step_size=0.01)
    # The outer loss is differentiated truly (plain sampling): through the adaptive rule it would
    # give a surrogate meta-gradient, which finite differences rightly reject.
    plain = lambda i, g, v, **kw: grid_sample(i, g, **kw)
    for outer in (alignment, lambda g: reconstruction(g, variance, plain)):
      got = jax.grad(meta)(variance, variance_grid_sample, outer)
      oracle = jax.grad(meta)(variance, variance_grid_sample_reference, outer)
      np.testing.assert_allclose(got, oracle, atol=1e-10, rtol=1e-8)
      assert np.max(np.abs(got)) > 1e-4  # the variance does receive a meta-gradient
      # Central differences along random directions and along single pixels.
      rng = np.random.default_rng(7)
      directions = [rng.normal(size=variance.shape) for _ in range(2)]
      for k in range(2):
        one_hot = np.zeros(variance.shape)
        one_hot.flat[int(np.argmax(np.abs(got)))] = 1.0 if k == 0 else 0.0
        if k:
          one_hot.flat[int(np.argsort(np.abs(got).ravel())[-2])] = 1.0
        directions.append(one_hot)
      eps = 1e-5
      for direction in directions:
        numeric = (meta(variance + eps * direction, variance_grid_sample, outer)
                   - meta(variance - eps * direction, variance_grid_sample, outer)) / (2 * eps)
        np.testing.assert_allclose(np.sum(got * direction), numeric, rtol=1e-5, atol=1e-9)


def test_lookahead_normalized_step_has_the_requested_length():
  with jax.enable_x64(True):
    image, grid, variance, _ = _inputs(1, seed=8, shape=(1, 6, 7, 3), dtype=np.float64)
    target = jnp.asarray(np.random.default_rng(9).uniform(0.1, 1.0, (1, 4, 3, 3)))
    inner = lambda g, v: 1e-3 * jnp.mean((variance_grid_sample(image, g, v, align_corners=True) - target) ** 2)
    rms_step = lambda g: jnp.sqrt(jnp.mean((g - grid) ** 2))
    length = lookahead_loss(inner, rms_step, grid, variance, step_size=0.3, normalize=True)
    np.testing.assert_allclose(length, 0.3, rtol=1e-9)
    raw = lookahead_loss(inner, rms_step, grid, variance, step_size=0.3)
    assert raw < 1e-3      # the tiny gradient of a mean loss barely moves the coordinates
    # The normaliser is held constant: the meta-gradient is that of the plain step of the same length.
    outer = lambda g: jnp.sum((g - grid - 0.05) ** 2)
    rms = jnp.sqrt(jnp.mean(jax.grad(inner)(grid, variance) ** 2))
    got = jax.grad(lambda v: lookahead_loss(inner, outer, grid, v, step_size=0.3, normalize=True))(variance)
    want = jax.grad(lambda v: lookahead_loss(inner, outer, grid, v, step_size=0.3 / rms))(variance)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
    assert np.max(np.abs(got)) > 1e-6


def test_jit_and_vmap():
  image, grid, variance, cotangent = _inputs(1, seed=8)
  fn = functools.partial(variance_grid_sample, padding_mode="reflection")
  loss = lambda i, g, v: jnp.sum(fn(i, g, v) * cotangent)
  np.testing.assert_allclose(jax.jit(fn)(image, grid, variance), fn(image, grid, variance),
                             atol=1e-6)
  images, grids, variances = (np.stack([x, x[::-1]]) for x in (image, grid, variance))
  batched = jax.vmap(jax.grad(loss, argnums=(0, 1)))(images, grids, variances)
  for k in range(2):
    want = jax.grad(loss, argnums=(0, 1))(images[k], grids[k], variances[k])
    np.testing.assert_allclose(batched[0][k], want[0], atol=1e-6)
    np.testing.assert_allclose(batched[1][k], want[1], atol=1e-5)


def test_finite_at_pixel_centres_and_borders():
  image, _, variance, _ = _inputs(3, seed=9, shape=(1, 4, 5, 3))
  xs = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, -1.0, 1.0, 1.5], np.float32)
  ys = np.array([-1.0, 1.0, -1 / 3, 1 / 3, 1.0, 1.0, -1.0, -2.0], np.float32)
  grid = np.stack([xs, ys], -1)[None]
  for align_corners, padding_mode in SETTINGS:
    for combine in ("replace", "add"):
      loss = lambda g: jnp.sum(variance_grid_sample(
          image, g, variance, combine=combine, align_corners=align_corners,
          padding_mode=padding_mode) ** 2)
      value, dgrid = jax.value_and_grad(loss)(grid)
      assert np.isfinite(value) and np.all(np.isfinite(dgrid))


def test_validation():
  image, grid, variance, _ = _inputs(1)
  with pytest.raises(ValueError):
    variance_grid_sample(image, grid, variance, mode="literal")
  with pytest.raises(ValueError):
    variance_grid_sample(image, grid, variance, combine="mean")
  with pytest.raises(ValueError):
    variance_grid_sample(image, grid, variance[:, :-1])
  with pytest.raises(ValueError):
    variance_grid_sample(image, grid, np.ones(image.shape[:3] + (2,), np.float32))
