"""AlexNet/VGG-16 feature nets and the perceptual distances, against the lpips package."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecon.models import perceptual
from jaxrecon.models import weights
from jaxrecon.tools import torch_checkpoint
from tests import golden


@pytest.mark.parametrize("arch,size,shapes", [
    ("alexnet", 64, [(15, 15, 64), (7, 7, 192), (3, 3, 384), (3, 3, 256), (3, 3, 256)]),
    ("vgg16", 32, [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (2, 2, 512)]),
])
def test_stage_shapes(arch, size, shapes):
  net = perceptual.FeatureNet(arch)
  variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  outs = jax.eval_shape(net.apply, variables, jnp.zeros((1, size, size, 3)))
  assert [o.shape[1:] for o in outs] == shapes
  assert [s[-1] for s in shapes] == list(perceptual.STAGE_CHANNELS[arch])


def test_cosine_distance_is_half_the_unit_squared_distance():
  rng = np.random.default_rng(0)
  f0 = [jnp.asarray(rng.normal(size=(2, 3, 4, c)), jnp.float32) for c in (4, 5)]
  f1 = [jnp.asarray(rng.normal(size=(2, 3, 4, c)), jnp.float32) for c in (4, 5)]
  ones = [jnp.ones((4,)), jnp.ones((5,))]
  np.testing.assert_allclose(perceptual.perceptual_distance(f0, f1),
                             0.5 * perceptual.lpips_distance(f0, f1, ones), rtol=1e-5)
  np.testing.assert_allclose(perceptual.perceptual_distance(f0, f0), 0.0, atol=1e-6)


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_golden_fixture_without_torch(arch):
  state_dict, inputs, outputs = golden.load(arch)
  variables = flax.traverse_util.unflatten_dict(weights.torch_to_flat(arch, state_dict), sep="/")
  net = perceptual.FeatureNet(arch)
  feats = net.apply(variables, perceptual.lpips_input(jnp.asarray(inputs)))
  got = perceptual.perceptual_distance([f[:2] for f in feats], [f[2:] for f in feats])
  np.testing.assert_allclose(got, outputs["perceptual_distance"], rtol=1e-4)


def _lpips_trunk_state(model_t) -> dict:
  """lpips keeps torchvision's feature indices inside its slices: net.sliceK.IDX.* -> features.IDX.*"""
  out = {}
  for k, v in model_t.net.state_dict().items():
    _, idx, leaf = k.split(".")
    out[f"features.{idx}.{leaf}"] = v.detach().numpy().copy()
  return out


@pytest.mark.parametrize("arch,lpips_net", [("alexnet", "alex"), ("vgg16", "vgg")])
def test_distances_match_lpips_package(tmp_path, arch, lpips_net):
  torch = pytest.importorskip("torch")
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top

  ref.torchvision()  # before lpips, which imports torchvision
  lpips = pytest.importorskip("lpips")
  torch.manual_seed(0)
  size = 64 if arch == "alexnet" else 32
  x0 = np.random.default_rng(1).uniform(size=(2, size, size, 3)).astype(np.float32)
  x1 = np.random.default_rng(2).uniform(size=(2, size, size, 3)).astype(np.float32)

  # UMR's uncalibrated 'net' mode == 1/2 of lpips without linear heads (see the cosine test).
  base_t = lpips.LPIPS(net=lpips_net, lpips=False, pnet_rand=True, verbose=False)
  ref.randomize_(base_t.net, seed=4)
  variables = ref.convert_via_pth(tmp_path, arch, _lpips_trunk_state(base_t))
  net = perceptual.FeatureNet(arch)
  feats = lambda x: net.apply(variables, perceptual.lpips_input(jnp.asarray(x)))
  with torch.no_grad():
    expected = base_t(ref.nchw(x0), ref.nchw(x1), normalize=True).numpy().reshape(-1)
  got = perceptual.perceptual_distance(feats(x0), feats(x1))
  np.testing.assert_allclose(got, 0.5 * expected, rtol=1e-4)

  # LPIPS net-lin with the heads the lpips wheel ships, read by our torch-free reader.
  lin_t = lpips.LPIPS(net=lpips_net, lpips=True, pnet_rand=True, verbose=False)
  lin_t.net.load_state_dict(base_t.net.state_dict())
  head_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{lpips_net}.pth")
  heads = weights.torch_to_flat(f"lpips_{lpips_net}", torch_checkpoint.load_state_dict(head_file, use_torch=False))
  linear = [heads[f"params/lin{k}"] for k in range(5)]
  with torch.no_grad():
    expected = lin_t(ref.nchw(x0), ref.nchw(x1), normalize=True).numpy().reshape(-1)
  np.testing.assert_allclose(perceptual.lpips_distance(feats(x0), feats(x1), linear), expected, rtol=1e-4)
