"""Multi-process (multi-host) setup: `jax.distributed` from flags, the environment or the cluster.

`initialize` must run before anything touches devices (`jaxrecon.main` calls it first). Where the
cluster description comes from, highest precedence first:

1. Arguments (``python -m jaxrecon.main --coordinator=HOST:PORT --num_processes=N --process_id=I``).
2. Environment variables ``JAXRECON_COORDINATOR``, ``JAXRECON_NUM_PROCESSES``,
   ``JAXRECON_PROCESS_ID``; each one is used only where the matching argument is not given.
   Explicit values are for GPU clusters without a scheduler jax knows, CPU clusters and tests.
3. Auto-detection (mode ``auto``, the default): a Slurm step with more than one task
   (``srun``: SLURM_NTASKS > 1), an Open MPI job (OMPI_COMM_WORLD_SIZE > 1) or a Cloud TPU VM call
   ``jax.distributed.initialize()`` with no arguments and jax reads the rest from the scheduler or
   the TPU metadata (every worker of a pod slice then runs the same command).
4. Otherwise: a single process, nothing is initialised (every local device is still used).

The mode (``--distributed`` or ``JAXRECON_DISTRIBUTED``; argument first) is ``auto``, ``off``
(never initialise, even under Slurm) or ``on`` (always call ``jax.distributed.initialize``; with no
explicit values jax must detect the cluster, otherwise it raises).

CPU clusters: the collectives between processes use gloo
(``jax_cpu_collectives_implementation``; harmless on GPU/TPU, where the accelerator's own
collectives are used). ``--cpu_devices`` / ``JAXRECON_CPU_DEVICES`` sets how many CPU devices each
process exposes (``jax_num_cpu_devices``), e.g. for tests of a cluster on one machine.

Once initialised, `jax.devices()` lists every process's devices; `data_mesh` is the global
('data',) mesh the trainer shards batches over, `is_main_process` says who writes summaries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

ENV_MODE = "JAXRECON_DISTRIBUTED"
ENV_COORDINATOR = "JAXRECON_COORDINATOR"
ENV_NUM_PROCESSES = "JAXRECON_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXRECON_PROCESS_ID"
ENV_CPU_DEVICES = "JAXRECON_CPU_DEVICES"
ENV_TIMEOUT = "JAXRECON_INIT_TIMEOUT"

MODES = ("auto", "on", "off")
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """What `initialize` decided (and did)."""
  method: str                      # 'single' | 'explicit' | 'slurm' | 'ompi' | 'tpu' | 'jax-detect'
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def describe(self) -> str:
    if self.method == "single":
      return "single process (jax.distributed not initialised)"
    if self.method == "explicit":
      return (f"explicit cluster: process {self.process_id} of {self.num_processes}, "
              f"coordinator {self.coordinator}")
    return f"{self.method}: jax.distributed.initialize() detects the cluster"


def _pick(value, env: Mapping[str, str], name: str, flag: str):
  """(value, source) of a setting: the argument if given, else the environment variable."""
  if value is not None and value != "":
    return value, f"--{flag}"
  if env.get(name, "") != "":
    return env[name], name
  return None, None


def _as_int(value, source: str, minimum: int) -> int:
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{source}={value!r} is not an integer") from None
  if number < minimum:
    raise ValueError(f"{source}={number} must be >= {minimum}")
  return number


def _slurm_tasks(env: Mapping[str, str]) -> int:
  """The number of tasks of the current Slurm step (0 outside a step): jax's Slurm detection needs
  these variables, which srun sets (sbatch alone does not set SLURM_STEP_NODELIST)."""
  needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
  if not all(k in env for k in needed):
    return 0
  try:
    return int(env["SLURM_NTASKS"])
  except ValueError:
    return 0


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def resolve(*, mode: str | None = None, coordinator: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None, env: Mapping[str, str] | None = None,
            on_tpu_vm: bool | None = None) -> Cluster:
  """Decide how to initialise from arguments, then `env` (default os.environ), then the cluster.

  Pure (touches no device): `initialize` acts on the result; tests call it directly.

  Raises:
    ValueError: inconsistent settings, naming the flag or environment variable at fault (a process
      id >= the process count, an address without a port, a partial explicit description, ...).
  """
  env = os.environ if env is None else env
  mode_value, mode_source = _pick(mode, env, ENV_MODE, "distributed")
  mode_value = (mode_value or "auto").lower()
  if mode_value not in MODES:
    raise ValueError(f"{mode_source}={mode_value!r}: must be one of {', '.join(MODES)}")
  if mode_value == "off":
    return Cluster("single")

  addr, addr_src = _pick(coordinator, env, ENV_COORDINATOR, "coordinator")
  count, count_src = _pick(num_processes, env, ENV_NUM_PROCESSES, "num_processes")
  pid, pid_src = _pick(process_id, env, ENV_PROCESS_ID, "process_id")
  given = {name: src for name, src in (("coordinator", addr_src), ("num_processes", count_src),
                                       ("process_id", pid_src)) if src is not None}
  if given:
    if count is not None:
      count = _as_int(count, count_src, 1)
    if pid is not None:
      pid = _as_int(pid, pid_src, 0)
    if count == 1 and addr is None and pid in (None, 0):
      return Cluster("single")
    missing = [n for n in ("coordinator", "num_processes", "process_id") if n not in given]
    if missing:
      hint = ", ".join(f"--{n} or {('JAXRECON_' + n.upper()) if n != 'coordinator' else ENV_COORDINATOR}"
                       for n in missing)
      raise ValueError(f"an explicit cluster needs the coordinator, the process count and this process's "
                       f"id; got {', '.join(sorted(given.values()))} but not: {hint}")
    if pid >= count:
      raise ValueError(f"{pid_src}={pid} but {count_src}={count}: process ids run from 0 to {count - 1}")
    match = _ADDRESS.match(str(addr))
    if not match or not 0 < int(match.group(2)) < 65536:
      raise ValueError(f"{addr_src}={addr!r}: expected HOST:PORT (e.g. 10.0.0.1:1234 or 127.0.0.1:8476)")
    return Cluster("explicit", str(addr), count, pid)

  if mode_value == "on":
    return Cluster("jax-detect")
  if _slurm_tasks(env) > 1:
    return Cluster("slurm")
  try:
    if int(env.get("OMPI_COMM_WORLD_SIZE", "0")) > 1:
      return Cluster("ompi")
  except ValueError:
    pass
  if _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
    return Cluster("tpu")
  return Cluster("single")


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # pragma: no cover
    return False


def initialize(*, mode: str | None = None, coordinator: str | None = None, num_processes: int | str | None = None,
               process_id: int | str | None = None, cpu_devices: int | str | None = None,
               timeout_s: int | None = None) -> Cluster:
  """Initialise `jax.distributed` per `resolve` (see the module docstring for the precedence).

  Call it before any JAX computation or `jax.devices()`. A single process (the default) initialises
  nothing. Calling it again after a successful initialisation is a no-op.

  Args:
    mode, coordinator, num_processes, process_id: override JAXRECON_DISTRIBUTED,
      JAXRECON_COORDINATOR, JAXRECON_NUM_PROCESSES and JAXRECON_PROCESS_ID.
    cpu_devices: CPU devices per process (overrides JAXRECON_CPU_DEVICES); None leaves jax's default.
    timeout_s: how long to wait for every process to join (overrides JAXRECON_INIT_TIMEOUT; 300).

  Returns:
    The `Cluster` that was set up.
  """
  devices, devices_src = _pick(cpu_devices, os.environ, ENV_CPU_DEVICES, "cpu_devices")
  timeout, timeout_src = _pick(timeout_s, os.environ, ENV_TIMEOUT, "init_timeout")
  cluster = resolve(mode=mode, coordinator=coordinator, num_processes=num_processes, process_id=process_id)
  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialised: process %d of %d", jax.process_index(),
                 jax.process_count())
    return cluster
  if devices is not None or cluster.method != "single":
    if _backends_started():
      raise RuntimeError("jaxrecon.distributed.initialize must run before anything touches devices "
                         "(jax.devices(), an array, a jit call): call it first, as jaxrecon.main does")
  if devices is not None:
    jax.config.update("jax_num_cpu_devices", _as_int(devices, devices_src, 1))
  if cluster.method == "single":
    return cluster
  # Processes on CPU exchange all-reduces through gloo (accelerators use their own collectives).
  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs: dict[str, Any] = {}
  if timeout is not None:
    kwargs["initialization_timeout"] = _as_int(timeout, timeout_src, 1)
  if cluster.method == "explicit":
    kwargs.update(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                  process_id=cluster.process_id)
  logging.info("jax.distributed: %s", cluster.describe())
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return cluster


# ----------------------------------------------------------------------------------------------
# Helpers for the trainer
# ----------------------------------------------------------------------------------------------


def is_main_process() -> bool:
  """True on process 0, the one that writes summaries, images, metrics.json and templates."""
  return jax.process_index() == 0


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The global 1-D ('data',) mesh over every process's devices, process by process.

  Devices are ordered by (process index, device id), so process p's local batch fills one
  contiguous block of the global batch (`jax.make_array_from_process_local_data`): global rows
  [p·b, (p+1)·b) with b = batch_size / process_count.
  """
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), ("data",))


