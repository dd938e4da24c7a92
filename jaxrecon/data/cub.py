"""CUB-200-2011 in CMR's annotation format, preprocessed as CMR/UMR do (NVlabs/UMR data/cub.py and
data/base.py, ``BaseDataset.forward_img``; akanazawa/cmr data/cub.py and data/base.py).

Expected layout (all user-supplied; nothing is downloaded):

  <cub_dir>/images/<class folder>/<image>.jpg              CUB-200-2011's images
  <cache_dir>/data/{train,val,test}_cub_cleaned.mat        CMR's annotations (struct array `images`:
                                                            rel_path, mask, bbox.{x1,y1,x2,y2}, parts 3x15)
  <cache_dir>/sfm/anno_{split}.mat                         optional SfM cameras (`sfm_anno`)
  <scops_dir>/<class folder>/<image stem>_<index>.npy      optional SCOPS part maps, 256x256x5 (H, W, C)

Preprocessing (`preprocess`), in CMR's `forward_img` order: 1-indexed → 0-indexed bbox and visible
keypoints; pad the bbox by 5% of its size per side (plus ±5% jitter per side on train); square it;
crop with white fill for the image and 0 for the mask; bilinear resize to the output size (the mask
too, so its edges are soft); horizontal flip with CUB's keypoint permutation (train only by default —
UMR also flips at test time, available as ``flip='always_random'``); keypoints normalised as
``2x/S − 1`` with invisible ones zeroed. SCOPS maps are aligned to the un-jittered crop (as UMR
precomputes them); here they are warped by the same jitter, which UMR skips (its
``BaseDataset.forward_img`` loads the SCOPS map after cropping the image and does not crop it).
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import numpy as np
from PIL import Image
import grain.python as grain
import scipy.io

from jaxrecon.data import synthetic

SPLITS = ("train", "val", "test")
KEYPOINT_FLIP = synthetic.KEYPOINT_FLIP


@dataclasses.dataclass(frozen=True)
class Annotation:
  """One image's CMR annotation, converted to 0-indexed pixel coordinates.

  Attributes:
    index: position in the split's .mat file (SCOPS files are named with it).
    rel_path: path under <cub_dir>/images.
    mask: (H, W) float32 in [0, 1].
    bbox: (4,) float64 ``x1, y1, x2, y2``, 0-indexed, inclusive.
    keypoints: (15, 3) float64 ``x, y, visible``, 0-indexed pixels.
    sfm: optional dict of ``scale``, ``trans`` (2,), ``rot`` (3, 3).
  """
  index: int
  rel_path: str
  mask: np.ndarray
  bbox: np.ndarray
  keypoints: np.ndarray
  sfm: dict | None = None


def _require(path: str, what: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: expected {what} (see the README, 'Bringing CUB-200-2011')")


def read_annotations(cache_dir: str, split: str) -> list[Annotation]:
  """Read CMR's `<cache_dir>/data/<split>_cub_cleaned.mat` (and the SfM file when present)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  path = os.path.join(cache_dir, "data", f"{split}_cub_cleaned.mat")
  _require(path, f"CMR's {split} annotations (a struct array 'images')")
  data = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  if "images" not in data:
    raise ValueError(f"{path} has no 'images' struct array (keys: {sorted(k for k in data if not k.startswith('__'))})")
  images = np.atleast_1d(data["images"])
  sfm_path = os.path.join(cache_dir, "sfm", f"anno_{split}.mat")
  sfm = None
  if os.path.exists(sfm_path):
    sfm = np.atleast_1d(scipy.io.loadmat(sfm_path, squeeze_me=True, struct_as_record=False)["sfm_anno"])
    if len(sfm) != len(images):
      raise ValueError(f"{sfm_path} has {len(sfm)} entries but {path} has {len(images)}")
  out = []
  for i, record in enumerate(images):
    bbox = np.array([record.bbox.x1, record.bbox.y1, record.bbox.x2, record.bbox.y2], np.float64) - 1.0
    parts = np.asarray(record.parts, np.float64).reshape(3, 15).T.copy()
    visible = parts[:, 2] > 0
    parts[visible, :2] -= 1.0
    out.append(Annotation(
        index=i, rel_path=str(record.rel_path), mask=np.asarray(record.mask, np.float32), bbox=bbox,
        keypoints=parts,
        sfm=None if sfm is None else {"scale": float(sfm[i].scale), "trans": np.asarray(sfm[i].trans, np.float64),
                                      "rot": np.asarray(sfm[i].rot, np.float64)}))
  return out


def scops_path(scops_dir: str, annotation: Annotation) -> str:
  folder, name = os.path.split(annotation.rel_path)
  return os.path.join(scops_dir, folder, f"{os.path.splitext(name)[0]}_{annotation.index}.npy")


