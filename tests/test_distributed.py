"""Multi-process training (`jaxrecon.distributed`, launch/): settings, launch scripts, and a real
two-process cluster on loopback against one process with the same global batch and device count.

The cluster test runs this file as a script (``python tests/test_distributed.py worker ...``): each
worker initialises jax.distributed from JAXRECON_* variables (as `jaxrecon.main` does), runs
`train.train_and_evaluate` of configs/test.py with the same global batches, and prints its history.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MARKER = "DISTRIBUTED_RESULT "
STEPS = 3
WORKER_TIMEOUT_S = 900    # generous: 2 shared cores under load need ~8 min; idle, ~3


# ----------------------------------------------------------------------------------------------
# resolve(): precedence and errors (no devices touched)
# ----------------------------------------------------------------------------------------------


def _resolve(env=None, **kwargs):
  from jaxrecon import distributed
  return distributed.resolve(env=env or {}, on_tpu_vm=False, **kwargs)


def test_single_process_by_default():
  assert _resolve().method == "single"
  assert _resolve({"JAXRECON_NUM_PROCESSES": "1"}).method == "single"


def test_environment_and_flag_precedence():
  env = {"JAXRECON_COORDINATOR": "10.0.0.1:1234", "JAXRECON_NUM_PROCESSES": "4", "JAXRECON_PROCESS_ID": "3"}
  cluster = _resolve(env)
  assert (cluster.method, cluster.coordinator, cluster.num_processes, cluster.process_id) == (
      "explicit", "10.0.0.1:1234", 4, 3)
  cluster = _resolve(env, process_id=1, coordinator="127.0.0.1:99")        # arguments win per field
  assert (cluster.coordinator, cluster.num_processes, cluster.process_id) == ("127.0.0.1:99", 4, 1)
  assert _resolve(env, mode="off").method == "single"
  assert _resolve({**env, "JAXRECON_DISTRIBUTED": "off"}).method == "single"


def test_auto_detection():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0"}
  assert _resolve(slurm).method == "slurm"
  assert _resolve({**slurm, "SLURM_NTASKS": "1"}).method == "single"
  assert _resolve({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}).method == "single"  # sbatch, no srun
  assert _resolve({"OMPI_COMM_WORLD_SIZE": "8"}).method == "ompi"
  from jaxrecon import distributed
  assert distributed.resolve(env={}, on_tpu_vm=True).method == "tpu"
  assert _resolve(mode="on").method == "jax-detect"
  # Explicit values beat the scheduler.
  assert _resolve({**slurm, "JAXRECON_COORDINATOR": "h:1", "JAXRECON_NUM_PROCESSES": "2",
                   "JAXRECON_PROCESS_ID": "1"}).method == "explicit"


@pytest.mark.parametrize("env, kwargs, message", [
    ({"JAXRECON_COORDINATOR": "h:1", "JAXRECON_NUM_PROCESSES": "2", "JAXRECON_PROCESS_ID": "2"}, {},
     r"JAXRECON_PROCESS_ID=2 but JAXRECON_NUM_PROCESSES=2: process ids run from 0 to 1"),
    ({"JAXRECON_COORDINATOR": "h:1", "JAXRECON_NUM_PROCESSES": "2"}, {"process_id": 5},
     r"--process_id=5 but JAXRECON_NUM_PROCESSES=2"),
    ({"JAXRECON_NUM_PROCESSES": "2", "JAXRECON_PROCESS_ID": "0"}, {},
     r"not: --coordinator or JAXRECON_COORDINATOR"),
    ({"JAXRECON_COORDINATOR": "nohost", "JAXRECON_NUM_PROCESSES": "2", "JAXRECON_PROCESS_ID": "0"}, {},
     r"JAXRECON_COORDINATOR='nohost': expected HOST:PORT"),
    ({"JAXRECON_NUM_PROCESSES": "two"}, {}, r"JAXRECON_NUM_PROCESSES='two' is not an integer"),
    ({"JAXRECON_NUM_PROCESSES": "0"}, {}, r"JAXRECON_NUM_PROCESSES=0 must be >= 1"),
    ({"JAXRECON_DISTRIBUTED": "maybe"}, {}, r"JAXRECON_DISTRIBUTED='maybe': must be one of auto, on, off"),
])
def test_inconsistent_settings_name_the_variable(env, kwargs, message):
  with pytest.raises(ValueError, match=message):
    _resolve(env, **kwargs)


def test_main_reports_a_bad_process_id():
  env = {**os.environ, "JAXRECON_COORDINATOR": "127.0.0.1:1", "JAXRECON_NUM_PROCESSES": "2",
         "JAXRECON_PROCESS_ID": "2"}
  result = subprocess.run([sys.executable, "-m", "jaxrecon.main", "--config=configs/test.py", "--workdir=/nonexistent"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "JAXRECON_PROCESS_ID=2 but JAXRECON_NUM_PROCESSES=2" in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# launch/ scripts: --dry-run prints the command
# ----------------------------------------------------------------------------------------------


def _dry_run(script, *args, env=None):
  result = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_launch_tpu_pod_dry_run():
  out = _dry_run("tpu_pod.sh", "--tpu=my-v4-32", "--zone=us-central2-b", "configs/cub.py", "gs://b/run1",
                 "--config.batch_size=256")
  assert ("gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all "
          "'--command=cd ~/jaxrecon && source ~/jaxrecon/.venv/bin/activate && python -m jaxrecon.main") in out
  assert "python -m jaxrecon.main --config=configs/cub.py --workdir=gs://b/run1 --config.batch_size=256" in out


def test_launch_multi_gpu_dry_run():
  out = _dry_run("multi_gpu.sh", "configs/synthetic.py", "/tmp/run")
  assert "python -m jaxrecon.main --config=configs/synthetic.py --workdir=/tmp/run" in out


def test_launch_slurm_dry_run():
  out = _dry_run("slurm.sbatch", "configs/cub.py", "/scratch/run", env={"NODES": "4", "GPUS_PER_NODE": "8"})
  assert "sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8" in out
  assert "srun" in out and "python -m jaxrecon.main --config=configs/cub.py --workdir=/scratch/run" in out


def test_launch_scripts_need_config_and_workdir():
  for script in ("tpu_pod.sh", "multi_gpu.sh", "slurm.sbatch"):
    result = subprocess.run(["bash", str(REPO / "launch" / script), "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode != 0 and "usage" in result.stderr.lower(), (script, result.stderr)


# ----------------------------------------------------------------------------------------------
# A two-process cluster on loopback vs one process
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAXRECON_")}
  # XLA:CPU sizes a process's intra-op thread pool max(NPROC or the cores, local devices), and how
  # ops split their work over it changes their rounding: every process gets the same pool (4).
  env.update({"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "NPROC": "4",
              **{k: str(v) for k, v in extra.items()}})
  return env


def _spawn(workdir, data_dir, *, restore_from=None, **env):
  args = [sys.executable, __file__, "worker", str(workdir), str(data_dir)]
  if restore_from:
    args.append(str(restore_from))
  # SIGKILL: jax's preemption notifier catches SIGTERM. A session of its own: the clean-up below
  # kills `timeout` and the worker together.
  return subprocess.Popen(["timeout", "-s", "KILL", str(WORKER_TIMEOUT_S), *args], cwd=REPO,
                          env=_worker_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


def _result(process, name):
  out, err = process.communicate(timeout=WORKER_TIMEOUT_S + 30)
  assert process.returncode == 0, f"{name} failed (rc {process.returncode}):\n{err[-4000:]}"
  lines = [line for line in out.splitlines() if line.startswith(MARKER)]
  return json.loads(lines[-1][len(MARKER):]) if lines else None


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
  """The 2-process run (2 CPU devices each) and the 1-process run (4 devices), started together
  (the reference waits for the cluster's checkpoint before restoring it)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  _prepare_data(data_dir)
  two, one = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("one_process")
  port = _free_port()
  cluster = {"JAXRECON_COORDINATOR": f"127.0.0.1:{port}", "JAXRECON_NUM_PROCESSES": 2, "JAXRECON_CPU_DEVICES": 2,
             "JAXRECON_INIT_TIMEOUT": 120}
  workers = [_spawn(two, data_dir, JAXRECON_PROCESS_ID=i, **cluster) for i in range(2)]
  reference = _spawn(one, data_dir, restore_from=two, JAXRECON_CPU_DEVICES=4)
  try:
    results = [_result(w, f"process {i}") for i, w in enumerate(workers)]
    single = _result(reference, "the one-process run")
  finally:
    for p in (*workers, reference):
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
  return results, single, two


def _prepare_data(data_dir):
  from configs import test as test_config
  from jaxrecon.data import builders
  config = test_config.get_config()
  builders.prepare(builders.make_builder(config.data.synthetic_config, data_dir=str(data_dir)))


@pytest.mark.slow
def test_two_processes_match_one(cluster_runs):
  import numpy as np
  (main, other), single, _ = cluster_runs
  assert other is None                          # only process 0 reports
  assert main["process_count"] == 2 and main["device_count"] == 4 and main["local_device_count"] == 2
  assert single["process_count"] == 1 and single["device_count"] == 4
  assert len(main["history"]) == STEPS
  two, one = main["history"], single["history"]
  # config.reduction='ordered': every cross-device sum adds in device order, so (with the same
  # intra-op thread pool in every process, NPROC above) the split of the 4 devices over processes
  # changes nothing: every step's losses and gradient norm, and the parameters after the last step,
  # agree (to 1e-5; measured: bit for bit).
  for key in ("total", "mask", "texture_l1", "gan", "grad_norm"):
    np.testing.assert_allclose([h[key] for h in two], [h[key] for h in one], rtol=1e-5, atol=0, err_msg=key)
  # The checkpoint the cluster wrote restores in one process and equals the one-process parameters.
  assert single["restored_step"] == STEPS
  assert single["max_param_diff"] <= 1e-5, single["max_param_diff"]


@pytest.mark.slow
def test_only_process_zero_writes(cluster_runs):
  *_, workdir = cluster_runs
  assert (workdir / "metrics.json").exists() and (workdir / "config.json").exists()
  assert len(list((workdir / "tensorboard").iterdir())) == 1          # one event file: process 0's
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


# ----------------------------------------------------------------------------------------------
# The worker (run as a script)
# ----------------------------------------------------------------------------------------------


class _Batches:
  """The train split in file order, global batch after global batch; this process gets its block of
  rows (process p: [p·b, (p+1)·b)), exactly as `data_mesh` lays batches out. Resumable like grain."""

  def __init__(self, config, process_index, process_count):
    import numpy as np
    from jaxrecon import components
    from jaxrecon.data import builders, pipeline
    self.np = np
    builder = builders.make_builder(config.data.synthetic_config, data_dir=config.data.data_dir)
    self.source = builder.as_data_source("train")
    self.decode, self.barrier = pipeline.DecodeExample(config.data.image_size), components.AddBarrier()
    self.global_batch, self.local = config.batch_size, config.batch_size // process_count
    self.offset = process_index * self.local
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self):
    start = (self.step * self.global_batch) % (len(self.source) - self.global_batch + 1) + self.offset
    examples = [self.barrier.map(self.decode.map(self.source[i])) for i in range(start, start + self.local)]
    self.step += 1
    return {k: self.np.stack([e[k] for e in examples]) for k in ("image", "mask", "barrier")}

  def get_state(self):
    return json.dumps({"step": self.step}).encode()

  def set_state(self, state):
    self.step = json.loads(state)["step"]


