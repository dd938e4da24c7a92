"""Entry point: ``python -m jaxrecon.main --config=configs/synthetic.py --workdir=DIR``.

Kept tiny on purpose; the work happens in `jaxrecon.train`, which tests and notebooks import.

Usage errors (a bad flag or config value, a busy workdir, a missing file) print one ``error: ...``
line and exit with status 2. A SIGTERM (preemption) saves a checkpoint and exits with status 0;
the same command resumes (docs/training.md).
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from jaxrecon import cli
from jaxrecon import config_checks
from jaxrecon import distributed
from jaxrecon import train
from jaxrecon import workdir as workdir_lib
from jaxrecon import workdir_lock

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
config_flags.DEFINE_config_file("config", None, "Configuration file (configs/*.py).", lock_config=True)
flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "jaxrecon", "xla"),
                    "Persistent XLA compilation cache (a rerun skips the ~1-2 min of compilation); '' = off.")
# Multi-process runs (jaxrecon/distributed.py, launch/README.md). Unset flags fall back to the
# JAXRECON_* environment variables, then to cluster auto-detection (Slurm, Open MPI, Cloud TPU VM).
flags.DEFINE_enum("distributed", None, list(distributed.MODES),
                  f"jax.distributed: auto (default; env {distributed.ENV_MODE}), on, off.")
flags.DEFINE_string("coordinator", None, f"HOST:PORT of process 0 (env {distributed.ENV_COORDINATOR}).")
flags.DEFINE_integer("num_processes", None, f"Processes in the cluster (env {distributed.ENV_NUM_PROCESSES}).")
flags.DEFINE_integer("process_id", None, f"This process's id, 0..N-1 (env {distributed.ENV_PROCESS_ID}).")
flags.DEFINE_integer("cpu_devices", None, f"CPU devices per process (env {distributed.ENV_CPU_DEVICES}).")


def main(argv):
  if len(argv) > 1:
    cli.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.quiet_third_party_logs()
  cli.check_config(FLAGS.config)    # before JAX starts: a bad value fails in a second
  # First: nothing may touch devices before jax.distributed is initialised.
  try:
    distributed.initialize(mode=FLAGS.distributed, coordinator=FLAGS.coordinator, num_processes=FLAGS.num_processes,
                           process_id=FLAGS.process_id, cpu_devices=FLAGS.cpu_devices)
  except ValueError as e:     # inconsistent cluster settings: the message names the flag or variable
    cli.usage_error(str(e))
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    # Every program, the model init's small eager ones too: a restart (after a preemption) reaches
    # its first step ~13 s sooner on configs/test.py (create_state: 18 s -> 5 s on one CPU).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
  try:
    if FLAGS.config.get("job", "train") == "train":    # (a pipeline's stages check their own)
      config_checks.check_devices(FLAGS.config.batch_size, jax.device_count(), jax.process_count())
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)   # returns after a SIGTERM too: exit status 0
  except (config_checks.ConfigError, workdir_lock.WorkdirBusyError, workdir_lib.UnreadableCheckpointError,
          FileNotFoundError) as e:
    cli.usage_error(str(e))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
