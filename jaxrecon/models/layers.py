"""Building blocks shared by the feature networks: torch-compatible conv/BN/pooling.

Pretrained weights come from PyTorch, so these layers reproduce torch's arithmetic exactly: explicit
padding tuples (never 'SAME', which pads strided convolutions differently), torch's BatchNorm epsilon,
and average pooling with or without the padded zeros counted.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def pair(x) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else tuple(x)


def torch_padding(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch's symmetric `padding=(ph, pw)` as a Flax padding spec."""
  ph, pw = pair(padding)
  return ((ph, ph), (pw, pw))


class ConvBN(nn.Module):
  """Conv (no bias) → BatchNorm → optional ReLU, with torch's padding and BN epsilon.

  Submodule names `conv` and `bn` match torch's `BasicConv2d` so weights map by name.
  """
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  epsilon: float = 1e-3
  relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, pair(self.kernel_size), pair(self.strides),
                padding=torch_padding(self.padding), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.epsilon, name="bn")(x)
    return nn.relu(x) if self.relu else x


def max_pool(x, window: int, stride: int, padding: int = 0):
  """torch `max_pool2d` (padding with -inf, floor mode): (B, H, W, C) -> (B, H', W', C)."""
  return nn.max_pool(x, (window, window), (stride, stride), padding=torch_padding(padding))


def avg_pool(x, window: int, stride: int, padding: int = 0, count_include_pad: bool = True):
  """torch `avg_pool2d`: (B, H, W, C) -> (B, H', W', C)."""
  return nn.avg_pool(x, (window, window), (stride, stride), padding=torch_padding(padding),
                     count_include_pad=count_include_pad)


def global_avg_pool(x):
  """(B, H, W, C) -> (B, C)."""
  return jnp.mean(x, axis=(1, 2))
