"""SSIM against scikit-image's structural_similarity; mask IoU against constructed overlaps."""

import jax
import numpy as np
import pytest

from jaxrecon.metrics import image


def _skimage_ssim(a, b):
  skimage_metrics = pytest.importorskip("skimage.metrics")
  return np.array([
      skimage_metrics.structural_similarity(x.astype(np.float64), y.astype(np.float64), gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                            channel_axis=-1)
      for x, y in zip(a, b)])


def _render_like_pair(rng, shape):
  """An 'image' and a noisy 'render' with a black background outside a blob, as in the protocol."""
  b, h, w, _ = shape
  yy, xx = np.mgrid[:h, :w]
  target = rng.random(shape).astype(np.float32)
  masks = np.stack([((yy - h * (0.3 + 0.4 * rng.random())) ** 2 + (xx - w / 2) ** 2 < (0.3 * h) ** 2)
                    for _ in range(b)]).astype(np.float32)[..., None]
  render = np.clip(target + 0.15 * rng.standard_normal(shape), 0, 1) * masks
  return render.astype(np.float32), target, masks


@pytest.mark.parametrize("shape", [(3, 32, 29, 3), (2, 64, 64, 3), (2, 11, 15, 1)])
def test_ssim_matches_skimage(shape):
  rng = np.random.default_rng(sum(shape))
  a = rng.random(shape).astype(np.float32)
  b = np.clip(a + 0.25 * rng.standard_normal(shape), 0, 1).astype(np.float32)
  b[0, : shape[1] // 2] = 0.0  # flat black rows: zero variance, the C1/C2-dominated regime
  ours = np.asarray(jax.jit(image.ssim)(a, b))
  expected = _skimage_ssim(a, b)
  assert ours.shape == (shape[0],)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_ssim_with_mask_is_ssim_against_masked_image():
  rng = np.random.default_rng(0)
  render, target, masks = _render_like_pair(rng, (3, 48, 40, 3))
  expected = _skimage_ssim(render, target * masks)
  np.testing.assert_allclose(image.ssim(render, target, masks), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(image.ssim(render, target, masks[..., 0]), expected, atol=1e-5, rtol=0)
  # Without the mask the black background is compared with the image, which must score lower.
  assert np.all(np.asarray(image.ssim(render, target)) < expected - 0.05)


def test_ssim_of_identical_images_is_one_and_edge_pixels_count():
  rng = np.random.default_rng(1)
  a = rng.random((2, 30, 30, 3)).astype(np.float32)
  np.testing.assert_allclose(image.ssim(a, a), 1.0, atol=1e-6)
  # The SSIM map skips a 5-pixel border, but the windows centred at column 5 still read column 0.
  b = a.copy()
  b[:, :, 0] = 1.0 - b[:, :, 0]
  assert np.all(np.asarray(image.ssim(a, b)) < 1.0 - 1e-4)
  np.testing.assert_allclose(image.ssim(a, b), _skimage_ssim(a, b), atol=1e-5, rtol=0)


def test_ssim_rejects_images_smaller_than_the_window():
  with pytest.raises(ValueError):
    image.ssim(np.zeros((1, 10, 20, 3), np.float32), np.zeros((1, 10, 20, 3), np.float32))


def test_mask_iou_of_binary_rectangles():
  pred = np.zeros((2, 20, 20), np.float32)
  gt = np.zeros((2, 20, 20), np.float32)
  pred[0, 0:10, 0:10] = 1   # 100 px
  gt[0, 5:15, 0:10] = 1     # 100 px, overlap 50 px -> 50 / 150
  pred[1, 0:4, 0:5] = 1     # 20 px inside gt's 100 px -> 20 / 100
  gt[1, 0:10, 0:10] = 1
  np.testing.assert_allclose(jax.jit(image.mask_iou)(pred, gt), [1 / 3, 0.2], rtol=1e-6)
  np.testing.assert_allclose(image.mask_iou(pred[..., None], gt[..., None]), [1 / 3, 0.2], rtol=1e-6)


def test_mask_iou_soft_and_empty():
  gt = np.zeros((3, 8, 8, 1), np.float32)
  gt[:, :4] = 1.0
  pred = np.full((3, 8, 8, 1), 0.5, np.float32)
  # Soft: inter = 0.5·32, union = Σ(p + g − p·g) = 32 + 32·0.5 = 48 -> 1/3.
  pred[1] = 0.0              # empty prediction vs non-empty gt -> 0
  gt[2], pred[2] = 0.0, 0.0  # both empty -> 1 by definition
  np.testing.assert_allclose(image.mask_iou(pred, gt), [1 / 3, 0.0, 1.0], rtol=1e-6)
