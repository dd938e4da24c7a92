"""ResNet-18 trunk: shapes and parity with torchvision's resnet18 on random weights."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecon.models import resnet
from tests import golden
from jaxrecon.models import weights


def test_output_shape_for_256_input():
  model = resnet.ResNet18()
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 256, 256, 3)))
  out = jax.eval_shape(lambda v, x: model.apply(v, x), shapes, jnp.zeros((2, 256, 256, 3)))
  assert out.shape == (2, 8, 8, 512)
  params = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert params == 11_689_512 - 513_000  # torchvision's count without the 1000-way fc


def test_imagenet_normalize():
  x = jnp.ones((1, 2, 2, 3)) * jnp.array(resnet.IMAGENET_MEAN)
  np.testing.assert_allclose(resnet.imagenet_normalize(x), 0.0, atol=1e-7)


def test_golden_fixture_without_torch():
  state_dict, inputs, outputs = golden.load("resnet18")
  variables = flax.traverse_util.unflatten_dict(weights.torch_to_flat("resnet18", state_dict), sep="/")
  got = np.asarray(resnet.ResNet18().apply(variables, jnp.asarray(inputs)))
  want = outputs["layer4"]
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_parity_with_torchvision(tmp_path):
  torch = pytest.importorskip("torch")
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top

  model_t = ref.resnet18()
  state = {k: v for k, v in ref.state_dict_numpy(model_t).items() if not k.startswith("fc.")}
  variables = ref.convert_via_pth(tmp_path, "resnet18", state)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 67, 93, 3)).astype(np.float32)  # odd sizes exercise the stride-2 padding
  with torch.no_grad():
    t = ref.nchw(x)
    t = model_t.maxpool(model_t.relu(model_t.bn1(model_t.conv1(t))))
    t = model_t.layer4(model_t.layer3(model_t.layer2(model_t.layer1(t))))
  expected = ref.nhwc(t)
  got = np.asarray(jax.jit(resnet.ResNet18().apply)(variables, jnp.asarray(x)))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=2e-4 * np.abs(expected).max(), rtol=0)