def perturb_bbox(bbox, padding: float, jitter: float, rng: np.random.Generator | None):
  """CMR's `peturb_bbox`: pad each side by padding·size, plus (1 − 2U)·jitter·size per side."""
  width, height = bbox[2] - bbox[0] + 1, bbox[3] - bbox[1] + 1
  size = np.array([width, height, width, height])
  noise = np.zeros(4) if rng is None or jitter == 0 else (1 - 2 * rng.uniform(size=4)) * jitter
  sign = np.array([-1.0, -1.0, 1.0, 1.0])
  return bbox + sign * (padding + noise) * size


def square_bbox(bbox) -> np.ndarray:
  """CMR's `square_bbox`: round, then grow the shorter side symmetrically."""
  box = [int(round(c)) for c in bbox]
  width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
  side = max(width, height)
  box[0] -= int(round((side - width) / 2.0))
  box[1] -= int(round((side - height) / 2.0))
  return np.array([box[0], box[1], box[0] + side - 1, box[1] + side - 1], np.int64)


def crop(image, box, fill: float):
  """Crop inclusive `box` (x1, y1, x2, y2), filling outside the image with `fill`: (H, W, C) -> (h, w, C)."""
  x1, y1, x2, y2 = (int(v) for v in box)
  out = np.full((y2 - y1 + 1, x2 - x1 + 1, image.shape[2]), fill, np.float32)
  sx1, sy1 = max(x1, 0), max(y1, 0)
  sx2, sy2 = min(x2, image.shape[1] - 1), min(y2, image.shape[0] - 1)
  if sx1 <= sx2 and sy1 <= sy2:
    out[sy1 - y1: sy2 - y1 + 1, sx1 - x1: sx2 - x1 + 1] = image[sy1: sy2 + 1, sx1: sx2 + 1]
  return out


def resize_bilinear(image, height: int, width: int):
  """Bilinear resize with half-pixel centres and no antialiasing (cv2's INTER_LINEAR): (H, W, C)."""
  h, w = image.shape[:2]
  ys = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
  xs = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
  bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
  return (top * (1 - fy) + bottom * fy).astype(np.float32)


def preprocess(image, annotation: Annotation, *, image_size: int, padding: float = 0.05,
               jitter: float = 0.0, flip: bool = False, scops=None, rng=None) -> dict:
  """CMR/UMR's `forward_img` (see the module docstring).

  Args:
    image: (H, W, 3) float in [0, 1] (grey images replicated to 3 channels by the caller).
    annotation: from `read_annotations`.
    scops: optional (256, 256, 5) SCOPS probabilities aligned to the un-jittered crop.
  Returns:
    dict of image (S, S, 3), mask (S, S, 1), keypoints (15, 3) normalised, parts (S, S, 5) if scops,
    and `crop_box` (4,) of the square crop in original pixels.
  """
  mask = annotation.mask
  if mask.shape != image.shape[:2]:
    raise ValueError(f"{annotation.rel_path}: mask {mask.shape} does not match the image {image.shape[:2]}")
  box = square_bbox(perturb_bbox(annotation.bbox, padding, jitter, rng))
  img = crop(image, box, fill=1.0)
  msk = crop(mask[..., None], box, fill=0.0)
  side = img.shape[0]
  scale = image_size / float(side)
  img = resize_bilinear(img, image_size, image_size)
  msk = resize_bilinear(msk, image_size, image_size)
  kp = annotation.keypoints.copy()
  visible = kp[:, 2] > 0
  kp[:, :2] = (kp[:, :2] - box[:2]) * scale
  out = {"image": img, "mask": msk, "crop_box": box.astype(np.float32)}
  if scops is not None:
    out["parts"] = _warp_scops(scops, annotation, box, image_size, padding)
  if flip:
    out["image"], out["mask"] = out["image"][:, ::-1].copy(), out["mask"][:, ::-1].copy()
    if "parts" in out:
      out["parts"] = out["parts"][:, ::-1].copy()
    kp[:, 0] = image_size - kp[:, 0] - 1
    kp, visible = kp[KEYPOINT_FLIP], visible[KEYPOINT_FLIP]
  normalised = np.stack([2 * kp[:, 0] / image_size - 1, 2 * kp[:, 1] / image_size - 1, kp[:, 2]], -1)
  out["keypoints"] = (normalised * visible[:, None]).astype(np.float32)
  return out


def _warp_scops(scops, annotation, box, image_size, padding):
  """Move SCOPS maps from the un-jittered crop (where they were computed) into crop `box`."""
  reference = square_bbox(perturb_bbox(annotation.bbox, padding, 0.0, None))
  s = scops.shape[0]
  ref_side = reference[2] - reference[0] + 1
  # Output pixel centre -> original pixel -> reference-crop pixel (in SCOPS's s x s frame).
  centres = (np.arange(image_size) + 0.5) * (box[2] - box[0] + 1) / image_size - 0.5
  xs = (centres + box[0] - reference[0] + 0.5) * s / ref_side - 0.5
  ys = (centres + box[1] - reference[1] + 0.5) * s / ref_side - 0.5
  x0 = np.clip(np.floor(xs).astype(int), 0, s - 1)
  y0 = np.clip(np.floor(ys).astype(int), 0, s - 1)
  x1, y1 = np.clip(x0 + 1, 0, s - 1), np.clip(y0 + 1, 0, s - 1)
  fx = np.clip(xs - x0, 0, 1)[None, :, None]
  fy = np.clip(ys - y0, 0, 1)[:, None, None]
  warped = ((scops[y0][:, x0] * (1 - fx) + scops[y0][:, x1] * fx) * (1 - fy)
            + (scops[y1][:, x0] * (1 - fx) + scops[y1][:, x1] * fx) * fy)
  outside = (xs < -0.5) | (xs > s - 0.5)
  outside = outside[None, :] | ((ys < -0.5) | (ys > s - 0.5))[:, None]
  warped[outside] = np.eye(scops.shape[-1])[0]  # outside the SCOPS crop: background
  return warped.astype(np.float32)


