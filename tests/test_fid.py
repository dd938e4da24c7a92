"""FID: float64 statistics route vs pytorch-fid's sqrtm; the differentiable loss vs the metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecon.metrics import fid


def _features(n, d, seed, shift=0.0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return np.maximum(rng.normal(size=(n, d)) @ mix + shift, 0.0)  # relu-like, correlated


def test_identical_sets_have_zero_distance():
  a = _features(100, 16, 0)
  assert abs(fid.frechet_distance_from_features(a, a)) < 1e-9


def test_matches_pytorch_fid_formula():
  pytest.importorskip("torch")
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top
  ref.torchvision()  # pytorch_fid imports torchvision
  from pytorch_fid.fid_score import calculate_frechet_distance  # pylint: disable=g-import-not-at-top

  for n, m, d in [(300, 200, 32), (40, 50, 64)]:  # full-rank and rank-deficient covariances
    a, b = _features(n, d, 1), _features(m, d, 2, shift=0.3)
    stats_a, stats_b = fid.feature_statistics(a), fid.feature_statistics(b)
    expected = calculate_frechet_distance(*stats_a, *stats_b)
    np.testing.assert_allclose(fid.frechet_distance(*stats_a, *stats_b), expected, rtol=1e-6)


def test_loss_equals_metric_and_has_finite_gradients():
  a, b = _features(24, 48, 3), _features(20, 48, 4, shift=0.5)
  expected = fid.frechet_distance_from_features(a, b)
  loss = jax.jit(fid.fid_loss)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  grads = jax.grad(fid.fid_loss, argnums=(0, 1))(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  assert all(np.all(np.isfinite(g)) for g in grads)
  # Constant (duplicated) features have a zero centred matrix: value and gradient stay finite.
  constant = jnp.ones((8, 48), jnp.float32)
  value, g = jax.value_and_grad(fid.fid_loss, argnums=1)(jnp.asarray(a, jnp.float32), constant)
  assert np.isfinite(value) and np.all(np.isfinite(g))
  # Identical batches: the loss is 0 and the gradient still finite.
  same = jax.grad(fid.fid_loss, argnums=1)(jnp.asarray(a, jnp.float32), jnp.asarray(a, jnp.float32))
  assert np.all(np.isfinite(same))


def test_loss_to_statistics_equals_metric():
  real, fake = _features(400, 32, 5), _features(16, 32, 6, shift=0.2)
  mu, sigma = fid.feature_statistics(real)
  expected = fid.frechet_distance(mu, sigma, *fid.feature_statistics(fake))
  loss = fid.fid_loss_to_statistics(jnp.asarray(fake, jnp.float32), jnp.asarray(mu, jnp.float32),
                                    jnp.asarray(fid.sqrt_psd(sigma), jnp.float32))
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_loss_gradient_matches_finite_differences():
  a, b = _features(6, 5, 7), _features(5, 5, 8, shift=0.4)
  with jax.enable_x64(True):
    a64, b64 = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
    grad = jax.grad(fid.fid_loss, argnums=1)(a64, b64)
    eps = 1e-6
    for i, j in [(0, 0), (2, 3), (4, 1)]:
      plus = fid.fid_loss(a64, b64.at[i, j].add(eps))
      minus = fid.fid_loss(a64, b64.at[i, j].add(-eps))
      np.testing.assert_allclose(grad[i, j], (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-8)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="at least 2"):
    fid.feature_statistics(np.zeros((1, 4)))
  with pytest.raises(ValueError, match="differ in shape"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streaming_statistics_merge_equals_batch_statistics():
  feats = _features(250, 12, 9, shift=100.0)  # a large offset would expose E[xx^T] - mu mu^T cancellation
  mu, sigma = fid.feature_statistics(feats)
  streaming = fid.StreamingStatistics()
  for chunk in np.array_split(feats[:150], 7):
    streaming.update(chunk)
  other_host = fid.StreamingStatistics().update(feats[150:])
  streaming.merge(other_host).merge(fid.StreamingStatistics())
  got_mu, got_sigma = streaming.mean_and_covariance()
  assert streaming.count == 250
  np.testing.assert_allclose(got_mu, mu, rtol=1e-12)
  np.testing.assert_allclose(got_sigma, sigma, rtol=1e-9, atol=1e-12)
  assert streaming.merge_across_processes() is streaming  # single process: unchanged
  with pytest.raises(ValueError, match="at least 2"):
    fid.StreamingStatistics().update(feats[:1]).mean_and_covariance()
