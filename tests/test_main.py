"""`python -m jaxrecon.main` as a user runs it: a run killed (SIGKILL) after a checkpoint, restarted,
stopped by a SIGTERM and restarted again logs the same TensorBoard scalars, step for step, as an
uninterrupted run; a second run on the busy workdir, bad flags and config values are one-line
errors with status 2; other libraries' INFO lines are hidden unless --verbosity is given.

The two runs (uninterrupted, interrupted) are shared by the tests and run side by side, each on one
CPU device with the compilation cache of the test suite (the second starts once the first has
compiled). Measured on 2 cores shared with other work: 165 s with a warm cache, 298 s cold."""

import glob
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from tensorboardX.proto import event_pb2

from jaxrecon.data import builders

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = os.path.join(_REPO, "jaxrecon")
STEPS = 8
EVERY = 3


def _env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one device, not the tests' 8


def _command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "jaxrecon.main", "--config=configs/test.py", f"--workdir={workdir}",
          "--cpu_devices=1", f"--config.data.data_dir={data_dir}", f"--config.num_train_steps={STEPS}",
          f"--config.checkpoint.every={EVERY}", "--config.eval.splits=()", "--config.log_images_every=0",
          "--config.log_every=1",         # every step logged: the TensorBoard series are compared step by step
          f"--compilation_cache={os.environ['JAX_COMPILATION_CACHE_DIR']}", *extra]


class _Run:
  """A training process whose merged output goes to a file we can poll."""

  def __init__(self, command, log_path):
    self.log_path = log_path
    self._log = open(log_path, "w")
    self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=_REPO, env=_env())

  def text(self):
    with open(self.log_path) as f:
      return f.read()

  def wait_for(self, condition, timeout=400):
    deadline = time.time() + timeout
    while not condition():
      if self.process.poll() is not None:
        raise AssertionError(f"exited ({self.process.returncode}) while waiting:\n{self.text()[-3000:]}")
      if time.time() > deadline:
        raise AssertionError(f"timed out:\n{self.text()[-3000:]}")
      time.sleep(0.05)

  def finish(self, timeout=400):
    code = self.process.wait(timeout)
    self._log.close()
    return code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("main")
  data_dir = str(root / "tfds")
  builders.prepare(builders.make_builder("tiny", data_dir=data_dir))   # before two runs could both build it
  reference_dir, workdir = str(root / "reference"), str(root / "interrupted")
  out = {"workdir": workdir, "reference_dir": reference_dir}
  reference = _Run(_command(reference_dir, data_dir), str(root / "reference.log"))
  # Once the reference has compiled the step (into the cache), the runs to interrupt load it.
  reference.wait_for(lambda: f"step 1/{STEPS}" in reference.text())
  killed = _Run(_command(workdir, data_dir), str(root / "killed.log"))
  lock = os.path.join(workdir, "jaxrecon.lock")
  killed.wait_for(lambda: os.path.exists(lock))
  # While it compiles, the same command again: refused at once.
  out["busy"] = subprocess.run(_command(workdir, data_dir), capture_output=True, text=True, cwd=_REPO, env=_env(),
                               timeout=300, check=False)
  out["killed_pid"] = killed.process.pid
  checkpoint = os.path.join(workdir, "checkpoints", str(EVERY))
  killed.wait_for(lambda: f"step {EVERY + 1}/{STEPS}" in killed.text() and os.path.isdir(checkpoint))
  killed.process.send_signal(signal.SIGKILL)
  out["killed"] = (killed.finish(), killed.text())
  out["lock_after_kill"] = os.path.exists(lock)
  terminated = _Run(_command(workdir, data_dir), str(root / "terminated.log"))
  terminated.wait_for(lambda: f"step {EVERY + 2}/{STEPS}" in terminated.text())
  terminated.process.send_signal(signal.SIGTERM)
  out["terminated"] = (terminated.finish(), terminated.text())
  out["lock_after_sigterm"] = os.path.exists(lock)
  # The same command again, with --verbosity to see every library's INFO lines.
  resumed = _Run(_command(workdir, data_dir, "--verbosity=0"), str(root / "resumed.log"))
  out["resumed"] = (resumed.finish(), resumed.text())
  out["reference"] = (reference.finish(), reference.text())
  return out


def _records(path):
  """The records of a TFRecord file (TensorBoard's event files), up to one a kill cut short."""
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    end = i + 12 + length
    if end + 4 > len(data):
      return
    yield data[i + 12:end]
    i = end + 4


