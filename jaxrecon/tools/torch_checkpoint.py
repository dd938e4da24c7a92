"""Read PyTorch checkpoints into NumPy **without executing pickled code**.

`load_state_dict(path)` uses ``torch.load(weights_only=True)`` when torch is installed and otherwise a
small restricted reader (this module) that understands both on-disk formats:

* zip (torch >= 1.6): ``<root>/data.pkl`` plus one raw little-endian file per storage,
  ``<root>/data/<key>``;
* legacy (torch < 1.6, e.g. LPIPS's shipped heads and older model-zoo files): a stream of pickles
  (magic number, protocol, sys-info, the object, the storage keys) followed by each storage as an
  int64 element count and its raw bytes.

The unpickler accepts only tensors and plain containers: `collections.OrderedDict`, the tensor and
parameter rebuild functions, and the typed storage classes. Any other global in the file raises
`UnsafeCheckpointError` naming it — nothing is imported, nothing is called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint references a global outside the tensor-and-container allowlist."""


class _StorageType:
  """Stands in for ``torch.<X>Storage`` inside the pickle: only remembers the dtype."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args, **unused_kwargs):
  """``torch._utils._rebuild_tensor(_v2)``: a strided view into a flat storage, copied out."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return storage[storage_offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused_args, **unused_kwargs):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler with an allowlist of globals.

  Storages are resolved by ``load_storage(key, dtype, numel)`` and tensors built by
  ``rebuild(storage, offset, size, stride, ...)``; the legacy format swaps in lazy versions of both
  because its storages follow the pickled object in the stream.
  """

  def __init__(self, file, load_storage, rebuild=_rebuild_tensor):
    super().__init__(file)
    self._load_storage = load_storage
    self._rebuild = rebuild
    self._storages = {}

  def find_class(self, module, name):
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
      return self._rebuild
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafeCheckpointError(
        f"checkpoint references {module}.{name}, which is not a tensor or a plain container; "
        "refusing to load it (jaxrecon never executes code from weight files)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise UnsafeCheckpointError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"unsupported storage type {storage_type!r}")
    if key not in self._storages:
      self._storages[key] = self._load_storage(key, storage_type.dtype, numel)
    return self._storages[key]


class _LazyTensor:
  """A tensor of the legacy format, rebuilt once its storage has been read."""

  def __init__(self, key, *args):
    self.key, self.args = key, args


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one data.pkl in the zip checkpoint, found {len(pickles)}")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{root}byteorder" in names:
      byteorder = archive.read(f"{root}byteorder").decode().strip()

    def load_storage(key, dtype, numel):
      raw = archive.read(f"{root}data/{key}")
      array = np.frombuffer(raw, dtype=dtype.newbyteorder("<" if byteorder == "little" else ">"))
      return array[:numel].astype(dtype)

    return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _load_legacy(path: str):
  with open(path, "rb") as f:
    def load_plain():
      return _RestrictedUnpickler(f, load_storage=None).load()

    if load_plain() != _LEGACY_MAGIC:
      raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
    load_plain()  # protocol version
    load_plain()  # sys info (a plain dict)
    dtypes = {}

    def remember_dtype(key, dtype, numel):
      del numel
      dtypes[key] = dtype
      return key

    obj = _RestrictedUnpickler(f, remember_dtype, rebuild=_LazyTensor).load()
    storages = {}
    for key in load_plain():
      dtype = dtypes[str(key)]
      (count,) = struct.unpack("<q", f.read(8))
      raw = f.read(count * dtype.itemsize)
      storages[str(key)] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)

  def resolve(x):
    if isinstance(x, _LazyTensor):
      return _rebuild_tensor(storages[x.key], *x.args)
    if isinstance(x, dict):
      out = collections.OrderedDict() if isinstance(x, collections.OrderedDict) else {}
      out.update((k, resolve(v)) for k, v in x.items())
      return out
    if isinstance(x, (list, tuple)):
      return type(x)(resolve(v) for v in x)
    return x

  return resolve(obj)


def read_checkpoint(path: str):
  """Read a PyTorch checkpoint with the restricted NumPy reader (no torch needed).

  Returns:
    The stored object with every tensor as a `np.ndarray`.
  Raises:
    FileNotFoundError: the file does not exist.
    UnsafeCheckpointError: the file references anything but tensors and plain containers.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)


def load_state_dict(path: str, use_torch: bool | None = None) -> dict[str, np.ndarray]:
  """A flat ``{name: array}`` state dict from a ``.pth`` file, a ``.npz``, or a checkpoint dict.

  Args:
    path: the file.
    use_torch: True forces ``torch.load(weights_only=True)``, False the restricted reader; None uses
      torch when it imports.
  """
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if use_torch is None:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
      use_torch = True
    except ImportError:
      use_torch = False
  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top
    if not os.path.exists(path):
      raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    to_numpy = lambda t: t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
  else:
    obj = read_checkpoint(path)
    to_numpy = np.asarray
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  return {k: to_numpy(v) for k, v in obj.items() if not k.endswith("num_batches_tracked")}
