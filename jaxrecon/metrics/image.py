"""Image metrics of the CUB evaluation: SSIM and the soft mask IoU (paper §4.3, Table 1).

Both take NHWC batches and return one value per image, ``(B,)``; the benchmark number is the mean over
the test split. Both are pure ``jnp`` and jit-able.

* `ssim` is scikit-image's ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)``, computed by ``dm_pix.ssim``:
  an 11×11 Gaussian window (σ = 1.5, truncated at 3.5σ as skimage does), K1 = 0.01, K2 = 0.03, and
  the mean of the SSIM map over the *valid* region (the 5-pixel border, where the window would
  leave the image, is left out) and over channels. dm_pix convolves with ``mode='valid'`` while
  skimage filters the whole image with reflection and then crops 5 pixels per side; the interior
  values are the same, so the two agree to float32 rounding (the tests check this against skimage).
  dm_pix also clips variances at ε² and |covariance| at sqrt(var_a var_b), which only moves values
  that rounding had pushed outside their valid range.
* `mask_iou` is UMR's ``Σ(p·g) / Σ(p + g − p·g)`` on soft (not thresholded) masks.
"""

from __future__ import annotations

import dm_pix
import jax.numpy as jnp

SSIM_FILTER_SIZE = 11    # 2·int(3.5·σ + 0.5) + 1 with σ = 1.5: skimage's gaussian_weights window.
SSIM_FILTER_SIGMA = 1.5


def ssim(a, b, mask=None):
  """Per-image SSIM with skimage's Gaussian-window convention (see the module docstring).

  The evaluation protocol (paper §4.3, Table 1, which does not spell it out, and UMR's evaluation
  scripts, NVlabs/UMR experiments/, compute no SSIM; so this is jaxrecon's choice): `a` is the
  textured render from the predicted shape, camera and texture on a black background, `b` the
  input image and `mask` its ground-truth mask, so the score is ``SSIM(render, image · mask)`` at
  256×256, averaged over the test split. Only `b` is multiplied by `mask`; the render already has a
  black background.

  Args:
    a, b: (B, H, W, C) images in [0, 1] (data range 1), H, W >= 11.
    mask: optional (B, H, W, 1) or (B, H, W) soft mask multiplied into `b`.
  Returns:
    (B,) mean SSIM over the valid (H-10)×(W-10) region and the channels.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.ndim != 4 or a.shape != b.shape:
    raise ValueError(f"ssim needs two (B, H, W, C) images of one shape, got {a.shape} and {b.shape}")
  if min(a.shape[1:3]) < SSIM_FILTER_SIZE:
    raise ValueError(f"images must be at least {SSIM_FILTER_SIZE} pixels on a side, got {a.shape}")
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    b = b * (mask[..., None] if mask.ndim == 3 else mask)
  return dm_pix.ssim(a, b, max_val=1.0, filter_size=SSIM_FILTER_SIZE, filter_sigma=SSIM_FILTER_SIGMA,
                     k1=0.01, k2=0.03)


def mask_iou(pred, gt, eps: float = 1e-6):
  """Soft IoU per image, UMR's formula (NVlabs/UMR experiments/test_iou.py, ``evaluate``).

  ``Σ(p·g) / Σ(p + g − p·g)`` over the pixels. Neither mask is thresholded (UMR scores the soft
  rendered alpha against the soft resized ground-truth mask). The union is 0 only when both masks are
  (numerically) empty; such an image scores 1 (the prediction agrees exactly) instead of UMR's NaN.
  Any union above `eps` is divided exactly, with no bias from the guard.

  Args:
    pred, gt: (B, H, W) or (B, H, W, 1) masks in [0, 1].
    eps: a union at or below this counts as empty.
  Returns:
    (B,) IoU in [0, 1].
  """
  pred = jnp.asarray(pred, jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  if pred.shape != gt.shape or pred.ndim not in (3, 4):
    raise ValueError(f"masks must share a (B, H, W[, 1]) shape, got {pred.shape} and {gt.shape}")
  axes = tuple(range(1, pred.ndim))
  inter = jnp.sum(pred * gt, axis=axes)
  union = jnp.sum(pred + gt - pred * gt, axis=axes)
  nonempty = union > eps
  return jnp.where(nonempty, inter / jnp.where(nonempty, union, 1.0), 1.0)