def scalars(logdir) -> dict:
  """{tag: {step: value}} as TensorBoard shows it: files in the order they were written, a
  SessionLog.START at step s (a resumed writer's purge_step) drops the values of steps >= s, and
  a later value of a step replaces an earlier one."""
  files = []
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    events = [event_pb2.Event.FromString(r) for r in _records(path)]
    files.append((events[0].wall_time if events else 0.0, events))
  values = {}
  for _, events in sorted(files, key=lambda f: f[0]):
    for event in events:
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        for series in values.values():
          for step in [s for s in series if s >= event.step]:
            del series[step]
      for value in event.summary.value:
        values.setdefault(value.tag, {})[event.step] = value.simple_value
  return values


def test_interrupted_run_logs_every_step_as_an_uninterrupted_one(runs):
  assert runs["reference"][0] == 0, runs["reference"][1][-3000:]
  assert runs["resumed"][0] == 0, runs["resumed"][1][-3000:]
  reference = scalars(os.path.join(runs["reference_dir"], "tensorboard"))
  interrupted = scalars(os.path.join(runs["workdir"], "tensorboard"))
  assert set(interrupted) == set(reference) and "train/total" in reference
  for tag, series in reference.items():
    assert sorted(series) == list(range(1, STEPS + 1)), tag
    assert sorted(interrupted[tag]) == sorted(series), tag
    if tag != "train/steps_per_second":        # (a timing)
      assert interrupted[tag] == series, tag    # bit for bit: the resumed runs continue exactly


def test_sigkill_restart_resumes_from_the_checkpoint(runs):
  assert runs["killed"][0] == -signal.SIGKILL
  assert runs["lock_after_kill"]
  text = runs["terminated"][1]
  assert f"Resumed from step {EVERY}" in text
  assert f"Took over the stale lock" in text and f"pid {runs['killed_pid']} on {socket.gethostname()} is not running" in text


def test_sigterm_saves_a_checkpoint_and_exits_0(runs):
  status, text = runs["terminated"]
  assert status == 0, text[-3000:]
  stopped = re.search(rf"SIGTERM: stopped after step (\d+) of {STEPS} with a checkpoint in \S+; run the same "
                      "command to resume", text)
  assert stopped, text[-3000:]
  step = int(stopped.group(1))
  assert EVERY + 2 <= step < STEPS
  assert f"Resumed from step {step}" in runs["resumed"][1]
  assert not runs["lock_after_sigterm"]
  assert not os.path.exists(os.path.join(runs["workdir"], "jaxrecon.lock"))


def test_busy_workdir_is_one_line(runs):
  busy = runs["busy"]
  assert busy.returncode == 2
  errors = [line for line in busy.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in busy.stderr
  assert f"is in use by pid {runs['killed_pid']} on {socket.gethostname()}" in errors[0]


def _info_sources(text):
  """The source files of the absl INFO lines ('I1207 20:54:53.44 123 train.py:52] ...')."""
  return {m.group(1) for m in re.finditer(r"^I\d{4} [\d:.]+\s+\d+ ([^:\]]+):\d+\]", text, re.M)}


def test_logs_show_progress_and_hide_other_libraries_info(runs):
  text = runs["reference"][1]
  ours = {os.path.basename(p) for p in glob.glob(os.path.join(_PACKAGE, "**", "*.py"), recursive=True)}
  assert _info_sources(text) <= ours, _info_sources(text) - ours
  assert re.search(rf"step {STEPS}/{STEPS}  total [\d.]+ .* steps/s  elapsed \d+s  ETA \d+s", text)
  assert "checkpoint_manager.py" in _info_sources(runs["resumed"][1])    # --verbosity=0 shows them


@pytest.mark.parametrize("args, message", [
    (["--config.batchsize=16"], "error: --config.batchsize: the config has no field 'batchsize'; did you mean "
                                "--config.batch_size?"),
    (["--config.variance.mode=fancy", "--config.loss_weights.mask=-1"],
     "error: config.variance.mode='fancy': must be one of adaptive, paper, none; config.loss_weights.mask=-1.0: "
     "must be a number >= 0"),
    (["--config.batch_size=12", "--cpu_devices=8"],
     "error: config.batch_size=12 must be divisible by the 8 devices (1 process(es)): e.g. --config.batch_size=16"),
])
def test_config_errors_are_one_line_with_status_2(tmp_path, args, message):
  result = subprocess.run(_command(str(tmp_path / "w"), str(tmp_path / "d"), *args), capture_output=True, text=True,
                          cwd=_REPO, env=_env(), timeout=300, check=False)
  assert result.returncode == 2
  assert message + "\n" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
