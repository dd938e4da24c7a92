r"""Convert a PyTorch checkpoint into jaxrecon's `.npz` weights, safely and checked.

  python -m jaxrecon.tools.convert_weights --model resnet18 --src resnet18-f37072fd.pth --out weights/resnet18.npz

* Reads zip and legacy `.pth` files without executing pickled code: ``torch.load(weights_only=True)``
  when torch is installed, else jaxrecon's restricted reader (`jaxrecon.tools.torch_checkpoint`).
* If the source has a standard file name with a hash suffix (``resnet18-f37072fd.pth``), the file's
  sha256 must start with that suffix.
* Checks every key and shape against the Flax model (missing, unexpected and mis-shaped entries are
  all listed), transposes to Flax layout, and writes a flat `.npz` with the model name, the source
  file name and its sha256 as metadata.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

from absl import app
from absl import flags

from jaxrecon.models import weights
from jaxrecon.tools import torch_checkpoint

_MODEL = flags.DEFINE_enum("model", None, sorted(weights.SPECS), "Which network the weights are for.")
_SRC = flags.DEFINE_string("src", None, "The PyTorch checkpoint (.pth, zip or legacy format) or .npz.")
_OUT = flags.DEFINE_string("out", None, "Where to write the converted .npz.")
_READER = flags.DEFINE_enum("reader", "auto", ["auto", "torch", "numpy"],
                            "auto: torch.load(weights_only=True) if torch imports, else the numpy reader.")


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def check_standard_hash(path: str, digest: str):
  """Raise if `path` has a hash-suffixed standard name whose suffix is not a prefix of `digest`."""
  match = re.search(r"-([0-9a-f]{8,64})\.pth$", os.path.basename(path))
  if match and not digest.startswith(match.group(1)):
    raise ValueError(f"{path}: sha256 {digest[:16]}... does not start with the {match.group(1)} in its "
                     "name: the file is corrupt or not the published checkpoint")


def convert(model: str, src: str, out: str, reader: str = "auto") -> dict[str, str]:
  """Convert `src` to `out` for `model`; returns the metadata written."""
  if model not in weights.SPECS:
    raise ValueError(f"--model must be one of {sorted(weights.SPECS)}, got {model!r}")
  if not os.path.exists(src):
    raise FileNotFoundError(f"--src {src} does not exist")
  digest = sha256(src)
  check_standard_hash(src, digest)
  use_torch = {"auto": None, "torch": True, "numpy": False}[reader]
  state_dict = torch_checkpoint.load_state_dict(src, use_torch=use_torch)
  flat = weights.torch_to_flat(model, state_dict)
  meta = {"model": model, "source_name": os.path.basename(src), "source_sha256": digest}
  weights.save_npz(out, flat, meta)
  return meta


def main(argv):
  del argv
  meta = convert(_MODEL.value, _SRC.value, _OUT.value, _READER.value)
  print(f"wrote {_OUT.value}: {meta}", file=sys.stdout)


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "src", "out"])
  app.run(main)
