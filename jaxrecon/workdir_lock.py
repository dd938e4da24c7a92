"""One run per workdir: a lock file, <workdir>/jaxrecon.lock, holding the pid and host of its run.

`hold(workdir)` takes it for the duration of a `with` block and removes it at the end (also when
the run stops on an error or after a SIGTERM). A second run on the same workdir gets
`WorkdirBusyError` naming the process that holds it. A lock left behind by a run that is gone (a
SIGKILL, a crashed host) is stale and taken over with a warning:

* same host: the holder's pid no longer exists (or is this very process: a restarted container
  reusing its pid);
* another host: the pid cannot be checked from here, so the holder refreshes the file's
  modification time every `HEARTBEAT_S` seconds and a lock not refreshed for `STALE_AFTER_S` is
  stale (this assumes the hosts' clocks agree to within minutes).

Multi-process runs share one workdir: process 0 alone takes the lock and the outcome is shared with
every process (`distributed.allgather_json`), so all of them stop together on a busy workdir. The
lock is advisory: it guards against starting a second command by mistake, and two runs racing to
take over the same stale lock within milliseconds could both proceed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

from absl import logging

LOCK_FILE = "jaxrecon.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir; the message is one line naming it."""


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _read(path: str) -> dict | None:
  """The holder recorded in `path`; {} when it is unreadable (half written); None when absent."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:     # exists, owned by another user
    return True
  return True


def stale_reason(holder: dict, path: str, now: float | None = None) -> str | None:
  """Why the lock `holder` (read from `path`) is stale, or None while its run may be alive."""
  now = time.time() if now is None else now
  try:
    age = now - os.stat(path).st_mtime
  except FileNotFoundError:
    return "it disappeared"
  pid, host = holder.get("pid"), holder.get("host")
  if not isinstance(pid, int) or not host:
    # Half written by a process that died between creating and filling it (or not ours).
    return f"it names no process and is {age:.0f} s old" if age > HEARTBEAT_S else None
  if host == socket.gethostname():
    if pid == os.getpid():
      return f"pid {pid} is this process (a restart that reuses the pid)"
    if not _pid_alive(pid):
      return f"pid {pid} on {host} is not running"
    return None
  if age > STALE_AFTER_S:
    return f"{host} has not refreshed it for {age:.0f} s (> {STALE_AFTER_S:.0f} s)"
  return None


def busy_message(workdir: str, holder: dict, path: str) -> str:
  since = holder.get("started")
  started = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
  who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unknown process"
  return (f"--workdir={workdir} is in use by {who}{started} ({path}): wait for that run to end, stop it, or "
          f"use another --workdir; if no such run exists, delete {path}")


def _create(path: str, content: str) -> bool:
  """Atomically create `path` holding `content` (a link of a filled temporary file: no reader sees
  it half written); False if it exists."""
  tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(content)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:             # a file system without hard links: exclusive create, then fill
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(content)
    return True
  finally:
    os.remove(tmp)


def acquire(workdir: str) -> dict:
  """Take the lock of `workdir` (which must exist); returns what it records.

  Raises:
    WorkdirBusyError: a live run holds it.
  """
  path = lock_path(workdir)
  mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
  for _ in range(3):
    if _create(path, json.dumps(mine)):
      return mine
    holder = _read(path)
    if holder is None:        # released meanwhile
      continue
    reason = stale_reason(holder, path)
    if reason is None:
      raise WorkdirBusyError(busy_message(workdir, holder, path))
    # Move the stale lock aside and check it is the one judged stale (not a new run's lock).
    aside = f"{path}.stale.{os.getpid()}"
    try:
      os.rename(path, aside)
    except FileNotFoundError:
      continue
    if _read(aside) != holder:
      os.rename(aside, path)
      continue
    os.remove(aside)
    logging.warning("Took over the stale lock %s of pid %s on %s: %s", path, holder.get("pid"),
                    holder.get("host"), reason)
  raise WorkdirBusyError(f"--workdir={workdir}: could not take {path} (other runs keep taking it)")


def release(workdir: str, mine: dict) -> None:
  """Remove the lock if it is still ours."""
  path = lock_path(workdir)
  if _read(path) == mine:
    os.remove(path)


def _heartbeat(path: str, stop: threading.Event, every: float) -> None:
  while not stop.wait(every):
    try:
      os.utime(path)
    except OSError:
      logging.warning("The workdir lock %s is gone: another run may now start on this workdir", path)
      return


@contextlib.contextmanager
def hold(workdir: str, *, process_index: int = 0, share=None, heartbeat_s: float = HEARTBEAT_S):
  """The lock of `workdir` for the block: taken by process 0 only.

  `share`: a collective (e.g. `distributed.allgather_json`) giving every process's value in process
  order; every process then sees process 0's outcome, so a busy workdir stops all of them. None for
  a single process.
  """
  mine, error = None, None
  if "://" in workdir:
    logging.warning("--workdir=%s is a URL: it is not locked against a second run", workdir)
  elif process_index == 0:
    try:
      mine = acquire(workdir)
    except WorkdirBusyError as e:
      error = str(e)
  if share is not None:
    error = share(error)[0]
  if error:
    raise WorkdirBusyError(error)
  stop = threading.Event()
  if mine is not None:
    threading.Thread(target=_heartbeat, args=(lock_path(workdir), stop, heartbeat_s), daemon=True,
                     name="workdir-lock-heartbeat").start()
  try:
    yield
  finally:
    stop.set()
    if mine is not None:
      release(workdir, mine)
