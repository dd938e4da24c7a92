"""FID InceptionV3: structure, preprocessing, and parity with pytorch-fid on random weights."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecon.models import inception
from jaxrecon.models import layers
from jaxrecon.models import weights
from tests import golden


def test_parameter_table_matches_pytorch_fid_layout():
  flat = flax.traverse_util.flatten_dict(weights.template_variables("fid_inception"), sep="/")
  # 94 conv+BN units (kernel, scale, bias, mean, var) = 470 entries; pytorch-fid's 472 adds fc.
  assert len(flat) == 470
  assert flat["params/Mixed_6e/branch7x7dbl_5/conv/kernel"].shape == (1, 7, 192, 192)
  assert flat["params/Mixed_7c/branch3x3dbl_3b/conv/kernel"].shape == (3, 1, 384, 384)
  assert flat["batch_stats/Conv2d_1a_3x3/bn/var"].shape == (32,)


def test_avg_pool_excludes_padding():
  x = jnp.ones((1, 4, 4, 1))
  np.testing.assert_allclose(layers.avg_pool(x, 3, 1, 1, count_include_pad=False), 1.0)
  corner = layers.avg_pool(x, 3, 1, 1, count_include_pad=True)[0, 0, 0, 0]
  np.testing.assert_allclose(corner, 4.0 / 9.0, rtol=1e-6)


def test_preprocess_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).uniform(size=(2, 64, 80, 3)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear", align_corners=False)
  expected = 2 * expected.numpy().transpose(0, 2, 3, 1) - 1
  np.testing.assert_allclose(inception.fid_preprocess(jnp.asarray(x)), expected, atol=2e-6)


def _relative_error(got, want):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.slow
def test_golden_fixture_without_torch():
  state_dict, inputs, outputs = golden.load("fid_inception")
  variables = flax.traverse_util.unflatten_dict(weights.torch_to_flat("fid_inception", state_dict), sep="/")
  pool3, blocks = inception.FIDInceptionV3().apply(variables, jnp.asarray(inputs), return_blocks=True)
  for k, block in enumerate(blocks):
    assert _relative_error(block.mean(axis=(1, 2)), outputs[f"block{k}_mean"]) < 1e-5
  assert _relative_error(pool3, outputs["pool3"]) < 1e-5


@pytest.mark.slow
def test_parity_with_pytorch_fid(tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top

  model_t = ref.fid_inception()
  variables = ref.convert_via_pth(tmp_path, "fid_inception", ref.fid_state_dict(model_t), legacy=False)
  x = np.random.default_rng(1).uniform(size=(2, 64, 80, 3)).astype(np.float32)  # upsampled to 299
  with torch.no_grad():
    expected = model_t(ref.nchw(x))
  pool3, blocks = jax.jit(lambda v, x: inception.FIDInceptionV3().apply(v, x, return_blocks=True))(
      variables, jnp.asarray(x))
  for got, want in zip((*blocks, pool3[:, None, None, :]), expected):
    assert _relative_error(got, ref.nhwc(want)) < 1e-5
