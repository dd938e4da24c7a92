"""benchmarks/ablation.py: the variants' overrides, the statistics, the results block and the figure."""

import importlib.util
import json
import os
import pathlib
import statistics
import sys

import numpy as np
from PIL import Image
import pytest

from configs import synthetic as synthetic_config

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
_SPEC = importlib.util.spec_from_file_location("ablation", _PATH)
ablation = importlib.util.module_from_spec(_SPEC)
sys.modules["ablation"] = ablation   # its dataclasses look their module up
_SPEC.loader.exec_module(ablation)


def _apply(overrides):
  config = synthetic_config.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    assert leaf in node, f"{key} is not a config field"   # a typo would silently add a field via --config.x
    node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
  return config


def test_variants_switch_exactly_the_paper_additions():
  umr = _apply(ablation.variant_overrides("umr", None, 1e-3))
  assert umr.variance.mode == "none" and umr.loss_weights.variance_lookahead == 0 and umr.loss_weights.fid == 0
  paper = _apply(ablation.variant_overrides("variance_paper", None, 1e-3))
  assert paper.variance.mode == "paper" and paper.loss_weights.fid == 0
  adaptive = _apply(ablation.variant_overrides("variance_adaptive", None, 1e-3))
  assert adaptive.variance.mode == "adaptive" and adaptive.loss_weights.variance_lookahead > 0
  full = _apply(ablation.variant_overrides("full", "w.npz", 2e-3))
  assert full.variance.mode == "adaptive" and full.loss_weights.fid == 2e-3
  assert full.weights.inception == os.path.abspath("w.npz")
  fid = _apply(ablation.variant_overrides("fid", "w.npz", 2e-3))
  assert fid.variance.mode == "none" and fid.loss_weights.fid == 2e-3
  with pytest.raises(ValueError, match="--inception"):
    ablation.variant_overrides("fid", None, 1e-3)
  assert ablation.flag_args({"variance.mode": "none"}) == ["--config.variance.mode=none"]


def test_summary_statistics_and_paired_differences():
  runs = {"umr": {0: {"mask_iou": 0.5, "ssim": 0.4}, 1: {"mask_iou": 0.7, "ssim": 0.5}, 2: {"mask_iou": 0.6, "ssim": 0.3}},
          "variance_adaptive": {0: {"mask_iou": 0.6, "ssim": 0.4}, 1: {"mask_iou": 0.7, "ssim": 0.7},
                                2: {"mask_iou": 0.8, "ssim": 0.3}}}
  summary = ablation.summarise(runs)
  mean, std, n = summary["table"]["umr"]["mask_iou"]
  assert (mean, n) == (pytest.approx(0.6), 3) and std == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
  dmean, dstd, dn = summary["paired"]["variance_adaptive"]["mask_iou"]
  assert dmean == pytest.approx(0.1) and dstd == pytest.approx(statistics.stdev([0.1, 0.0, 0.2])) and dn == 3
  assert summary["paired"]["variance_adaptive"]["ssim"][0] == pytest.approx(0.2 / 3)
  assert "umr" not in summary["paired"]
  text = ablation.markdown(summary, {"fid": "no weights"}, "### heading")
  assert "| umr | 3 | 0.6000 ± 0.1000 |" in text
  assert "+0.1000 ± 0.1000 (n=3)" in text and "`fid` was not run: no weights." in text


def test_results_block_is_replaced_and_the_rest_kept():
  text = "# Results\n\nintro\n"
  once = ablation.replace_block(text, "synthetic", "table v1\n")
  assert once.startswith("# Results\n\nintro\n") and "table v1" in once
  edited = once + "\nInterpretation written by hand.\n"
  twice = ablation.replace_block(edited, "synthetic", "table v2\n")
  assert "table v1" not in twice and "table v2" in twice and twice.endswith("Interpretation written by hand.\n")
  assert twice.count("<!-- ablation:synthetic begin -->") == 1
  other = ablation.replace_block(twice, "cub", "cub table\n")
  assert "table v2" in other and "cub table" in other


def _report(step, values):
  return {"step": step, "metrics": {**{k: {"value": v, "definition": ""} for k, v in values.items()},
                                     "fid": {"status": "skipped", "reason": "no weights"}}}


def test_finished_run_is_reused_not_repeated(tmp_path):
  workdir = tmp_path / "umr" / "seed_0"
  (workdir / "eval_test").mkdir(parents=True)
  (workdir / "eval_test" / "metrics.json").write_text(json.dumps(_report(5, {"mask_iou": 0.5})))
  calls = []
  report = ablation.run_one("configs/test.py", str(workdir), {}, 0, 5, None, "", calls.append)
  assert report["step"] == 5 and ablation.metric_values(report) == {"mask_iou": 0.5}
  assert "reusing" in calls[0]
  # A run of another length is neither reused nor continued.
  with pytest.raises(ValueError, match="own --root"):
    ablation.run_one("configs/test.py", str(workdir), {}, 0, 7, None, "", calls.append)
  # A new run starts training (and stops here with the log's path, on a config that does not exist).
  with pytest.raises(RuntimeError, match="train of .* failed.*train.log"):
    ablation.run_one("configs/no_such_config.py", str(tmp_path / "new"), {}, 0, 7, None, "", calls.append)


def test_main_writes_table_json_and_figure(tmp_path, checkpointed_workdir, monkeypatch):
  # The runs themselves are the training and evaluation CLIs (tested in test_train / test_evaluate);
  # here each "run" is a checkpointed workdir of configs/test.py with a report that depends on the
  # variant and seed, so the table's numbers are known.
  workdir, data_dir = checkpointed_workdir
  root = tmp_path / "runs"
  values = {"umr": 0.5, "variance_adaptive": 0.6}

  def fake_run_one(config, run_workdir, overrides, seed, steps, data_dir_, cache, log):
    os.makedirs(os.path.dirname(run_workdir), exist_ok=True)
    os.symlink(workdir, run_workdir)
    variant = pathlib.Path(run_workdir).parent.name
    assert overrides["variance.mode"] == ablation.VARIANTS[variant].overrides["variance.mode"]
    assert overrides["batch_size"] == "4"
    return _report(steps, {"mask_iou": values[variant] + 0.01 * seed, "ssim": 0.3})

  monkeypatch.setattr(ablation, "run_one", fake_run_one)
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\nKept.\n")
  figure = tmp_path / "fig.png"
  ablation.main([f"--root={root}", "--variants=umr,variance_adaptive,fid", "--seeds=0,1", "--steps=3",
                 "--set", "batch_size=4", f"--results={results}", f"--figure={figure}", "--figure_images=2",
                 f"--data_dir={data_dir}"])
  text = results.read_text()
  assert text.startswith("# Results\n\nKept.\n")
  assert "| umr | 2 | 0.5050 ± 0.0071 |" in text and "| variance_adaptive | 2 | 0.6050 ± 0.0071 |" in text
  assert "+0.1000 ± 0.0000 (n=2)" in text and "`fid` was not run" in text
  saved = json.loads((root / "ablation.json").read_text())
  assert saved["runs"]["umr"]["1"]["mask_iou"] == pytest.approx(0.51) and "fid" in saved["skipped"]
  image = np.asarray(Image.open(figure))
  size = 64
  assert image.shape[1] == size * (1 + 2 * 2) and image.shape[0] > 2 * size   # input + 2 columns per variant
  assert image[-size:, :size].std() > 0     # the input images are drawn, not blank
