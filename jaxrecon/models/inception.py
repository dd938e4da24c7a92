"""The FID InceptionV3, exactly as pytorch-fid builds it (``fid_inception_v3`` and ``InceptionV3`` in
mseitzer/pytorch-fid src/pytorch_fid/inception.py), in Flax.

This is torchvision's Inception3 with pytorch-fid's patches: FIDInceptionA/C/E_1 average-pool with
``count_include_pad=False``, FIDInceptionE_2 (Mixed_7c) max-pools, BatchNorm epsilon 1e-3, and the
1008-class layout of the TF 2015 graph. Preprocessing as pytorch-fid: images in [0, 1] are resized to
299x299 bilinearly without antialiasing (half-pixel, like ``F.interpolate(align_corners=False)``),
then mapped to [-1, 1]. The output is pool3, (B, 2048), the features FID is defined on.

It is differentiable end to end, so the FID loss (paper Eq. 40-47) can back-propagate through it.
Module names match pytorch-fid's state-dict keys (``Mixed_5b.branch1x1.conv.weight`` →
``Mixed_5b/branch1x1/conv/kernel``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrecon.models import layers

FID_INPUT_SIZE = 299


def _conv(features, kernel, strides=1, padding=0, name=None):
  return layers.ConvBN(features, kernel, strides, padding, epsilon=1e-3, name=name)


def _pool_branch(x, pool: str):
  if pool == "max":
    return layers.max_pool(x, 3, 1, padding=1)
  return layers.avg_pool(x, 3, 1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
  """FIDInceptionA (Mixed_5b/c/d)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv(64, 1, name="branch1x1")(x)
    b5 = _conv(48, 1, name="branch5x5_1")(x)
    b5 = _conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = _conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = _conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = _conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = _conv(self.pool_features, 1, name="branch_pool")(_pool_branch(x, "avg"))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """InceptionB (Mixed_6a), unpatched."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(384, 3, strides=2, name="branch3x3")(x)
    bd = _conv(64, 1, name="branch3x3dbl_1")(x)
    bd = _conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = _conv(96, 3, strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, layers.max_pool(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
  """FIDInceptionC (Mixed_6b/c/d/e)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv(192, 1, name="branch1x1")(x)
    b7 = _conv(c7, 1, name="branch7x7_1")(x)
    b7 = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = _conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = _conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = _conv(192, 1, name="branch_pool")(_pool_branch(x, "avg"))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """InceptionD (Mixed_7a), unpatched."""

  @nn.compact
  def __call__(self, x):
    b3 = _conv(192, 1, name="branch3x3_1")(x)
    b3 = _conv(320, 3, strides=2, name="branch3x3_2")(b3)
    b7 = _conv(192, 1, name="branch7x7x3_1")(x)
    b7 = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = _conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, layers.max_pool(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (Mixed_7b, pool='avg') and FIDInceptionE_2 (Mixed_7c, pool='max')."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = _conv(320, 1, name="branch1x1")(x)
    b3 = _conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          _conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = _conv(448, 1, name="branch3x3dbl_1")(x)
    bd = _conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          _conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    bp = _conv(192, 1, name="branch_pool")(_pool_branch(x, self.pool))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def fid_preprocess(images):
  """pytorch-fid's input transform: (B, H, W, 3) in [0, 1] -> (B, 299, 299, 3) in [-1, 1]."""
  b, _, _, c = images.shape
  resized = jax.image.resize(images, (b, FID_INPUT_SIZE, FID_INPUT_SIZE, c), "bilinear", antialias=False)
  return 2.0 * resized - 1.0


class FIDInceptionV3(nn.Module):
  """(B, H, W, 3) images in [0, 1] -> pool3 features (B, 2048).

  With ``return_blocks=True`` also returns the outputs of pytorch-fid's four blocks (64x73x73,
  192x35x35, 768x17x17, 2048) for block-by-block parity checks.
  """
  resize_input: bool = True
  include_head: bool = False  # the 1008-way classifier `fc` of the TF 2015 graph (unused by FID)

  @nn.compact
  def __call__(self, images, return_blocks: bool = False):
    x = fid_preprocess(images) if self.resize_input else 2.0 * images - 1.0
    x = _conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = _conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = _conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    block0 = x = layers.max_pool(x, 3, 2)
    x = _conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = _conv(192, 3, name="Conv2d_4a_3x3")(x)
    block1 = x = layers.max_pool(x, 3, 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    block2 = x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    pool3 = layers.global_avg_pool(x)
    if self.include_head:
      return pool3, nn.Dense(1008, name="fc")(pool3)
    if return_blocks:
      return pool3, (block0, block1, block2)
    return pool3
