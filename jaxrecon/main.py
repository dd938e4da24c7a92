"""Entry point: ``python -m jaxrecon.main --config=configs/synthetic.py --workdir=DIR``.

Kept tiny on purpose; the work happens in `jaxrecon.train`, which tests and notebooks import.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxrecon import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).", lock_config=True)
flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "jaxrecon", "xla"),
                    "Persistent XLA compilation cache (a rerun skips the ~1-2 min of compilation); '' = off.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
