"""jaxrecon.workdir_lock: one run per workdir, stale locks of dead runs taken over, multi-process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxrecon import workdir_lock


def _write_lock(workdir, **holder):
  path = workdir_lock.lock_path(str(workdir))
  with open(path, "w") as f:
    json.dump(holder, f)
  return path


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_second_run_is_refused_naming_the_first(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    path = workdir_lock.lock_path(str(tmp_path))
    holder = json.load(open(path))
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    # Another live process on this host holds it: this process's parent stands in for it.
    os.remove(path)
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), started=time.time())
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"is in use by pid {os.getppid()} on {socket.gethostname()} since .*delete {path}"):
      workdir_lock.acquire(str(tmp_path))
  assert os.path.exists(path)         # not ours any more: release leaves it
  os.remove(path)
  with workdir_lock.hold(str(tmp_path)):
    pass
  assert not os.path.exists(path)     # released at the end of the block


def test_lock_is_released_when_the_run_raises(tmp_path):
  with pytest.raises(FloatingPointError):
    with workdir_lock.hold(str(tmp_path)):
      raise FloatingPointError("nan")
  assert not os.path.exists(workdir_lock.lock_path(str(tmp_path)))


def test_stale_locks_are_taken_over_with_a_warning(tmp_path, caplog):
  dead = _dead_pid()
  _write_lock(tmp_path, pid=dead, host=socket.gethostname(), started=time.time())
  with caplog.at_level("WARNING"):
    mine = workdir_lock.acquire(str(tmp_path))
  assert mine["pid"] == os.getpid()
  assert "stale lock" in caplog.text and f"pid {dead} on {socket.gethostname()} is not running" in caplog.text
  os.remove(workdir_lock.lock_path(str(tmp_path)))
  # A restarted container reuses its pid: a lock naming this very process is a previous life's.
  _write_lock(tmp_path, pid=os.getpid(), host=socket.gethostname(), started=0)
  workdir_lock.acquire(str(tmp_path))
  os.remove(workdir_lock.lock_path(str(tmp_path)))


def test_other_hosts_locks_go_stale_without_heartbeat(tmp_path):
  path = _write_lock(tmp_path, pid=1, host="another-host", started=time.time())
  with pytest.raises(workdir_lock.WorkdirBusyError, match="pid 1 on another-host"):
    workdir_lock.acquire(str(tmp_path))
  old = time.time() - workdir_lock.STALE_AFTER_S - 5
  os.utime(path, (old, old))
  assert "another-host has not refreshed it" in workdir_lock.stale_reason(json.load(open(path)), path)
  workdir_lock.acquire(str(tmp_path))
  assert json.load(open(path))["host"] == socket.gethostname()


def test_heartbeat_refreshes_the_lock(tmp_path):
  path = workdir_lock.lock_path(str(tmp_path))
  with workdir_lock.hold(str(tmp_path), heartbeat_s=0.05):
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - os.stat(path).st_mtime < 5


def test_multi_process_share_process_zeros_outcome(tmp_path):
  """Only process 0 takes the lock; the others learn its outcome through `share` (in a real run
  distributed.allgather_json; here each process's view is simulated)."""
  path = workdir_lock.lock_path(str(tmp_path))
  with workdir_lock.hold(str(tmp_path), process_index=1, share=lambda mine: [None, mine]):
    assert not os.path.exists(path)   # process 1 takes nothing
  _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), started=time.time())
  busy = workdir_lock.busy_message(str(tmp_path), json.load(open(path)), path)
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getppid()}"):
    with workdir_lock.hold(str(tmp_path), process_index=1, share=lambda mine: [busy, mine]):
      pass
