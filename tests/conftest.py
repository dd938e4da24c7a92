"""Test setup: 8 emulated CPU devices and the persistent compilation cache.

Both must be configured before jax is imported anywhere, which is why this happens at the
top of conftest.py (pytest imports it before any test module).
"""

import os
import pathlib

_REPO = pathlib.Path(__file__).resolve().parents[1]

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_REPO / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must come after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_report_header(config):
  del config
  return f"jax {jax.__version__}: {jax.device_count()} {jax.devices()[0].platform} devices"


def _small_random_variables(init, rng):
  """Variables with the shapes `init` would make, filled in numpy (no compilation): kernels
  N(0, 0.02) (UMR's net_init), BatchNorm scale/var 1, biases/means 0."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(init)

  def fill(path, leaf):
    name = getattr(path[-1], "key", "")
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


class _NumpyInit:
  """A module whose `init` returns `_small_random_variables` (for `train.create_state`)."""

  def __init__(self, module, rng):
    self.module, self.rng = module, rng

  def init(self, *args, **kwargs):
    return _small_random_variables(lambda: self.module.init(*args, **kwargs), self.rng)

  def __getattr__(self, name):
    return getattr(self.module, name)


@pytest.fixture(scope="session")
def checkpointed_workdir(tmp_path_factory):
  """A workdir as `train.train_and_evaluate` leaves it for configs/test.py (config.json and a step-1
  Orbax checkpoint of `train.create_state`'s state, via `workdir.checkpoint_manager`), made once per
  process, plus the generated tiny dataset. The parameters are a small random initialisation filled
  in numpy: compiling the network's init or train step would cost a minute or more on 2 cores, and
  training is test_train.py's subject. (workdir, data_dir); shared by test_evaluate, test_predict,
  test_notebook, test_ablation and test_ceiling.

  (The imports are here, not at the top: every test session loads this file.)"""
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint as ocp

  from configs import test as test_config
  from jaxrecon import components, train
  from jaxrecon import workdir as workdir_lib
  from jaxrecon.data import builders
  from jaxrecon.geometry import mesh as mesh_lib
  from jaxrecon.models import reconstructor
  # pylint: enable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds_eval"))
  workdir = str(tmp_path_factory.mktemp("eval_workdir"))
  config = test_config.get_config()
  config.data.data_dir = data_dir
  builders.prepare(builders.make_builder("tiny", data_dir=data_dir))
  with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  sphere = mesh_lib.symmetric_sphere(config.mesh.subdivisions)
  model = components.make_model(config, sphere)
  discriminator = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  rng = np.random.default_rng(0)
  tx = optax.adam(train.learning_rate(config))
  s = config.data.image_size
  state = train.create_state(config, _NumpyInit(model, rng), _NumpyInit(discriminator, rng), tx, tx, (1, s, s, 3))
  state = state.replace(step=jnp.ones((), jnp.int32))
  manager = workdir_lib.checkpoint_manager(workdir)
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          extra=ocp.args.JsonSave({"step": 1})))
  manager.wait_until_finished()
  return workdir, data_dir


@pytest.fixture
def cub_tree(tmp_path):
  """A tiny CUB tree of 3 birds: 60x80 images with a white-edged red box 'bird', CMR .mat files,
  SCOPS maps. (cub_dir, cache_dir, scops_dir); shared by test_cub and test_configs."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  import scipy.io
  from PIL import Image

  from jaxrecon.data import cub
  # pylint: enable=g-import-not-at-top
  root, n, (H, W) = tmp_path, 3, (60, 80)  # pylint: disable=invalid-name
  cub_dir, cache_dir, scops_dir = root / "CUB_200_2011", root / "cache", root / "scops"
  (cub_dir / "images" / "001.Bird").mkdir(parents=True)
  (cache_dir / "data").mkdir(parents=True)
  records = np.zeros((n,), dtype=[("rel_path", "O"), ("mask", "O"), ("bbox", "O"), ("parts", "O")])
  for i in range(n):
    x1, y1, x2, y2 = 10 + 5 * i, 12, 50 + 5 * i, 40          # 0-indexed, inclusive
    image = np.zeros((H, W, 3), np.uint8)
    image[..., 1] = 90
    image[y1:y2 + 1, x1:x2 + 1] = (220, 30, 30)
    rel = f"001.Bird/bird_{i}.png"  # PNG: lossless, so pixel checks are exact
    Image.fromarray(image).save(cub_dir / "images" / rel)
    mask = np.zeros((H, W), np.uint8)
    mask[y1:y2 + 1, x1:x2 + 1] = 1
    bbox = np.zeros((1,), dtype=[("x1", "O"), ("y1", "O"), ("x2", "O"), ("y2", "O")])
    bbox[0] = (x1 + 1, y1 + 1, x2 + 1, y2 + 1)               # CMR stores 1-indexed
    parts = np.zeros((3, 15))
    parts[:, 1] = (x2 + 1, (y1 + y2) / 2 + 1, 1)              # Beak at the right edge
    parts[:, 6] = (x2 - 5 + 1, y1 + 3 + 1, 1)                 # LEye
    parts[:, 10] = (0, 0, 0)                                  # REye invisible
    records[i] = (rel, mask, bbox, parts)
    stem_dir = scops_dir / "001.Bird"
    stem_dir.mkdir(parents=True, exist_ok=True)
    ref = cub.square_bbox(cub.perturb_bbox(np.array([x1, y1, x2, y2], float), 0.05, 0.0, None))
    crop_mask = cub.resize_bilinear(cub.crop(mask[..., None].astype(np.float32), ref, 0.0), 256, 256)[..., 0]
    probs = np.stack([1 - crop_mask, crop_mask, 0 * crop_mask, 0 * crop_mask, 0 * crop_mask], -1)
    np.save(stem_dir / f"bird_{i}_{i}.npy", probs.astype(np.float32))
  scipy.io.savemat(cache_dir / "data" / "train_cub_cleaned.mat", {"images": records})
  return str(cub_dir), str(cache_dir), str(scops_dir)
