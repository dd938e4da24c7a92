"""Perceptual feature networks (AlexNet and VGG-16 `features`) and the distances built on them.

* `perceptual_distance`: UMR's texture loss, PerceptualSimilarity's uncalibrated ``net`` mode
  (NVlabs/UMR nnutils/perceptual_loss.py with ``model='net', net='alex'``; ``PNet`` in
  external/PerceptualSimilarity/models/networks_basic.py): Σ over the five relu stages of
  ``1 - spatial mean of the cosine similarity`` of channel-normalised features.
* `lpips_distance`: LPIPS's ``net-lin`` form, Σ over stages of the spatial mean of
  ``Σ_c w_c (n0 - n1)^2`` with the 6 kB linear heads given as arrays.

Both take images in [0, 1] (mapped to [-1, 1] then LPIPS's ScalingLayer). Module names follow
torchvision's ``features.<i>`` keys as ``features_<i>`` so weights convert by name.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxrecon.models import layers

# LPIPS's ScalingLayer, applied to inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision `features` layouts: (index, out_channels, kernel, stride, padding) for convs, "M" pools.
_ALEXNET = ((0, 64, 11, 4, 2), "M", (3, 192, 5, 1, 2), "M", (6, 384, 3, 1, 1), (8, 256, 3, 1, 1),
            (10, 256, 3, 1, 1))
_ALEXNET_TAPS = (0, 3, 6, 8, 10)            # relu1..relu5 follow these convs
_VGG16_TAPS = (2, 7, 14, 21, 28)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
STAGE_CHANNELS = {"alexnet": (64, 192, 384, 256, 256), "vgg16": (64, 128, 256, 512, 512)}


def _vgg16_layout():
  """torchvision's vgg16 `features`: 13 conv+relu pairs in 5 blocks, each closed by a 2x2 max pool."""
  layout, index = [], 0
  for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
    for _ in range(convs):
      layout.append((index, width, 3, 1, 1))
      index += 2  # conv, relu
    layout.append("M")
    index += 1
  return tuple(layout)


class FeatureNet(nn.Module):
  """AlexNet or VGG-16 `features` up to the last LPIPS stage: images -> list of 5 relu maps.

  Input is already scaled (see `lpips_input`): (B, H, W, 3) -> [(B, H_k, W_k, C_k)] * 5.
  """
  arch: str = "alexnet"

  @nn.compact
  def __call__(self, x):
    if self.arch == "alexnet":
      layout, taps, pool = _ALEXNET, _ALEXNET_TAPS, (3, 2)
    elif self.arch == "vgg16":
      layout, taps, pool = _vgg16_layout(), _VGG16_TAPS, (2, 2)
    else:
      raise ValueError(f"arch must be 'alexnet' or 'vgg16', got {self.arch!r}")
    outputs = []
    for item in layout:
      if len(outputs) == len(taps):
        break
      if item == "M":
        x = layers.max_pool(x, *pool)
        continue
      index, width, kernel, stride, padding = item
      x = nn.Conv(width, (kernel, kernel), stride, padding=layers.torch_padding(padding),
                  name=f"features_{index}")(x)
      x = nn.relu(x)
      if index in taps:
        outputs.append(x)
    return outputs


def lpips_input(images):
  """(B, H, W, 3) in [0, 1] -> 2x-1, then LPIPS's ScalingLayer."""
  return (2.0 * images - 1.0 - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)


def normalize_channels(features, eps: float = 1e-10):
  """LPIPS's `normalize_tensor`: divide by the channel L2 norm. (B, H, W, C) -> same."""
  return features / (jnp.sqrt(jnp.sum(features**2, axis=-1, keepdims=True)) + eps)


def perceptual_distance(features0: Sequence, features1: Sequence):
  """UMR's perceptual texture distance (Eq. 35's perceptual term; see the module docstring), per image.

  Args:
    features0, features1: the 5 stage maps of `FeatureNet` for the two images, each (B, H, W, C).
  Returns:
    (B,) Σ_k (1 - mean_hw Σ_c n0·n1).
  """
  total = 0.0
  for f0, f1 in zip(features0, features1):
    cosine = jnp.sum(normalize_channels(f0) * normalize_channels(f1), axis=-1)
    total = total + (1.0 - jnp.mean(cosine, axis=(1, 2)))
  return total


def lpips_distance(features0: Sequence, features1: Sequence, linear_weights: Sequence):
  """LPIPS ``net-lin`` distance, per image.

  Args:
    features0, features1: the 5 stage maps, each (B, H, W, C_k).
    linear_weights: 5 arrays (C_k,), the non-negative LPIPS heads (``lin{k}.model.1.weight``).
  Returns:
    (B,) Σ_k mean_hw Σ_c w_kc (n0 - n1)^2.
  """
  total = 0.0
  for f0, f1, w in zip(features0, features1, linear_weights):
    diff = (normalize_channels(f0) - normalize_channels(f1)) ** 2
    total = total + jnp.mean(jnp.sum(diff * jnp.reshape(w, (-1,)), axis=-1), axis=(1, 2))
  return total
