"""Every config loads and documents its command; configs/cub.py reads CUB through the trainer's loader."""

import importlib
import os

import numpy as np
import pytest

from jaxrecon import components

CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
                 if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_states_its_command(name):
  module = importlib.import_module(f"configs.{name}")
  doc = " ".join(module.__doc__.split())
  assert "python -m jaxrecon.main --config=configs/" in doc
  assert "Expected result" in doc
  config = module.get_config()
  stages = [config.stage1, config.stage2] if config.get("job") == "pipeline" else [config]
  for stage in stages:
    assert stage.batch_size > 0 and stage.data.image_size >= 64


def test_cub_config_trains_from_cub_files(cub_tree):
  from configs import cub as cub_config  # pylint: disable=g-import-not-at-top
  cub_dir, cache_dir, scops_dir = cub_tree
  config = cub_config.get_config()
  config.batch_size = 2
  config.data.image_size = 64
  with pytest.raises(ValueError, match="needs --config.data.cub_dir"):
    components.make_data(config, "train", shuffle=True)
  config.data.cub_dir, config.data.cub_cache_dir, config.data.scops_dir = cub_dir, cache_dir, scops_dir
  batch = next(iter(components.make_data(config, "train", shuffle=True, preprocess=[components.AddBarrier()])))
  assert batch["image"].shape == (2, 64, 64, 3) and batch["mask"].shape == (2, 64, 64, 1)
  assert batch["barrier"].shape == (2, 64, 64, 1) and batch["parts"].shape == (2, 64, 64, 5)
  # The fake bird is a red box on green: the crop sees both, the mask covers the box.
  assert 0.2 < batch["mask"].mean() < 0.9
  np.testing.assert_array_less(batch["barrier"][batch["mask"] > 0.99], 0.5)
