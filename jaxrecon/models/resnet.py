"""ResNet-18 trunk in torchvision's layout (the encoder's backbone: ``ResNetConv`` in NVlabs/UMR
nnutils/cub_mesh.py).

Module names mirror torchvision's state-dict keys with numeric indices joined by '_'
(``layer2.0.downsample.1.weight`` → ``layer2_0/downsample_1/scale``) so that
`jaxrecon.tools.convert_weights` maps weights by name. Input: ImageNet-normalised NHWC images;
output: the layer4 map, (B, 8, 8, 512) for 256² input.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxrecon.models import layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images):
  """(B, H, W, 3) in [0, 1] -> ImageNet-normalised (as torchvision's models expect)."""
  return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers with a residual connection (torchvision `BasicBlock`)."""
  features: int
  strides: int = 1
  batch_axis: str | None = None          # layers.BatchNorm: statistics over this shard_map axis

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name: functools.partial(layers.BatchNorm(batch_axis=self.batch_axis, name=name),
                                        use_running_average=not train)
    y = nn.Conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = nn.Conv(self.features, (3, 3), 1, padding=((1, 1), (1, 1)), use_bias=False, name="conv2")(y)
    y = bn("bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, padding="VALID", use_bias=False, name="downsample_0")(x)
      x = bn("downsample_1")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 without the classifier: (B, H, W, 3) normalised -> (B, H/32, W/32, 512)."""
  stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
  widths: tuple[int, ...] = (64, 128, 256, 512)
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.widths[0], (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
    x = layers.BatchNorm(batch_axis=self.batch_axis, name="bn1")(x, not train)
    x = layers.max_pool(nn.relu(x), 3, 2, padding=1)
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, self.batch_axis, name=f"layer{stage + 1}_{block}")(x, train)
    return x
