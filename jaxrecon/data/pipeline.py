"""The input pipeline: grain over tfds data sources, sharded per process, resumable.

* Deterministic: the shuffle order is a function of the config seed and the epoch.
* Multi-host: each JAX process reads its own slice of the records (``ShardByJaxProcess``) and
  `global_batch` assembles the per-process batches into one array sharded over the device mesh.
* Resumable: the iterator's state (`get_state`/`set_state`) goes into the checkpoint, so a restart
  continues with exactly the next batch.
* Fixed shapes: batches drop the remainder.

Examples come out as float32 NHWC in [0, 1] (`image`, `mask` (H, W, 1), `parts` (H, W, 5)); other
fields pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from absl import logging
import grain.python as grain
import jax
import numpy as np

_UINT8_IMAGES = ("image", "mask", "parts", "novel_views")


class DecodeExample(grain.MapTransform):
  """uint8 images → float32 in [0, 1]; checks shapes so corrupt records fail loudly."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, example: Mapping[str, Any]) -> dict:
    out = dict(example)
    for key in _UINT8_IMAGES:
      if key in out and np.asarray(out[key]).dtype == np.uint8:
        out[key] = np.asarray(out[key], np.float32) / 255.0
    image = out["image"]
    if image.shape != (self.image_size, self.image_size, 3):
      raise ValueError(f"record has image shape {image.shape}, expected "
                       f"{(self.image_size, self.image_size, 3)}: the dataset and config disagree")
    if out["mask"].shape != image.shape[:2] + (1,):
      raise ValueError(f"record has mask shape {out['mask'].shape}, expected {image.shape[:2] + (1,)}")
    return out


@dataclasses.dataclass
class Loader:
  """A grain loader and the bookkeeping around it."""
  loader: grain.DataLoader
  num_records: int
  batch_size: int           # per process

  def __iter__(self):
    return iter(self.loader)

  @property
  def steps_per_epoch(self) -> int:
    return self.num_records // (self.batch_size * jax.process_count())


def make_loader(source, *, batch_size: int, image_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, worker_count: int = 0, preprocess=(),
                drop_remainder: bool = True) -> Loader:
  """A grain loader over a random-access `source` (e.g. a tfds data source).

  Args:
    source: random-access data source (len() and __getitem__).
    batch_size: the global batch size; each process loads batch_size / process_count examples.
    image_size: expected image side (records of another size are an error).
    seed: shuffle seed.
    num_epochs: None repeats forever.
    preprocess: grain transforms applied to each raw record first (e.g. `cub.CubPreprocess`).
    drop_remainder: training keeps batch shapes fixed (the few records of an incomplete last batch
      come again in the next epoch); evaluation passes False so that every record is seen.
  """
  processes = jax.process_count()
  if batch_size % processes:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {processes} processes")
  if len(source) < batch_size:
    raise ValueError(f"the data source has {len(source)} records, fewer than one batch of {batch_size}")
  sampler = grain.IndexSampler(
      num_records=len(source), shard_options=grain.ShardByJaxProcess(drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  operations = [*preprocess, DecodeExample(image_size), grain.Batch(batch_size // processes, drop_remainder=drop_remainder)]
  loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                            worker_count=worker_count)
  logging.info("Data: %d records, global batch %d over %d process(es)", len(source), batch_size, processes)
  return Loader(loader, len(source), batch_size // processes)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
  """Assemble per-process batches into global arrays with `sharding` (leading axis = batch)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
