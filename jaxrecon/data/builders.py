"""TensorFlow-free tfds builders (array_record files, read back as random-access data sources).

`synthetic_birds` is generated on first use into the tfds data dir (no download). Configs:
``64`` (the CPU default: 1000/100/200 at 64 px, ~1 min to generate on 2 cores), ``128`` (5000/500/500 at 128 px), ``256`` (same at
256 px) and ``tiny`` (24/8/8 at 64 px, for tests); validation and test examples carry 2 other views. `make_builder` also accepts custom sizes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from jaxrecon.data import synthetic

_SYNTHETIC_DESCRIPTION = """Procedural mirror-symmetric birds with CUB-like cameras, textured
backgrounds, SCOPS-like part maps, 15 CUB keypoints, and 3D ground truth (camera, vertices in
correspondence with jaxrecon's 642-vertex sphere, per-face colours and parts, renders of other views
on the validation and test splits; all-zero on train).
Deterministic from the config's seed. See jaxrecon/data/synthetic.py."""


# Chunks generated at once, in threads: two keep both cores of a small CPU busy.
_WORKERS = 2


class SyntheticBirdsConfig(tfds.core.BuilderConfig):
  """Size and seed of a synthetic-birds variant."""

  def __init__(self, *, image_size: int, num_train: int, num_validation: int, num_test: int,
               num_novel_views: int = 2, seed: int = 0, chunk: int = 32, **kwargs):
    super().__init__(**kwargs)
    self.image_size = image_size
    self.num_examples = {"train": num_train, "validation": num_validation, "test": num_test}
    self.num_novel_views = num_novel_views
    self.seed = seed
    self.chunk = chunk


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
  return buffer.getvalue()


class SyntheticBirds(tfds.core.GeneratorBasedBuilder):
  """The embedded default dataset (see `jaxrecon.data.synthetic`)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "Generator 2.5x faster (images equal to 1.0.0's within 1/255); config 64 is 1000/100/200.",
  }
  BUILDER_CONFIGS = [
      # chunk 20 divides every split (chunks are padded, the padding dropped), and the last chunks of
      # a split are small, so little of its time is left to one thread alone.
      SyntheticBirdsConfig(name="64", image_size=64, num_train=1000, num_validation=100, num_test=200,
                           chunk=20),
      SyntheticBirdsConfig(name="128", image_size=128, num_train=5000, num_validation=500, num_test=500),
      SyntheticBirdsConfig(name="256", image_size=256, num_train=5000, num_validation=500, num_test=500),
      SyntheticBirdsConfig(name="tiny", image_size=64, num_train=24, num_validation=8, num_test=8, chunk=8),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    s, v = self.builder_config.image_size, self.builder_config.num_novel_views
    zlib = tfds.features.Encoding.ZLIB
    return self.dataset_info_from_configs(
        description=_SYNTHETIC_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 3)),
            "mask": tfds.features.Image(shape=(s, s, 1)),
            "parts": tfds.features.Tensor(shape=(s, s, 5), dtype=np.uint8, encoding=zlib),
            "keypoints": tfds.features.Tensor(shape=(15, 3), dtype=np.float32),
            "camera": tfds.features.Tensor(shape=(7,), dtype=np.float32),
            "vertices": tfds.features.Tensor(shape=(642, 3), dtype=np.float32, encoding=zlib),
            "face_colours": tfds.features.Tensor(shape=(1280, 3), dtype=np.uint8, encoding=zlib),
            "face_parts": tfds.features.Tensor(shape=(1280,), dtype=np.int32, encoding=zlib),
            "azimuth_elevation": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "novel_views": tfds.features.Tensor(shape=(v, s, s, 4), dtype=np.uint8, encoding=zlib),
            "novel_cameras": tfds.features.Tensor(shape=(v, 7), dtype=np.float32),
        }),
        homepage="https://github.com/jaxrecon/jaxrecon",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, n) for split, n in self.builder_config.num_examples.items()}

  def _generate_examples(self, split: str, count: int):
    config = self.builder_config
    # Other views are for evaluation: train examples store empty (all-zero) ones, rendered for free.
    views = 0 if split == "train" else config.num_novel_views
    settings = synthetic.RenderSettings(image_size=config.image_size, num_novel_views=views)
    empty_views = np.zeros((config.num_novel_views, config.image_size, config.image_size, 4), np.uint8)
    empty_cameras = np.zeros((config.num_novel_views, 7), np.float32)

    def chunk(start):
      # Fixed-size chunks keep one compiled renderer; the padding examples are generated and dropped.
      examples = synthetic.make_examples(config.seed, split, range(start, start + config.chunk), settings)
      kept = list(zip(range(start, min(start + config.chunk, count)), examples))
      for _, example in kept:
        example["image"] = _png(example["image"])
        example["mask"] = _png(example["mask"])
        example.setdefault("novel_views", empty_views)
        example.setdefault("novel_cameras", empty_cameras)
      return kept

    # Chunks are made _WORKERS at a time in threads: the jitted renders release the GIL and run
    # concurrently (so does much of the numpy work), and jax compiles the renderer once for both.
    # Results are yielded in order, and each depends only on (seed, split, index).
    with concurrent.futures.ThreadPoolExecutor(max_workers=_WORKERS) as pool:
      pending = collections.deque()
      for start in range(0, count, config.chunk):
        pending.append(pool.submit(chunk, start))
        if len(pending) == _WORKERS:
          yield from pending.popleft().result()
      while pending:
        yield from pending.popleft().result()


def make_builder(name: str = "128", data_dir: str | None = None, **overrides) -> SyntheticBirds:
  """A `synthetic_birds` builder: a named config, optionally with sizes or seed overridden."""
  base = {c.name: c for c in SyntheticBirds.BUILDER_CONFIGS}
  if name not in base:
    raise ValueError(f"synthetic_birds has configs {sorted(base)}, not {name!r}")
  if not overrides:
    return SyntheticBirds(config=name, data_dir=data_dir)
  b = base[name]
  fields = dict(image_size=b.image_size, num_train=b.num_examples["train"],
                num_validation=b.num_examples["validation"], num_test=b.num_examples["test"],
                num_novel_views=b.num_novel_views, seed=b.seed, chunk=b.chunk)
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"unknown synthetic_birds settings {sorted(unknown)}; known: {sorted(fields)}")
  fields.update(overrides)
  tag = "_".join(f"{k}{v}" for k, v in sorted(overrides.items()))
  config = SyntheticBirdsConfig(name=f"{name}_{tag}", **fields)
  return SyntheticBirds(config=config, data_dir=data_dir)


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Generate the dataset if it is not there yet (array_record, no TensorFlow), then return it."""
  builder.download_and_prepare(file_format="array_record")
  return builder
