"""Building blocks shared by the feature networks: torch-compatible conv/BN/pooling.

Pretrained weights come from PyTorch, so these layers reproduce torch's arithmetic exactly: explicit
padding tuples (never 'SAME', which pads strided convolutions differently), torch's BatchNorm epsilon,
and average pooling with or without the padded zeros counted.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrecon.ops import collectives


def pair(x) -> tuple[int, int]:
  return (x, x) if isinstance(x, int) else tuple(x)


def torch_padding(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch's symmetric `padding=(ph, pw)` as a Flax padding spec."""
  ph, pw = pair(padding)
  return ((ph, ph), (pw, pw))


class BatchNorm(nn.Module):
  """`flax.linen.BatchNorm` over all axes but the last (its arithmetic and variable names: params
  scale/bias, batch_stats mean/var), whose cross-device statistics can be summed in device order.

  Written out (not flax's) for `batch_axis`: inside `jax.shard_map` over that axis, the batch's
  mean and mean square are averaged over devices with `collectives.pmean`, so the statistics and
  their gradients have the same bits however the devices are split over processes (flax's
  ``axis_name`` uses `lax.pmean`, whose order the runtime picks). None: the statistics of the
  array at hand (under jit's global view, XLA adds the all-reduce itself).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean, mean2 = jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)
      if self.batch_axis is not None and not self.is_initializing():
        mean, mean2 = collectives.pmean(jnp.stack([mean, mean2]), self.batch_axis)
      var = jnp.maximum(0.0, mean2 - jnp.square(mean))      # flax's use_fast_variance
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(x.dtype)


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
    x = BatchNorm(epsilon=self.epsilon, name="bn")(x, not train)
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
