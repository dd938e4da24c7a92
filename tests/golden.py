"""Seeded weights and the committed golden outputs, so parity is checked even without torch.

Every weight is a pure function of its torch state-dict key and shape (a legacy NumPy stream seeded
with the key's crc32, whose bit stream NumPy guarantees), so the fixture stores only key names,
shapes, inputs and the reference outputs. `tests/fixtures/make_golden.py` (needs torch) writes it.
"""

import os
import zlib

import numpy as np

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "golden_features.npz")


def seeded_weight(key: str, shape) -> np.ndarray:
  rng = np.random.RandomState(zlib.crc32(key.encode()))
  shape = tuple(int(s) for s in shape)
  if key.endswith("running_var"):
    return (1.0 + 0.2 * rng.random_sample(shape)).astype(np.float32)
  if key.endswith("running_mean") or key.endswith("bias"):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  if len(shape) == 1:  # BatchNorm scale
    return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
  fan_in = int(np.prod(shape[1:]))
  return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def seeded_state_dict(names, shapes) -> dict:
  return {str(n): seeded_weight(str(n), s) for n, s in zip(names, shapes)}


def load(model: str):
  """(state_dict, inputs in [0, 1] NHWC, {output name: array}) for `model` from the fixture."""
  with np.load(FIXTURE, allow_pickle=False) as data:
    names = data[f"{model}/names"]
    shapes = [tuple(s[s >= 0]) for s in data[f"{model}/shapes"]]
    inputs = data[f"{model}/inputs"].astype(np.float32) / 255.0
    outputs = {k.split("/", 2)[2]: data[k] for k in data.files if k.startswith(f"{model}/out/")}
  return seeded_state_dict(names, shapes), inputs, outputs
