"""Torch oracles for parity tests: torchvision/pytorch-fid/lpips models with random weights.

Only imported by tests that first call `pytest.importorskip("torch")`. torchvision's wheel here is a
CUDA build whose compiled ops fail to register beside CPU torch; declaring the two ops it checks for
lets the (pure-Python) model definitions import. No weights are downloaded: every network is built
with random weights, including random BatchNorm statistics, so parity covers every parameter.
"""

import functools
import os

import numpy as np
import torch


@functools.lru_cache(maxsize=None)
def torchvision():
  try:
    import torchvision as tv  # pylint: disable=g-import-not-at-top
    return tv
  except RuntimeError:
    pass
  lib = torch.library.Library("torchvision", "DEF")  # kept alive by the lru_cache below
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _keep_alive.append(lib)
  import torchvision as tv  # pylint: disable=g-import-not-at-top
  return tv


_keep_alive = []


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Random He-normal weights and random BN statistics, in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * np.sqrt(2.0 / fan_in))
        if m.bias is not None:
          m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
  return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
  return np.transpose(x_nchw.detach().numpy(), (0, 2, 3, 1))


def resnet18():
  return randomize_(torchvision().models.resnet18(weights=None), seed=1)


def fid_inception():
  """pytorch-fid's InceptionV3 (pool3 and the four blocks) with random weights."""
  torchvision()
  from pytorch_fid import inception as pfi  # pylint: disable=g-import-not-at-top

  def random_fid_state_dict(*unused_args, **unused_kwargs):
    model = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
    model.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    model.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    model.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    model.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    model.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    model.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    model.Mixed_7b = pfi.FIDInceptionE_1(1280)
    model.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return randomize_(model, seed=2).state_dict()

  original = pfi.load_state_dict_from_url
  pfi.load_state_dict_from_url = random_fid_state_dict  # the only network call in pytorch-fid
  try:
    model = pfi.InceptionV3([0, 1, 2, 3], resize_input=True, normalize_input=True).eval()
  finally:
    pfi.load_state_dict_from_url = original
  return model


# The checkpoint name of each layer inside pytorch-fid's four blocks (None: a parameter-free pool).
FID_BLOCK_LAYERS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3", None),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c", None))


def fid_state_dict(model) -> dict:
  """pytorch-fid wraps the torchvision layers in blocks; map back to the checkpoint's key names."""
  out = {}
  for block, block_names in zip((list(b.children()) for b in model.blocks), FID_BLOCK_LAYERS):
    for layer, name in zip(block, block_names):
      if name is None:
        continue
      for k, v in layer.state_dict().items():
        out[f"{name}.{k}"] = v.detach().numpy().copy()
  return out


def feature_net(arch: str):
  tv = torchvision()
  model = tv.models.alexnet(weights=None) if arch == "alexnet" else tv.models.vgg16(weights=None)
  return randomize_(model, seed=3)


def convert_via_pth(tmp_dir, model: str, state_dict: dict, legacy: bool = True):
  """Save `state_dict` as a .pth, convert it with jaxrecon's converter, load the variables back."""
  from jaxrecon.models import weights  # pylint: disable=g-import-not-at-top
  from jaxrecon.tools import convert_weights  # pylint: disable=g-import-not-at-top
  src, out = os.path.join(str(tmp_dir), f"{model}.pth"), os.path.join(str(tmp_dir), f"{model}.npz")
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, src,
             _use_new_zipfile_serialization=not legacy)
  convert_weights.convert(model, src, out, reader="numpy")
  return weights.load_variables(out, model)
