r"""Write a PNG grid of dataset samples: image with keypoints, mask, and part map per example.

  python -m jaxrecon.tools.sample_grid --dataset=synthetic --synthetic_config=128 --out=grid.png
  python -m jaxrecon.tools.sample_grid --dataset=cub --cub_dir=CUB_200_2011 --cache_dir=cachedir/cub \
      --scops_dir=SCOPS/.../dcrf_prob --out=grid.png

Rows are examples; columns: image (visible keypoints red, invisible ones are not stored by CUB),
mask, parts (head red, neck yellow, back blue, belly green, background black).
"""

from __future__ import annotations

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from jaxrecon.data import pipeline

PART_COLOURS = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0.3, 1], [0, 0.8, 0.2]], np.float32)

_DATASET = flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "cub"], "Which dataset.")
_SYNTHETIC_CONFIG = flags.DEFINE_string("synthetic_config", "128", "synthetic_birds config name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data dir (synthetic).")
_CUB_DIR = flags.DEFINE_string("cub_dir", None, "CUB_200_2011 folder (with images/).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "CMR's cachedir/cub (with data/*.mat).")
_SCOPS_DIR = flags.DEFINE_string("scops_dir", None, "SCOPS part maps (optional).")
_SPLIT = flags.DEFINE_string("split", "train", "Split.")
_NUM = flags.DEFINE_integer("num", 8, "Examples in the grid.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Output size (CUB).")
_OUT = flags.DEFINE_string("out", "samples.png", "Output PNG.")


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
  """Mark visible keypoints (x, y in [-1, 1], visible) as 3x3 red squares: (S, S, 3) -> copy."""
  out, s = image.copy(), image.shape[0]
  for x, y, visible in keypoints:
    if visible > 0:
      col, row = int(round((x + 1) * s / 2 - 0.5)), int(round((y + 1) * s / 2 - 0.5))
      out[max(row - 1, 0): row + 2, max(col - 1, 0): col + 2] = (1.0, 0.0, 0.0)
  return out


def make_grid(batch: dict) -> np.ndarray:
  """A batch of decoded examples -> (N*S, 3*S, 3) uint8 grid."""
  rows = []
  for i in range(batch["image"].shape[0]):
    image = draw_keypoints(batch["image"][i], batch["keypoints"][i])
    mask = np.repeat(batch["mask"][i], 3, axis=-1)
    if "parts" in batch:
      parts = PART_COLOURS[np.argmax(batch["parts"][i], axis=-1)] * batch["parts"][i].max(-1, keepdims=True)
    else:
      parts = np.zeros_like(image)
    rows.append(np.concatenate([image, mask, parts], axis=1))
  return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)


def main(argv):
  del argv
  if _DATASET.value == "synthetic":
    from jaxrecon.data import builders  # pylint: disable=g-import-not-at-top
    builder = builders.prepare(builders.make_builder(_SYNTHETIC_CONFIG.value, data_dir=_DATA_DIR.value))
    source = builder.as_data_source(_SPLIT.value)
    size, preprocess = builder.builder_config.image_size, []
  else:
    from jaxrecon.data import cub  # pylint: disable=g-import-not-at-top
    if not (_CUB_DIR.value and _CACHE_DIR.value):
      raise app.UsageError("--dataset=cub needs --cub_dir and --cache_dir")
    source = cub.CubSource(_CUB_DIR.value, _CACHE_DIR.value, _SPLIT.value, scops_dir=_SCOPS_DIR.value)
    size, preprocess = _IMAGE_SIZE.value, [cub.CubPreprocess(_IMAGE_SIZE.value, train=_SPLIT.value == "train")]
  num = min(_NUM.value, len(source))
  loader = pipeline.make_loader(source, batch_size=num, image_size=size, seed=0, shuffle=False,
                                num_epochs=1, preprocess=preprocess)
  Image.fromarray(make_grid(next(iter(loader)))).save(_OUT.value)
  print(f"wrote {_OUT.value} ({num} examples)")


if __name__ == "__main__":
  app.run(main)
