"""Pretrained weights: the registry of convertible models, the torch→Flax name/layout mapping, and
the run-time loader of converted `.npz` files.

Run-time code only ever reads local `.npz` files written by
``python -m jaxrecon.tools.convert_weights``; nothing downloads. A missing file is an error that names
the file and the command that makes it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxrecon.models import inception
from jaxrecon.models import perceptual
from jaxrecon.models import resnet

META_PREFIX = "__meta__/"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """How to build, check and name one convertible model.

  Attributes:
    make_module: builds the Flax module (None for head-only weights such as LPIPS's linear layers).
    input_shape: a dummy NHWC input for `init`.
    drop: regex of torch keys that are deliberately not converted (e.g. classifiers).
    standard_files: the canonical file names, whose hex suffix is a sha256 prefix to verify.
  """
  make_module: Callable[[], flax.linen.Module] | None
  input_shape: tuple[int, ...] = (1, 64, 64, 3)
  drop: str = r"$^"
  standard_files: tuple[str, ...] = ()


SPECS = {
    "resnet18": WeightSpec(resnet.ResNet18, (1, 64, 64, 3), drop=r"^fc\.",
                           standard_files=("resnet18-f37072fd.pth", "resnet18-5c106cde.pth")),
    "fid_inception": WeightSpec(inception.FIDInceptionV3, (1, 75, 75, 3), drop=r"^fc\.",
                                standard_files=("pt_inception-2015-12-05-6726825d.pth",)),
    "alexnet": WeightSpec(lambda: perceptual.FeatureNet("alexnet"), (1, 64, 64, 3),
                          drop=r"^classifier\.",
                          standard_files=("alexnet-owt-7be5be79.pth", "alexnet-owt-4df8aa71.pth")),
    "vgg16": WeightSpec(lambda: perceptual.FeatureNet("vgg16"), (1, 32, 32, 3),
                        drop=r"^classifier\.",
                        standard_files=("vgg16-397923af.pth",)),
    "lpips_vgg": WeightSpec(None, standard_files=("vgg.pth",)),
    "lpips_alex": WeightSpec(None, standard_files=("alex.pth",)),
}


def convert_command(model: str, out: str) -> str:
  return f"python -m jaxrecon.tools.convert_weights --model {model} --src YOUR_FILE.pth --out {out}"


def template_variables(model: str):
  """Shapes/dtypes of the Flax variables of `model` ({'params': ..., 'batch_stats': ...})."""
  spec = SPECS[model]
  module = spec.make_module()
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(spec.input_shape, jnp.float32))


def _flax_path(torch_key: str, array: np.ndarray) -> tuple[str, tuple[str, ...]]:
  """Map a torch state-dict key to (collection, path) under jaxrecon's naming rule.

  Module paths keep torch's names, with a numeric index joined to the segment before it by '_'
  (``layer1.0.conv1`` → ``layer1_0/conv1``, ``features.3`` → ``features_3``). Leaves:
  conv/linear ``weight`` → ``kernel``; BatchNorm ``weight``/``bias`` → ``scale``/``bias`` in params and
  ``running_mean``/``running_var`` → ``mean``/``var`` in batch_stats.
  """
  *modules, leaf = torch_key.split(".")
  path: list[str] = []
  for segment in modules:
    if segment.isdigit() and path:
      path[-1] = f"{path[-1]}_{segment}"
    else:
      path.append(segment)
  if leaf == "running_mean":
    return "batch_stats", (*path, "mean")
  if leaf == "running_var":
    return "batch_stats", (*path, "var")
  if leaf == "weight":
    return "params", (*path, "kernel" if array.ndim >= 2 else "scale")
  if leaf == "bias":
    return "params", (*path, "bias")
  raise ValueError(f"unexpected parameter name {torch_key!r}")


def _flax_layout(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:   # conv OIHW -> HWIO
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
  if array.ndim == 2:   # linear (out, in) -> (in, out)
    return np.ascontiguousarray(array.T)
  return array


def torch_to_flat(model: str, state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Convert a torch state dict to jaxrecon's flat layout and check it against the model exactly.

  Returns:
    {"params/conv1/kernel": array, "batch_stats/bn1/mean": array, ...} in float32.
  Raises:
    ValueError: listing every missing, unexpected or wrongly shaped entry.
  """
  spec = SPECS[model]
  drop = re.compile(spec.drop)
  kept = {k: v for k, v in state_dict.items()
          if not drop.search(k) and not k.endswith("num_batches_tracked")}
  if spec.make_module is None:  # LPIPS heads: lin{k}.model.1.weight (1, C, 1, 1) -> lin{k} (C,)
    flat = {}
    for k, v in kept.items():
      match = re.fullmatch(r"lin(\d)\.model\.1\.weight", k)
      if match:
        flat[f"params/lin{match.group(1)}"] = np.asarray(v, np.float32).reshape(-1)
    arch = "vgg16" if model == "lpips_vgg" else "alexnet"
    expected = {f"params/lin{k}": (c,) for k, c in enumerate(perceptual.STAGE_CHANNELS[arch])}
  else:
    flat = {}
    for k, v in kept.items():
      collection, path = _flax_path(k, np.asarray(v))
      flat["/".join((collection, *path))] = _flax_layout(np.asarray(v, np.float32))
    template = flax.traverse_util.flatten_dict(template_variables(model), sep="/")
    expected = {k: tuple(v.shape) for k, v in template.items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  problems = [f"missing {k} {s}" for k, s in expected.items() if k not in got]
  problems += [f"unexpected {k} {s}" for k, s in got.items() if k not in expected]
  problems += [f"shape of {k}: file {got[k]} vs model {s}" for k, s in expected.items()
               if k in got and got[k] != s]
  if problems:
    raise ValueError(f"weights do not match the {model} model ({len(problems)} problems):\n  "
                     + "\n  ".join(problems[:30]))
  return flat


def save_npz(path: str, flat: dict[str, np.ndarray], metadata: dict[str, str]):
  arrays = dict(flat)
  arrays.update({META_PREFIX + k: np.array(str(v)) for k, v in metadata.items()})
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **arrays)


def load_variables(path: str, model: str):
  """Load converted weights for `model`: {'params': ..., 'batch_stats': ...} of jnp arrays.

  Raises:
    FileNotFoundError: naming the file and the convert command.
    ValueError: the file is for another model or does not match it.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"weights file {path} not found. jaxrecon never downloads weights: convert your PyTorch "
        f"checkpoint once with\n  {convert_command(model, path)}")
  with np.load(path, allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  stored_model = str(arrays.get(META_PREFIX + "model", ""))
  if stored_model != model:
    raise ValueError(f"{path} holds weights for {stored_model or 'an unknown model'!r}, not {model!r}")
  flat = {k: v for k, v in arrays.items() if not k.startswith(META_PREFIX)}
  if SPECS[model].make_module is not None:
    template = flax.traverse_util.flatten_dict(template_variables(model), sep="/")
    mismatched = sorted(set(template) ^ set(flat)) + sorted(
        k for k in template if k in flat and tuple(template[k].shape) != flat[k].shape)
    if mismatched:
      raise ValueError(f"{path} does not match the {model} model: {mismatched[:10]}")
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def metadata(path: str) -> dict[str, str]:
  """The metadata stored by the converter (model, source file name, source sha256)."""
  with np.load(path, allow_pickle=False) as data:
    return {k[len(META_PREFIX):]: str(data[k]) for k in data.files if k.startswith(META_PREFIX)}
