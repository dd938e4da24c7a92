"""The restricted checkpoint reader: bit-exact against torch.load, and it refuses code."""

import collections
import pickle

import numpy as np
import pytest

from jaxrecon.tools import torch_checkpoint


@pytest.fixture(scope="module")
def state_dict():
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 7, generator=gen)
  return collections.OrderedDict(
      conv=torch.randn(4, 3, 3, 3, generator=gen), ints=torch.arange(5), transposed=base.t(),
      half=torch.randn(3, generator=gen).half(), view=base[1:4, 2:6], scalar=torch.tensor(3.5),
      shared=base, param=torch.nn.Parameter(torch.randn(2, generator=gen)),
      flags=torch.tensor([True, False]))


@pytest.mark.parametrize("legacy", [False, True])
def test_bit_exact_against_torch_load(tmp_path, state_dict, legacy):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "ckpt.pth")
  torch.save(state_dict, path, _use_new_zipfile_serialization=not legacy)
  got = torch_checkpoint.read_checkpoint(path)
  assert list(got) == list(state_dict)
  for key, tensor in state_dict.items():
    want = tensor.detach().numpy()
    assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
    np.testing.assert_array_equal(got[key], want, err_msg=key)
  flat = torch_checkpoint.load_state_dict(path, use_torch=False)
  flat_torch = torch_checkpoint.load_state_dict(path, use_torch=True)
  assert flat.keys() == flat_torch.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_torch[key])


class _Payload:
  def __reduce__(self):
    return (print, ("this must never run",))


@pytest.mark.parametrize("legacy", [False, True])
def test_refuses_anything_but_tensors(tmp_path, legacy, capsys):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "evil.pth")
  torch.save({"weight": torch.zeros(2), "x": _Payload()}, path, _use_new_zipfile_serialization=not legacy)
  with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match="print"):
    torch_checkpoint.read_checkpoint(path)
  assert "must never run" not in capsys.readouterr().out


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "plain.pkl"
  path.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="magic"):
    torch_checkpoint.read_checkpoint(str(path))


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_checkpoint.read_checkpoint(str(tmp_path / "nope.pth"))
