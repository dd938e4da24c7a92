"""A run's directory (the workdir): its layout, in one place, and its Orbax checkpoints.

    <workdir>/config.json                 the run's config (`CONFIG_FILE`; evaluate/predict rebuild the model from it)
    <workdir>/checkpoints/<step>/         Orbax: the train state + JSON extras (`checkpoint_manager`)
    <workdir>/checkpoints_unreadable/     checkpoints that failed to restore, set aside (`restore_latest`)
    <workdir>/tensorboard/                TensorBoard events
    <workdir>/images/step_<step>.png      the reconstruction grids (`image_path`)
    <workdir>/metrics.json                the final metrics of training (`METRICS_FILE`)
    <workdir>/eval_<split>[_<protocol>]/  metrics.json and metrics.md of `jaxrecon.evaluate` (`eval_dir`)
    <workdir>/template/                   a pipeline's stage-1 template (`TEMPLATE_DIR`); stage1/, stage2/ its runs
    <workdir>/jaxrecon.lock               the run's lock (`workdir_lock`)

Shared by the trainer (`train`) and the evaluator (`evaluation`), neither of which imports the other
for it.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from jaxrecon import distributed

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
TENSORBOARD_DIR = "tensorboard"
IMAGES_DIR = "images"
METRICS_FILE = "metrics.json"
METRICS_MD_FILE = "metrics.md"
TEMPLATE_DIR = "template"
STAGE1_DIR = "stage1"
STAGE2_DIR = "stage2"


def checkpoints_dir(workdir: str) -> str:
  """<workdir>/checkpoints, as an absolute path (Orbax wants one)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def image_path(workdir: str, step: int) -> str:
  """<workdir>/images/step_<step>.png: the reconstruction grid of a training step."""
  return os.path.join(workdir, IMAGES_DIR, f"step_{step:06d}.png")


def eval_dir(workdir: str, split: str, protocol: str = "default") -> str:
  """Where `jaxrecon.evaluate` writes a split's report: <workdir>/eval_<split>, plus _<protocol>
  for a protocol other than 'default'."""
  return os.path.join(workdir, f"eval_{split}" + ("" if protocol == "default" else f"_{protocol}"))


def checkpoint_manager(workdir: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
  """The Orbax manager of <workdir>/checkpoints (each step: the train state + JSON extras)."""
  return ocp.CheckpointManager(
      checkpoints_dir(workdir), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


class UnreadableCheckpointError(RuntimeError):
  """No checkpoint of a workdir that has some can be restored."""


def restore_latest(manager: ocp.CheckpointManager, like):
  """(state, extras) of the latest checkpoint that restores, with `like`'s structure, shapes and
  dtypes; None if the manager holds none.

  A checkpoint that fails to restore (a truncated or missing file) is skipped with a warning naming
  its step; once an earlier one restores, the bad ones are moved to <workdir>/checkpoints_unreadable/
  (kept for inspection; their steps are then saved afresh). If none restores it raises
  `UnreadableCheckpointError`: never a silent restart from step 0.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  directory = str(manager.directory)
  bad = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise plain Exception)
      reason = " ".join(str(e).split())[:200]
      logging.warning("The checkpoint of step %d in %s cannot be restored (%s: %s)%s", step, directory,
                      type(e).__name__, reason, "; trying the previous one" if step != steps[-1] else "")
      bad.append(step)
      continue
    if bad:
      _set_aside(manager, bad)
      logging.warning("Resuming from step %d, not %d: the unreadable checkpoint(s) %s moved to %s", step, bad[0],
                      bad, os.path.join(os.path.dirname(directory), UNREADABLE_DIR))
    return restored["state"], restored["extra"]
  raise UnreadableCheckpointError(
      f"no checkpoint in {directory} can be restored (steps {', '.join(map(str, bad))}; warnings above): move that "
      "folder away to train from step 0, or check that the config matches the one that wrote it")


def _set_aside(manager: ocp.CheckpointManager, steps) -> None:
  """Move unreadable step folders out of the manager's directory (process 0; every process waits)."""
  directory = str(manager.directory)
  aside = os.path.join(os.path.dirname(directory), UNREADABLE_DIR)
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target = os.path.join(aside, f"{step}.{int(time.time())}")
      shutil.move(os.path.join(directory, str(step)), target)
  distributed.barrier("unreadable checkpoints set aside")
  manager.reload()


def latest_checkpoint(workdir: str) -> tuple[ocp.CheckpointManager, int]:
  """(manager, latest step) of <workdir>/checkpoints.

  Raises:
    FileNotFoundError: no checkpoint in the workdir (the message names it).
  """
  ckpt_dir = checkpoints_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in --workdir={workdir} ({ckpt_dir} does not exist): train first "
                            "with python -m jaxrecon.main --config=... --workdir=" + workdir)
  manager = checkpoint_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoints in --workdir={workdir} ({ckpt_dir} is empty): train first")
  return manager, step


def restore_variables(manager: ocp.CheckpointManager, step: int, like: dict) -> tuple[dict, int]:
  """(variables, step) of a checkpoint, for inference: only `like`'s entries (the network's abstract
  variables, {'params': ..., 'batch_stats': ...}, e.g. from `jax.eval_shape` of its init) and the
  step are read, onto the first device. The checkpoint is restored without the optimiser's
  structure, so evaluation does not depend on how training was set up.
  """
  abstract = {**like, "step": jax.ShapeDtypeStruct((), jnp.int32)}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(abstract, restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(
          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), abstract), partial_restore=True)))["state"]
  return {k: restored[k] for k in like}, int(restored["step"])