class CubSource:
  """Random-access source of raw CUB examples (image, annotation, SCOPS map) for one split.

  Missing files and inconsistent records are errors that name the file, unless
  ``on_bad_record='skip'``: then they are dropped at construction, counted and logged.
  """

  def __init__(self, cub_dir: str, cache_dir: str, split: str, scops_dir: str | None = None,
               on_bad_record: str = "error"):
    if on_bad_record not in ("error", "skip"):
      raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    _require(os.path.join(cub_dir, "images"), "CUB-200-2011's images folder")
    self.cub_dir, self.scops_dir, self.split = cub_dir, scops_dir, split
    annotations = read_annotations(cache_dir, split)
    self.skipped: dict[str, int] = {}
    kept = []
    for a in annotations:
      problem = self._check(a)
      if problem is None:
        kept.append(a)
      elif on_bad_record == "error":
        raise ValueError(problem + " (pass on_bad_record='skip' to drop such records and count them)")
      else:
        reason = problem.split(": ", 1)[1]
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if self.skipped:
      logging.warning("CUB %s: skipped %d of %d records: %s", split, sum(self.skipped.values()),
                      len(annotations), self.skipped)
    self.annotations = kept

  def _check(self, a: Annotation) -> str | None:
    path = os.path.join(self.cub_dir, "images", a.rel_path)
    if not os.path.exists(path):
      return f"{path}: image file missing"
    if a.mask.ndim != 2 or not np.any(a.mask > 0):
      return f"{a.rel_path}: empty or malformed mask"
    if not (a.bbox[0] <= a.bbox[2] and a.bbox[1] <= a.bbox[3]):
      return f"{a.rel_path}: bbox is empty"
    h, w = a.mask.shape
    if a.bbox[2] < 0 or a.bbox[3] < 0 or a.bbox[0] > w - 1 or a.bbox[1] > h - 1:
      return f"{a.rel_path}: bbox outside the image"
    if self.scops_dir is not None and not os.path.exists(scops_path(self.scops_dir, a)):
      return f"{scops_path(self.scops_dir, a)}: SCOPS map missing"
    return None

  def __len__(self):
    return len(self.annotations)

  def __repr__(self):
    return f"CubSource({self.cub_dir!r}, split={self.split!r}, n={len(self)})"

  def __getitem__(self, i: int) -> dict:
    a = self.annotations[i]
    path = os.path.join(self.cub_dir, "images", a.rel_path)
    try:
      with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"), np.float32) / 255.0
    except OSError as e:
      raise ValueError(f"{path}: cannot decode image ({e})") from e
    out = {"image": image, "mask": a.mask, "bbox": a.bbox, "keypoints": a.keypoints, "index": a.index,
           "rel_path": a.rel_path}
    if self.scops_dir is not None:
      scops = np.load(scops_path(self.scops_dir, a), allow_pickle=False)
      if scops.ndim != 3 or scops.shape[-1] != 5:
        raise ValueError(f"{scops_path(self.scops_dir, a)}: expected (H, W, 5) SCOPS probabilities, got {scops.shape}")
      out["scops"] = scops.astype(np.float32)
    return out


class CubPreprocess(grain.RandomMapTransform):
  """Grain transform: a raw `CubSource` example -> the model's example (see `preprocess`)."""

  def __init__(self, image_size: int, train: bool, flip: str = "train", padding: float = 0.05,
               jitter: float = 0.05):
    if flip not in ("train", "never", "always_random"):
      raise ValueError(f"flip must be 'train', 'never' or 'always_random', got {flip!r}")
    self.image_size, self.train, self.flip = image_size, train, flip
    self.padding, self.jitter = padding, jitter

  def random_map(self, raw: dict, rng: np.random.Generator) -> dict:
    annotation = Annotation(index=int(raw["index"]), rel_path=str(raw["rel_path"]), mask=raw["mask"],
                            bbox=raw["bbox"], keypoints=raw["keypoints"])
    do_flip = (self.flip == "always_random" or (self.flip == "train" and self.train)) and rng.uniform() < 0.5
    out = preprocess(raw["image"], annotation, image_size=self.image_size, padding=self.padding,
                     jitter=self.jitter if self.train else 0.0, flip=do_flip, scops=raw.get("scops"), rng=rng)
    out["flipped"] = np.bool_(do_flip)
    return out