def replicate(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`tree` as arrays with `sharding` (typically replicated over `data_mesh`), across processes.

  Host values and process-local arrays must hold the same value on every process (as a state built
  from the same seed does); arrays that are already global are resharded. Unlike a plain
  `jax.device_put`, this also takes typed PRNG key arrays into a sharding that spans other
  processes' devices (device_put refuses them there).
  """
  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(one, tree)


BARRIER_TIMEOUT_S = 3600
_barrier_count = 0


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Wait until every process gets here (no-op for one process), through the coordination service.

  Call it before a collective that processes may reach at very different times (after a compile,
  after work only process 0 does): gloo's CPU collectives give up when a peer is 30 s late, this
  waits up to `timeout_s`. Every process must call the same barriers in the same order.
  """
  global _barrier_count
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  _barrier_count += 1
  jax_distributed.global_state.client.wait_at_barrier(f"jaxrecon:{_barrier_count}:{name}", int(timeout_s * 1000))


def allgather_json(value: Any) -> list:
  """Every process's `value` (anything JSON-serialisable), in process order. Collective: every
  process must call it. One process: [value]."""
  if jax.process_count() == 1:
    return [value]
  barrier("allgather_json")
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def process_mean(value: np.ndarray, weight: float = 1.0) -> np.ndarray:
  """The `weight`-weighted mean of `value` over processes (float64 on the host). Collective."""
  value = np.asarray(value, np.float64)
  if jax.process_count() == 1:
    return value
  barrier("process_mean")
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # Gathered as float32 (x64 is usually off); the weighted sum is then taken in float64.
  values = np.asarray(multihost_utils.process_allgather(value.astype(np.float32)), np.float64)
  weights = np.asarray(multihost_utils.process_allgather(np.array([weight], np.float32)), np.float64).reshape(-1)
  return np.tensordot(weights, values, axes=(0, 0)) / weights.sum()


def merge_eval_results(results: Mapping[str, Any]) -> dict:
  """Combine `evaluation.evaluate` results computed by each process on its shard of a split.

  Per-image means (``eval/<split>/<metric>``) become the image-count-weighted mean over processes
  and ``eval/<split>/num_images`` the total, so they equal a one-process evaluation of the whole
  split. Split-level statistics that do not decompose into per-image means (``fid``, ``pck_*``,
  ``kp_pairs``) are the weighted mean of the per-shard values: an approximation, flagged in
  ``eval_skipped/<split>``. Collective: every process must call it with the same keys. One process:
  unchanged.
  """
  results = dict(results)
  if jax.process_count() == 1:
    return results
  gathered = allgather_json({k: v for k, v in results.items()
                             if isinstance(v, (int, float)) and k.startswith("eval/")})
  splits = {k.split("/")[1] for k in gathered[0] if k.endswith("/num_images")}
  for split in splits:
    counts = np.array([g[f"eval/{split}/num_images"] for g in gathered], np.float64)
    for key in gathered[0]:
      if not key.startswith(f"eval/{split}/") or key.endswith("/num_images"):
        continue
      values = np.array([g[key] for g in gathered], np.float64)
      results[key] = float(np.sum(values * counts) / max(counts.sum(), 1.0))
      metric = key.rsplit("/", 1)[1]
      if metric == "fid" or metric.startswith("pck_") or metric == "kp_pairs":
        skipped = dict(results.get(f"eval_skipped/{split}", {}))
        skipped[f"{metric}_exact"] = (f"mean of {len(gathered)} per-process values, each over its shard of "
                                      "the split (not a single statistic over the whole split)")
        results[f"eval_skipped/{split}"] = skipped
    results[f"eval/{split}/num_images"] = int(counts.sum())
  return results
