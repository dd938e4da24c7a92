"""The reconstruction network (paper Fig. 5): an encoder F_e and the decoders D_shape, D_cam, D_flow
and the paper's D_var, plus the discriminator D of Eq. 37-39.

The encoder and D_shape, D_cam, D_flow follow UMR's stage-2 ``MeshNet`` (NVlabs/UMR
nnutils/cub_mesh.py, whose class names are cited below; its building blocks are in
nnutils/net_blocks.py).

Shapes for a batch of B images of size S (UMR: S = 256, 128x256 UV map, 8 camera hypotheses):

  encoder     image (B, S, S, 3) in [0, 1] -> feature (B, 200)
  D_shape     feature -> half offsets (B, 337, 3); vertices = symmetrize(template + offsets) (Eq. 2-3)
  D_cam       feature -> hypotheses (B, H, 7) = [s, tx, ty, q] and probabilities (B, H)
  D_flow      feature -> UV flow (B, 128, 256, 2): image coordinates in [-1, 1] (tanh), Eq. 7-8
  D_var       feature -> variance (B, S, S, 1) > 0, exactly 1 at initialisation (see `VarianceDecoder`)

Widths are fields so tests and CPU configs can shrink the network; the defaults are UMR's.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon.models import layers
from jaxrecon.models import resnet


@flax.struct.dataclass
class Prediction:
  """What the network predicts for a batch (a pytree)."""
  vertices: jax.Array          # (B, V, 3) canonical frame, symmetric
  half_offsets: jax.Array      # (B, V_half, 3) D_shape's output δV (Eq. 3)
  cam_hypotheses: jax.Array    # (B, H, 7)
  cam_probs: jax.Array         # (B, H)
  uv_flow: jax.Array           # (B, Hu, Wu, 2) image coordinates in [-1, 1]
  variance: jax.Array | None   # (B, S, S, 1) or None when D_var is off


def _bn(train: bool, batch_axis: str | None, name=None):
  # torch's BatchNorm defaults (momentum 0.1 -> Flax 0.9, eps 1e-5), as UMR.
  return functools.partial(layers.BatchNorm(batch_axis=batch_axis, name=name), use_running_average=not train)


def _normal_init(std: float):
  return nn.initializers.normal(stddev=std)


class FCStack(nn.Module):
  """UMR's ``fc_stack``: [Linear, (BatchNorm), LeakyReLU] x n."""
  features: int
  layers: int = 2
  use_bn: bool = True
  slope: float = 0.2
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.layers):
      x = nn.Dense(self.features, kernel_init=_normal_init(0.02), name=f"dense_{i}")(x)
      if self.use_bn:
        x = _bn(train, self.batch_axis, name=f"bn_{i}")(x)
      x = nn.leaky_relu(x, self.slope)
    return x


class Encoder(nn.Module):
  """F_e: ResNet-18 → 4x4/2 conv + BN + LeakyReLU(0.2) → two FC layers → feature (``Encoder``)."""
  feature_dim: int = 200
  conv_channels: int = 256
  resnet_widths: tuple[int, ...] = (64, 128, 256, 512)
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, images, train: bool):
    x = resnet.ResNet18(widths=self.resnet_widths, batch_axis=self.batch_axis, name="resnet")(resnet.imagenet_normalize(images), train)
    if x.shape[1] < 2:
      raise ValueError(f"images of {images.shape[1]} px leave a {x.shape[1]}x{x.shape[2]} ResNet map; the "
                       "encoder's 4x4 stride-2 conv needs at least 2x2, i.e. images of at least 64 px")
    x = nn.Conv(self.conv_channels, (4, 4), 2, padding=((1, 1), (1, 1)), kernel_init=_normal_init(0.02),
                name="enc_conv1")(x)
    x = nn.leaky_relu(_bn(train, self.batch_axis, name="enc_bn1")(x), 0.2)
    x = x.reshape(x.shape[0], -1)
    return FCStack(self.feature_dim, 2, batch_axis=self.batch_axis, name="enc_fc")(x, train)


