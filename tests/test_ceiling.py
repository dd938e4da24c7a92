"""benchmarks/ceiling.py: oracles scored by the evaluation itself, and a model's half-oracles."""

import importlib.util
import pathlib
import sys

import pytest

from jaxrecon import evaluation

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ceiling.py"
_SPEC = importlib.util.spec_from_file_location("ceiling", _PATH)
ceiling = importlib.util.module_from_spec(_SPEC)
sys.modules["ceiling"] = ceiling
_SPEC.loader.exec_module(ceiling)


@pytest.fixture(scope="module")
def rows(checkpointed_workdir):
  workdir, _ = checkpointed_workdir
  config = evaluation.load_config(workdir)
  return ceiling.oracle_rows(config, "test", workdir, kp_pairs=16)


def test_true_shape_and_camera_is_exact_and_its_twin_only_silhouette_deep(rows):
  truth, twin = rows["true shape, true camera"], rows["true shape, mirror-twin camera"]
  assert truth["chamfer_3d"] < 1e-6 and truth["f_score"] > 1 - 1e-6 and truth["camera_error_deg"] < 1e-3
  # The twin: the same silhouette, a different view-frame shape, right only to the twin-aware error.
  assert twin["mask_iou"] == pytest.approx(truth["mask_iou"], abs=1e-4)
  assert twin["camera_error_twin_deg"] < 1e-3 and twin["camera_error_deg"] > 5
  assert twin["chamfer_3d"] > 10 * max(truth["chamfer_3d"], 1e-4)
  sphere, mean = rows["sphere (true RMS radius), true camera"], rows["mean true shape, true camera"]
  assert sphere["chamfer_3d"] > mean["chamfer_3d"] > truth["chamfer_3d"]
  assert truth["mask_iou"] > mean["mask_iou"] > sphere["mask_iou"]


def test_half_oracles_replace_one_part_of_the_model(rows):
  model = next(v for k, v in rows.items() if k.startswith("the model"))
  shape_given_camera = rows["half-oracle: the model's shape and texture, true camera"]
  camera_given_shape = rows["half-oracle: the true shape, the model's aligned camera"]
  # The true camera in the model's frame: no camera error left.
  assert shape_given_camera["camera_error_deg"] < 0.3
  # The model's cameras, aligned, on the true shape: the model's camera error, and the true shape.
  assert camera_given_shape["camera_error_deg"] == pytest.approx(model["camera_error_deg"], abs=0.3)
