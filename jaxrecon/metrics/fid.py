"""Fréchet Inception Distance: the metric (NumPy float64) and the differentiable loss (paper Eq. 40-47).

FID between feature sets with means μ and covariances Σ is
``‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})`` (Eq. 42-43). Two exact routes to the trace term,
neither of which forms a complex matrix square root (``calculate_frechet_distance`` in mseitzer/pytorch-fid
src/pytorch_fid/fid_score.py takes ``scipy.linalg.sqrtm`` of Σ_a Σ_b, which can come back complex with a
small imaginary part that it discards):

* statistics route (the metric, any n): for any factor ``Σ_a = F Fᵀ`` (Cholesky when Σ_a is positive
  definite, else the symmetric square root), ``Tr (Σ_a Σ_b)^{1/2} = Σ_i sqrt(λ_i(Fᵀ Σ_b F))`` — one
  symmetric eigenvalue problem in float64, eigenvalues clipped at 0.
* feature route (the loss, batches): for centred features A (n×d) and B (m×d),
  ``Tr (Σ_a Σ_b)^{1/2} = ‖A Bᵀ‖_* / sqrt((n−1)(m−1))``, the nuclear norm of a small n×m matrix
  (the nonzero eigenvalues of AᵀA·BᵀB are the squared singular values of A Bᵀ). Its gradient is
  finite even though the centred batch covariances are rank-deficient.

pytorch-fid's `calculate_frechet_distance` (scipy ``sqrtm``) is the outside oracle in the tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(n, d) features -> mean (d,) and unbiased covariance (d, d), float64 (as pytorch-fid)."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors of shape (n, d), got {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclasses.dataclass
class StreamingStatistics:
  """Mean and covariance of features accumulated batch by batch, mergeable across batches and hosts.

  Uses Chan et al.'s pairwise update (count, mean, sum of squared deviations) in float64, which is
  exact up to rounding and does not cancel catastrophically like ``E[xxᵀ] − μμᵀ``.
  """
  count: int = 0
  mean: np.ndarray | None = None
  scatter: np.ndarray | None = None  # Σ (x − mean)(x − mean)ᵀ

  def update(self, features) -> "StreamingStatistics":
    """Add a batch (n, d) of features; returns self."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be (n, d), got {features.shape}")
    batch_mean = features.mean(axis=0)
    centred = features - batch_mean
    self.merge(StreamingStatistics(features.shape[0], batch_mean, centred.T @ centred))
    return self

  def merge(self, other: "StreamingStatistics") -> "StreamingStatistics":
    """Fold in statistics accumulated elsewhere (another batch, shard or host); returns self."""
    if other.count == 0:
      return self
    if self.count == 0:
      self.count, self.mean, self.scatter = other.count, other.mean.copy(), other.scatter.copy()
      return self
    total = self.count + other.count
    delta = other.mean - self.mean
    self.scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / total)
    self.mean = self.mean + delta * (other.count / total)
    self.count = total
    return self

  def merge_across_processes(self) -> "StreamingStatistics":
    """All-gather every JAX process's statistics and merge them (identical result on each host)."""
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    if jax.process_count() == 1:
      return self
    gathered = multihost_utils.process_allgather(
        {"count": np.array([self.count], np.float64), "mean": self.mean, "scatter": self.scatter})
    merged = StreamingStatistics()
    for i in range(jax.process_count()):
      merged.merge(StreamingStatistics(int(gathered["count"][i][0]), np.asarray(gathered["mean"][i]),
                                       np.asarray(gathered["scatter"][i])))
    return merged

  def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), unbiased covariance (d, d)) as `feature_statistics` would give on all the data."""
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors, have {self.count}")
    return self.mean, self.scatter / (self.count - 1)


def sqrt_psd(sigma) -> np.ndarray:
  """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
  w, u = scipy.linalg.eigh(np.asarray(sigma, np.float64), driver="evd")
  return (u * np.sqrt(np.clip(w, 0.0, None))) @ u.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """FID from statistics, float64 (Eq. 42-43). No eps offset, no complex square root."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
  # The eigenvalues of Σ1Σ2 are those of the symmetric Fᵀ Σ2 F for any factor Σ1 = F Fᵀ: the
  # Cholesky factor when Σ1 is positive definite (cheap), else the eigen square root.
  try:
    factor = scipy.linalg.cholesky(sigma1, lower=True)
  except scipy.linalg.LinAlgError:
    factor = sqrt_psd(sigma1)
  middle = factor.T @ sigma2 @ factor
  eigenvalues = scipy.linalg.eigvalsh((middle + middle.T) / 2, driver="evd")
  trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_from_features(features1, features2) -> float:
  """FID between two feature sets (n, d) and (m, d), float64."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def fid_loss(real_features, fake_features):
  """Differentiable FID between two batches of features (paper Eq. 40-47).

  Args:
    real_features: (n, d) Inception features of input images (F_icp(I_r), Eq. 40).
    fake_features: (m, d) features of renders from random views (F_icp(I_rand), Eq. 41); n, m >= 2.
  Returns:
    scalar FID with unbiased batch covariances, equal to `frechet_distance_from_features`.
  """
  n, m = real_features.shape[0], fake_features.shape[0]
  mu_r, mu_f = jnp.mean(real_features, axis=0), jnp.mean(fake_features, axis=0)
  a, b = real_features - mu_r, fake_features - mu_f
  trace_r = jnp.sum(a * a) / (n - 1)
  trace_f = jnp.sum(b * b) / (m - 1)
  trace_sqrt = jnp.sum(jnp.linalg.svd(a @ b.T, compute_uv=False)) / jnp.sqrt((n - 1.0) * (m - 1.0))
  return jnp.sum((mu_r - mu_f) ** 2) + trace_r + trace_f - 2.0 * trace_sqrt


def fid_loss_to_statistics(fake_features, mu_real, sigma_real_sqrt):
  """Differentiable FID of a batch against precomputed real statistics.

  Args:
    fake_features: (m, d), m >= 2.
    mu_real: (d,) mean of the real features.
    sigma_real_sqrt: (d, d) `sqrt_psd` of the real covariance (precomputed once, in float64).
  Returns:
    scalar ``‖μ_r − μ_f‖² + Tr Σ_r + Tr Σ_f − 2 ‖B Σ_r^{1/2}‖_* / sqrt(m−1)``.
  """
  m = fake_features.shape[0]
  mu_f = jnp.mean(fake_features, axis=0)
  b = fake_features - mu_f
  trace_r = jnp.sum(sigma_real_sqrt * sigma_real_sqrt)  # Tr Σ_r = ‖Σ_r^{1/2}‖_F²
  trace_f = jnp.sum(b * b) / (m - 1)
  trace_sqrt = jnp.sum(jnp.linalg.svd(b @ sigma_real_sqrt, compute_uv=False)) / jnp.sqrt(m - 1.0)
  return jnp.sum((mu_real - mu_f) ** 2) + trace_r + trace_f - 2.0 * trace_sqrt