class ShapeDecoder(nn.Module):
  """D_shape: feature → offsets of the free vertices (B, V_half, 3), init N(0, 1e-4) (``ShapePredictor``)."""
  num_half_vertices: int

  @nn.compact
  def __call__(self, feature):
    out = nn.Dense(self.num_half_vertices * 3, kernel_init=_normal_init(1e-4),
                   bias_init=nn.initializers.zeros, name="shape_fc")(feature)
    return out.reshape(feature.shape[0], self.num_half_vertices, 3)


class CameraMultiplex(nn.Module):
  """D_cam: H weak-perspective hypotheses and their probabilities (``MultiCamPredictor``, ``Camera``).

  Each hypothesis: scale ``relu(fc + 1) + 1e-12``, translation, a unit quaternion and a logit;
  probabilities are the softmax of the logits. The quaternion biases start at `initial_quaternions`
  ((H, 4) as nested tuples, e.g. `camera.view_quaternions` of H azimuths) or, when None, all at the
  identity as UMR.
  """
  num_hypotheses: int = 8
  width: int = 200
  initial_quaternions: tuple | None = None
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, feature, train: bool):
    trunk = FCStack(self.width, 2, use_bn=False, slope=0.1, name="trunk")(feature, train)
    cams, logits = [], []
    starts = self.initial_quaternions or ((1.0, 0.0, 0.0, 0.0),) * self.num_hypotheses
    if len(starts) != self.num_hypotheses:
      raise ValueError(f"{len(starts)} initial quaternions for {self.num_hypotheses} hypotheses")
    for h in range(self.num_hypotheses):
      x = FCStack(self.width, 2, batch_axis=self.batch_axis, name=f"hypothesis_{h}")(trunk, train)
      start = lambda *_, q=starts[h]: jnp.array(q, jnp.float32)
      quat = nn.Dense(4, kernel_init=_normal_init(0.02), bias_init=start, name=f"quat_{h}")(x)
      scale = nn.relu(nn.Dense(1, kernel_init=_normal_init(0.02), name=f"scale_{h}")(x) + 1.0) + 1e-12
      trans = nn.Dense(2, kernel_init=_normal_init(0.02), name=f"trans_{h}")(x)
      logits.append(nn.Dense(1, kernel_init=_normal_init(0.02), name=f"logit_{h}")(x))
      cams.append(jnp.concatenate([scale, trans, camera.quat_normalize(quat)], axis=-1))
    return jnp.stack(cams, axis=1), jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)


class UpConvDecoder(nn.Module):
  """UMR's ``decoder2d``: FC → (h0, w0, C) → n × [upsample 2x, reflect-pad conv3 + LReLU,
  conv3 + BN + LReLU] with channels halving → conv3 to `out_channels` (NVlabs/UMR nnutils/net_blocks.py,
  used by ``TexturePredictorUV`` in nnutils/cub_mesh.py)."""
  base_shape: tuple[int, int]
  base_channels: int
  num_stages: int
  out_channels: int
  zero_init_output: bool = False
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, feature, train: bool):
    h0, w0 = self.base_shape
    x = FCStack(h0 * w0 * self.base_channels, 2, batch_axis=self.batch_axis, name="fc")(feature, train)
    x = x.reshape(feature.shape[0], h0, w0, self.base_channels)
    channels = self.base_channels
    for stage in range(self.num_stages):
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
      channels = max(channels // 2, 8)
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
      x = nn.leaky_relu(nn.Conv(channels, (3, 3), padding="VALID", kernel_init=_normal_init(0.02),
                                name=f"conv_{stage}_a")(x), 0.2)
      x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_normal_init(0.02),
                  name=f"conv_{stage}_b")(x)
      x = nn.leaky_relu(_bn(train, self.batch_axis, name=f"bn_{stage}")(x), 0.2)
    init = nn.initializers.zeros if self.zero_init_output else _normal_init(0.02)
    return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init,
                   bias_init=nn.initializers.zeros, name="out")(x)