def _worker(workdir, data_dir, restore_from=None):
  from absl import logging
  logging.set_verbosity(logging.INFO)   # the trainer's progress lands in the failure message
  from jaxrecon import distributed
  distributed.initialize()          # from the JAXRECON_* environment, as jaxrecon.main
  import jax
  import numpy as np
  from configs import test as test_config
  from jaxrecon import components, train

  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.num_train_steps = STEPS
  config.reduction = "ordered"      # sums in device order: the same bits for 2 processes and 1
  config.log_every = 1              # train_history: every step's metrics (a window of 1), compared bit for bit
  config.log_images_every = 0
  config.eval.splits = ()           # evaluation of a shard per process: see the report / train.py patch
  original = components.make_data
  components.make_data = lambda c, split, **kw: (
      _Batches(c, jax.process_index(), jax.process_count()) if split == "train" else original(c, split, **kw))
  results = train.train_and_evaluate(config, workdir)
  report = {"process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "history": [{k: h[k] for k in ("total", "mask", "texture_l1", "gan", "grad_norm")}
                        for h in results["train_history"]]}
  if restore_from:
    report.update(_compare_checkpoints(config, restore_from, workdir))
  if distributed.is_main_process():
    print(MARKER + json.dumps(report), flush=True)
  del np


def _compare_checkpoints(config, other_workdir, workdir):
  """Restore the latest checkpoints of both runs in this process and compare their parameters."""
  import time
  import jax
  import numpy as np
  import optax
  from jaxrecon import components, train
  from jaxrecon import workdir as workdir_lib
  from jaxrecon.models import reconstructor
  deadline = time.time() + WORKER_TIMEOUT_S
  while not (pathlib.Path(other_workdir) / "metrics.json").exists():     # written after the last save
    if time.time() > deadline:
      raise TimeoutError(f"no finished run in {other_workdir}")
    time.sleep(1)
  sphere = components.sphere_for(config)
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx = optax.adam(train.learning_rate(config), b1=0.9, b2=0.999)          # as train_and_evaluate
  disc_tx = optax.adam(train.learning_rate(config), b1=0.5, b2=0.999)
  s = config.data.image_size
  like = train.create_state(config, model, disc, tx, disc_tx, (1, s, s, 3))
  theirs, extra = workdir_lib.restore_latest(workdir_lib.checkpoint_manager(other_workdir), like)
  mine, _ = workdir_lib.restore_latest(workdir_lib.checkpoint_manager(workdir), like)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
                       (theirs.params, theirs.batch_stats), (mine.params, mine.batch_stats))
  return {"restored_step": int(extra["step"]), "max_param_diff": max(jax.tree.leaves(diffs))}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
  sys.path.insert(0, str(REPO))
  _worker(*sys.argv[2:])
