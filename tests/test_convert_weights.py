"""The weight converter CLI and the run-time loader: hashes, key/shape checks, clear errors."""

import hashlib
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecon.models import resnet
from jaxrecon.models import weights
from jaxrecon.tools import convert_weights


def _hash_named(tmp_path, stem, save):
  """Save with `save(path)`, then rename to the standard `<stem>-<sha256[:8]>.pth` form."""
  tmp = str(tmp_path / "tmp.pth")
  save(tmp)
  digest = hashlib.sha256(open(tmp, "rb").read()).hexdigest()
  path = str(tmp_path / f"{stem}-{digest[:8]}.pth")
  os.rename(tmp, path)
  return path


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
  torch = pytest.importorskip("torch")
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top
  model = ref.resnet18()
  path = _hash_named(tmp_path_factory.mktemp("w"), "resnet18",
                     lambda p: torch.save(model.state_dict(), p, _use_new_zipfile_serialization=False))
  return path, model


def test_convert_and_load_round_trip(tmp_path, resnet_checkpoint):
  src, _ = resnet_checkpoint
  out_numpy, out_torch = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  meta = convert_weights.convert("resnet18", src, out_numpy, reader="numpy")
  convert_weights.convert("resnet18", src, out_torch, reader="torch")
  assert meta["source_sha256"].startswith(os.path.basename(src).split("-")[1][:8])
  assert weights.metadata(out_numpy) == meta
  a, b = np.load(out_numpy), np.load(out_torch)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  variables = weights.load_variables(out_numpy, "resnet18")
  out = resnet.ResNet18().apply(variables, jnp.zeros((1, 64, 64, 3)))
  assert out.shape == (1, 2, 2, 512) and np.all(np.isfinite(out))


def test_hash_mismatch_is_refused(tmp_path, resnet_checkpoint):
  src, _ = resnet_checkpoint
  renamed = str(tmp_path / "resnet18-00000000.pth")
  with open(src, "rb") as f, open(renamed, "wb") as g:
    g.write(f.read())
  with pytest.raises(ValueError, match="does not start with the 00000000"):
    convert_weights.convert("resnet18", renamed, str(tmp_path / "x.npz"))


def test_wrong_model_lists_problems(tmp_path, resnet_checkpoint):
  src, _ = resnet_checkpoint
  with pytest.raises(ValueError, match=r"do not match the alexnet model \(\d+ problems\)"):
    convert_weights.convert("alexnet", src, str(tmp_path / "x.npz"))


def test_mapping_rule_and_layouts():
  assert weights._flax_path("layer2.0.downsample.1.running_var", np.zeros(3)) == (
      "batch_stats", ("layer2_0", "downsample_1", "var"))
  assert weights._flax_path("Mixed_5b.branch1x1.bn.weight", np.zeros(3)) == (
      "params", ("Mixed_5b", "branch1x1", "bn", "scale"))
  assert weights._flax_path("features.3.weight", np.zeros((2, 2, 1, 1))) == (
      "params", ("features_3", "kernel"))
  oihw = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  np.testing.assert_array_equal(weights._flax_layout(oihw)[1, 2, 0, 1], oihw[1, 0, 1, 2])


def test_loader_errors_name_the_file_and_the_command(tmp_path):
  missing = str(tmp_path / "fid.npz")
  with pytest.raises(FileNotFoundError, match=r"(?s)fid\.npz.*convert_weights --model fid_inception"):
    weights.load_variables(missing, "fid_inception")
  other = str(tmp_path / "heads.npz")
  weights.save_npz(other, {"params/lin0": np.ones(64)}, {"model": "lpips_vgg"})
  with pytest.raises(ValueError, match="lpips_vgg"):
    weights.load_variables(other, "resnet18")


def test_cli_converts_lpips_heads(tmp_path):
  lpips = pytest.importorskip("lpips", exc_type=ImportError)
  head_file = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
  out = str(tmp_path / "lpips_vgg.npz")
  result = subprocess.run(
      [sys.executable, "-m", "jaxrecon.tools.convert_weights", "--model=lpips_vgg", f"--src={head_file}",
       f"--out={out}", "--reader=numpy"], capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  heads = weights.load_variables(out, "lpips_vgg")
  assert [heads["params"][f"lin{k}"].shape for k in range(5)] == [(64,), (128,), (256,), (512,), (512,)]