class VarianceDecoder(nn.Module):
  """D_var, the paper's addition (§3.2): a positive variance map over the sampling image.

  The paper gives no architecture. Ours: the texture-flow decoder's structure at a coarse
  resolution, bilinearly upsampled to the image size, mapped to ``exp(max_log · tanh(s))`` so the map
  stays in [e^-max_log, e^max_log]; the last conv is zero-initialised, so D_var starts at exactly 1
  and the sampler's variance branch starts as plain bilinear sampling.
  """
  image_size: int
  base_channels: int = 64
  num_stages: int = 3
  max_log: float = 2.0
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, feature, train: bool):
    s = UpConvDecoder((4, 4), self.base_channels, self.num_stages, 1, zero_init_output=True,
                      batch_axis=self.batch_axis, name="decoder")(feature, train)
    s = jax.image.resize(s, (s.shape[0], self.image_size, self.image_size, 1), "bilinear")
    return jnp.exp(self.max_log * jnp.tanh(s))


class Reconstructor(nn.Module):
  """The full network. `template_half` is V_temp's free vertices (V_half, 3), a constant."""
  template_half: Any                       # np.ndarray (V_half, 3)
  image_size: int = 256
  feature_dim: int = 200
  encoder_conv_channels: int = 256
  resnet_widths: tuple[int, ...] = (64, 128, 256, 512)
  num_hypotheses: int = 8
  camera_width: int = 200
  flow_base_channels: int = 256
  flow_stages: int = 5
  use_variance: bool = True
  variance_base_channels: int = 64
  variance_stages: int = 3
  num_side: int = 305                      # mirrored vertices (mesh.SymmetricMesh.num_side)
  initial_quaternions: tuple | None = None  # D_cam's starting rotations (CameraMultiplex)
  # BatchNorm statistics summed in device order over this shard_map axis (layers.BatchNorm); None:
  # jit's global view, where XLA adds the cross-device reduction.
  batch_axis: str | None = None

  @nn.compact
  def __call__(self, images, train: bool = False, cameras_only: bool = False):
    """(B, S, S, 3) -> `Prediction`; with `cameras_only`, just D_cam's (hypotheses (B, H, 7), probs
    (B, H)), skipping the other decoders (the flip-consistency term needs no more)."""
    feature = Encoder(self.feature_dim, self.encoder_conv_channels, self.resnet_widths, self.batch_axis,
                      name="encoder")(images, train)
    hypotheses, probs = CameraMultiplex(self.num_hypotheses, self.camera_width, self.initial_quaternions,
                                        self.batch_axis, name="camera")(feature, train)
    if cameras_only:
      return hypotheses, probs
    template = jnp.asarray(np.asarray(self.template_half), jnp.float32)
    offsets = ShapeDecoder(template.shape[0], name="shape")(feature)
    vertices = mesh_lib.symmetrize(template + offsets, self.num_side)
    flow = UpConvDecoder((4, 8), self.flow_base_channels, self.flow_stages, 2, batch_axis=self.batch_axis,
                         name="flow")(feature, train)
    variance = None
    if self.use_variance:
      variance = VarianceDecoder(self.image_size, self.variance_base_channels, self.variance_stages,
                                 batch_axis=self.batch_axis, name="variance")(feature, train)
    return Prediction(vertices=vertices, half_offsets=offsets, cam_hypotheses=hypotheses,
                      cam_probs=probs, uv_flow=jnp.tanh(flow), variance=variance)


class Discriminator(nn.Module):
  """D of Eq. 37-39: strided 4x4 convs with LeakyReLU(0.2) (no normalisation, so the WGAN-GP
  gradient penalty of Eq. 39 is well defined per sample), then a linear logit. (B, S, S, C) -> (B,)."""
  base_channels: int = 32
  num_layers: int = 4

  @nn.compact
  def __call__(self, images):
    x = images
    for i in range(self.num_layers):
      x = nn.Conv(self.base_channels * 2**i, (4, 4), 2, padding=((1, 1), (1, 1)), name=f"conv_{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Dense(1, name="logit")(x.reshape(x.shape[0], -1))[:, 0]
