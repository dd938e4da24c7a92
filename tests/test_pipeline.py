"""The grain pipeline: determinism, fixed shapes, resumable state, sharding, clear errors."""

import jax
import numpy as np
import pytest

from jaxrecon.data import pipeline


class FakeSource:
  """A random-access source of tiny examples, each tagged with its index."""

  def __init__(self, n, size=4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __repr__(self):  # grain checks the source's repr when restoring a state
    return f"FakeSource(n={self.n}, size={self.size})"

  def __getitem__(self, i):
    image = np.full((self.size, self.size, 3), i % 256, np.uint8)
    return {"image": image, "mask": np.full((self.size, self.size, 1), 255, np.uint8),
            "index": np.int64(i)}


def _indices(loader, batches):
  it = iter(loader)
  return [next(it)["index"].tolist() for _ in range(batches)]


def test_batches_are_decoded_fixed_and_deterministic():
  loader = pipeline.make_loader(FakeSource(10), batch_size=4, image_size=4, seed=3)
  batch = next(iter(loader))
  assert batch["image"].shape == (4, 4, 4, 3) and batch["image"].dtype == np.float32
  assert np.all((batch["image"] >= 0) & (batch["image"] <= 1))
  again = pipeline.make_loader(FakeSource(10), batch_size=4, image_size=4, seed=3)
  assert _indices(loader, 5) == _indices(again, 5)
  other = pipeline.make_loader(FakeSource(10), batch_size=4, image_size=4, seed=4)
  assert _indices(loader, 5) != _indices(other, 5)
  assert loader.steps_per_epoch == 2


def test_epoch_covers_each_record_once():
  loader = pipeline.make_loader(FakeSource(12), batch_size=4, image_size=4, seed=0, num_epochs=1)
  seen = [i for b in loader for i in b["index"].tolist()]
  assert sorted(seen) == list(range(12))


def test_state_restores_exactly():
  loader = pipeline.make_loader(FakeSource(20), batch_size=4, image_size=4, seed=1)
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["index"].tolist() for _ in range(4)]
  fresh = iter(pipeline.make_loader(FakeSource(20), batch_size=4, image_size=4, seed=1))
  fresh.set_state(state)
  assert [next(fresh)["index"].tolist() for _ in range(4)] == expected


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_loader(FakeSource(3), batch_size=4, image_size=4, seed=0)
  loader = pipeline.make_loader(FakeSource(8, size=5), batch_size=4, image_size=4, seed=0)
  with pytest.raises(ValueError, match="image shape"):
    next(iter(loader))


def test_global_batch_shards_over_devices():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  local = {"image": np.arange(8 * 2, dtype=np.float32).reshape(8, 2)}
  arrays = pipeline.global_batch(local, sharding)
  assert arrays["image"].shape == (8, 2)
  assert len(arrays["image"].addressable_shards) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(arrays["image"]), local["image"])
