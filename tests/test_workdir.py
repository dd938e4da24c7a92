"""jaxrecon/workdir.py: the run-directory layout, unreadable checkpoints set aside, and the
inference restore's errors (the restore itself: test_evaluate.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrecon import workdir as workdir_lib


def test_layout(tmp_path):
  w = str(tmp_path)
  assert workdir_lib.checkpoints_dir("run") == os.path.join(os.path.abspath("run"), "checkpoints")
  assert workdir_lib.eval_dir(w, "test") == os.path.join(w, "eval_test")
  assert workdir_lib.eval_dir(w, "val", "umr_compatible") == os.path.join(w, "eval_val_umr_compatible")
  assert workdir_lib.image_path(w, 3) == os.path.join(w, "images", "step_000003.png")
  assert workdir_lib.CONFIG_FILE == "config.json" and workdir_lib.METRICS_FILE == "metrics.json"


def _truncate_largest_file(directory):
  files = [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)


def _tree(step):
  return {"a": jnp.arange(5000.0) * step, "b": jnp.full(3, float(step))}


def _save(manager, step):
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_tree(step)), extra=ocp.args.JsonSave({"step": step})))


# Orbax leaves the failed reads' coroutines un-awaited ("Exception ignored in ..."): expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  """A truncated file in the latest checkpoint: the previous one is restored with a warning naming
  the bad step, which is set aside so that step can be saved again; none readable is an error."""
  manager = workdir_lib.checkpoint_manager(str(tmp_path), max_to_keep=3)
  for step in (2, 4):
    _save(manager, step)
  manager.wait_until_finished()
  _truncate_largest_file(tmp_path / "checkpoints" / "4" / "state")
  manager = workdir_lib.checkpoint_manager(str(tmp_path), max_to_keep=3)
  with caplog.at_level("WARNING"):
    state, extra = workdir_lib.restore_latest(manager, _tree(0))
  assert extra["step"] == 2
  np.testing.assert_array_equal(state["a"], _tree(2)["a"])
  assert "The checkpoint of step 4 in" in caplog.text and "Resuming from step 2, not 4" in caplog.text
  assert manager.all_steps() == [2]
  assert [name.split(".")[0] for name in os.listdir(tmp_path / workdir_lib.UNREADABLE_DIR)] == ["4"]
  _save(manager, 4)                     # the set-aside step is saved afresh
  manager.wait_until_finished()
  for step in (2, 4):
    _truncate_largest_file(tmp_path / "checkpoints" / str(step) / "state")
  with pytest.raises(workdir_lib.UnreadableCheckpointError,
                     match=r"no checkpoint in .*checkpoints can be restored \(steps 4, 2"):
    workdir_lib.restore_latest(workdir_lib.checkpoint_manager(str(tmp_path)), _tree(0))


def test_restore_latest_of_an_empty_workdir_is_none(tmp_path):
  assert workdir_lib.restore_latest(workdir_lib.checkpoint_manager(str(tmp_path)), _tree(0)) is None


def test_latest_checkpoint_errors_and_partial_restore(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"does not exist\): train first"):
    workdir_lib.latest_checkpoint(str(tmp_path))
  manager = workdir_lib.checkpoint_manager(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"is empty\): train first"):
    workdir_lib.latest_checkpoint(str(tmp_path))
  # A train-state-like checkpoint: the inference restore reads only the variables and the step.
  state = {"params": {"w": jnp.arange(3.0)}, "batch_stats": {"m": jnp.ones(2)}, "step": jnp.asarray(7, jnp.int32),
           "opt_state": {"mu": jnp.zeros(3)}}
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({"step": 7})))
  manager.wait_until_finished()
  manager, step = workdir_lib.latest_checkpoint(str(tmp_path))
  assert step == 7
  like = jax.eval_shape(lambda: {"params": state["params"], "batch_stats": state["batch_stats"]})
  variables, step = workdir_lib.restore_variables(manager, step, like)
  assert step == 7 and set(variables) == {"params", "batch_stats"}
  np.testing.assert_array_equal(variables["params"]["w"], np.arange(3.0))
