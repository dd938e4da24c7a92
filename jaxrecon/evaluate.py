r"""Evaluate a trained workdir: ``python -m jaxrecon.evaluate --workdir=DIR [--split=test]``.

  python -m jaxrecon.evaluate --workdir=workdir/synthetic --split=test \
      [--protocol=default|umr_compatible] [--seed=0] [--inception=fid_inception.npz] \
      [--kp_pairs=10000] [--data_dir=...] [--save_predictions]
      [--config=configs/synthetic.py --config.data.data_dir=...]

Loads the config the run saved (<workdir>/config.json; `--config` gives one explicitly instead) and
the latest checkpoint, scores every image of the split under the protocol (see
`jaxrecon.evaluation`: mask IoU, SSIM, texture L1, FID with `--inception`, keypoint-transfer PCK where
the data has keypoints, and on synthetic data the 3D and held-out-view metrics), prints a Markdown
table and writes <workdir>/eval_<split>[_<protocol>]/metrics.json (protocol, step, image count, and
per metric its value and definition, or why it was skipped) and metrics.md (the table). The
default protocol's folder has no suffix: eval_test/; the UMR-compatible one is
eval_test_umr_compatible/. With --save_predictions the folder also gets predictions.npz: vertices
(N, V, 3) in the model's canonical frame, camera (N, 7) the scored hypothesis [s, tx, ty, qw, qx, qy,
qz], probs (N, H) the hypotheses' probabilities and index (N,) each example's position in the split.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxrecon import cli, evaluation
from jaxrecon import workdir as workdir_lib

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run as a script, so the module imports cleanly
  next to other absl programs)."""
  flags.DEFINE_string("workdir", None, "Training directory (config.json and checkpoints/).")
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate.")
  flags.DEFINE_enum("protocol", "default", list(evaluation.PROTOCOLS), "Evaluation protocol (see jaxrecon.evaluation).")
  flags.DEFINE_integer("seed", 0, "Seed of the random draws (random views for FID; flips and sampled cameras "
                       "under umr_compatible).")
  flags.DEFINE_string("inception", None, "Converted FID Inception weights (.npz from python -m "
                      "jaxrecon.tools.convert_weights --model fid_inception); default config.weights.inception. "
                      "Without either, FID is skipped.")
  flags.DEFINE_integer("kp_pairs", None, "Keypoint-transfer pairs (default config.eval.kp_pairs, else UMR's 10000).")
  flags.DEFINE_string("data_dir", None, "Override config.data.data_dir (synthetic data location).")
  flags.DEFINE_string("out", None, "Output folder (default <workdir>/eval_<split>[_<protocol>]).")
  flags.DEFINE_integer("max_batches", 0, "Batches to score (0 = the whole split, as the protocols define; the "
                       "run's config.eval.max_batches is ignored).")
  flags.DEFINE_bool("save_predictions", False, "Also write predictions.npz (vertices, camera, probs, index) "
                    "into the output folder.")
  config_flags.DEFINE_config_file("config", None, "Optional config file (configs/*.py) instead of "
                                  "<workdir>/config.json.", lock_config=False)
  flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "jaxrecon", "xla"),
                      "Persistent XLA compilation cache; '' = off.")


def run(workdir: str, split: str = "test", protocol: str = "default", *, config=None, seed: int = 0,
        inception: str | None = None, kp_pairs: int | None = None, data_dir: str | None = None,
        out: str | None = None, max_batches: int | None = 0, fid_features=None,
        save_predictions: bool = False) -> dict:
  """Evaluate `workdir`'s latest checkpoint; writes metrics.json and metrics.md and returns the report.

  `max_batches` 0 scores the whole split (the protocols' definition) whatever the run's
  config.eval.max_batches (which only shortens the in-training evaluation); None keeps the config's.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist")
  config = evaluation.load_config(workdir) if config is None else config
  if data_dir is not None:
    config.data.data_dir = data_dir
  if inception is not None:
    if not os.path.exists(inception):
      raise FileNotFoundError(f"--inception={inception} not found: convert the pytorch-fid weights with "
                              "python -m jaxrecon.tools.convert_weights --model fid_inception ...")
    config.weights.inception = inception
  if max_batches is not None:
    config.eval.max_batches = max_batches
  sphere, model, state = evaluation.restore_model(workdir, config)
  logging.info("Evaluating %s step %d on %s/%s (%s protocol)", workdir, state.step, config.data.dataset, split,
               protocol)
  out = out or workdir_lib.eval_dir(workdir, split, protocol)
  predictions_path = os.path.join(out, evaluation.PREDICTIONS_FILE) if save_predictions else None
  results = evaluation.evaluate(config, model, sphere, state, split=split, protocol=protocol, seed=seed,
                                kp_pairs=kp_pairs, fid_features=fid_features, predictions_path=predictions_path)
  report = evaluation.make_report(results, config, split, protocol, seed,
                                  workdir=os.path.abspath(workdir),
                                  checkpoint=os.path.join(workdir_lib.checkpoints_dir(workdir), str(state.step)))
  json_path, md_path = evaluation.write_report(report, out)
  print(evaluation.markdown_table(report))
  print(f"Wrote {json_path} and {md_path}")
  return report


def main(argv):
  if len(argv) > 1:
    cli.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_third_party_logs()
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    run(FLAGS.workdir, FLAGS.split, FLAGS.protocol, config=FLAGS.config, seed=FLAGS.seed,
        inception=FLAGS.inception, kp_pairs=FLAGS.kp_pairs, data_dir=FLAGS.data_dir, out=FLAGS.out,
        max_batches=FLAGS.max_batches, save_predictions=FLAGS.save_predictions)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main, flags_parser=cli.parse_flags)
