"""The train loop on configs/test.py: exact resume, the NaN guard, 1 vs 8 devices, learning."""

import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from jaxrecon import components, train
from jaxrecon.data import synthetic
from jaxrecon.geometry import mesh as mesh_lib
from jaxrecon.models import reconstructor, weights


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, steps, evaluate=True):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.num_train_steps = steps
  config.log_every = 1              # train_history holds every step (a window of 1) for the comparisons below
  if not evaluate:                  # tests of the training history alone skip the evaluation's compile
    config.eval.splits = ()
  return config


def _losses(history):
  return np.array([h["total"] for h in history])


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, train.train_and_evaluate(_config(data_dir, 3), workdir)


def test_outputs(straight_run):
  workdir, results = straight_run
  assert len(results["train_history"]) == 3
  for split in ("validation", "test"):
    assert 0.0 <= results[f"eval/{split}/mask_iou"] <= 1.0
    assert -1.0 <= results[f"eval/{split}/ssim"] <= 1.0
    assert 0.0 <= results[f"eval/{split}/camera_error_deg"] <= 180.0
    assert 0.0 <= results[f"eval/{split}/camera_error_twin_deg"] <= 180.0
    assert 0.0 < results[f"eval/{split}/chamfer_3d"] < 8.0     # unit-RMS shapes
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["step"] == 3
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  # The reconstruction grid: 4 rows of input | render | silhouettes | 2 novel views | UV (2 wide) | variance.
  grid = np.asarray(Image.open(os.path.join(workdir, "images", "step_000003.png")))
  assert grid.shape == (4 * 64, 8 * 64, 3)
  assert grid[:, :64].std() > 0 and grid[:, 64:128].std() > 0   # the input and the render are not blank
  # Every term is logged (finite: the NaN guard stops a run otherwise).
  assert {"mask", "laplacian", "flatten", "deform", "texture_l1", "texture_dt", "texture_cycle", "camera_entropy",
          "variance_lookahead", "gan", "discriminator", "grad_norm"} <= set(results["train_history"][0])


def test_resume_continues_exactly(straight_run, data_dir, tmp_path):
  _, straight = straight_run
  workdir = str(tmp_path / "resumed")
  first = train.train_and_evaluate(_config(data_dir, 2, evaluate=False), workdir)   # checkpoints at step 2
  second = train.train_and_evaluate(_config(data_dir, 3, evaluate=False), workdir)  # restores step 2, runs step 3
  assert len(second["train_history"]) == 1
  resumed = np.concatenate([_losses(first["train_history"]), _losses(second["train_history"])])
  np.testing.assert_array_equal(resumed, _losses(straight["train_history"]))


def test_logged_metrics_are_the_means_of_their_window(straight_run, data_dir, tmp_path):
  _, straight = straight_run        # logged every step
  config = _config(data_dir, 2, evaluate=False)
  config.log_every = 2
  history = train.train_and_evaluate(config, str(tmp_path / "every2"))["train_history"]
  assert [h["step"] for h in history] == [2]
  assert [h["step"] for h in straight["train_history"]] == [1, 2, 3]
  steps = straight["train_history"][:2]
  for k in ("total", "mask", "texture_l1", "grad_norm", "param_norm", "discriminator"):
    np.testing.assert_allclose(history[0][k], np.mean([h[k] for h in steps]), rtol=1e-6, err_msg=k)
  assert history[0]["learning_rate"] == steps[1]["learning_rate"]    # the rate of the window's last step


def test_nan_guard_names_the_terms_and_the_window(data_dir, tmp_path, monkeypatch):
  original = train.pipeline.global_batch
  calls = []

  def poisoned(batch, sharding):    # NaN images from step 3 on
    calls.append(1)
    if len(calls) >= 3:
      batch = dict(batch)
      batch["image"] = np.full_like(batch["image"], np.nan)
    return original(batch, sharding)

  monkeypatch.setattr(train.pipeline, "global_batch", poisoned)
  workdir = str(tmp_path / "nan")
  config = _config(data_dir, 5, evaluate=False)
  config.log_every, config.checkpoint.every, config.log_images_every = 5, 2, 0
  # No log step before step 5: the check before step 4's checkpoint stops the run.
  with pytest.raises(FloatingPointError, match=r"non-finite .*texture_l1.* between steps 3 and 4 \(first at "
                                               r"step 3\)\. Training stopped; the last checkpoint \(step 2\) is "
                                               r"the last good state"):
    train.train_and_evaluate(config, workdir)
  assert {d.split(".")[0] for d in os.listdir(os.path.join(workdir, "checkpoints"))} == {"2"}   # nothing bad saved


@pytest.fixture(scope="module")
def one_device_run(data_dir, tmp_path_factory):
  """30 steps of the same config in a 1-device process (8 emulated CPU devices are ~8x slower)."""
  workdir = str(tmp_path_factory.mktemp("one"))
  script = (
      "import jax, json; jax.config.update('jax_num_cpu_devices', 1)\n"
      "from configs import test as t; from jaxrecon import train\n"
      f"c = t.get_config(); c.data.data_dir = {data_dir!r}; c.num_train_steps = 30; c.checkpoint.every = 30\n"
      "c.eval.splits = (); c.log_images_every = 0; c.log_every = 1\n"
      f"r = train.train_and_evaluate(c, {workdir!r})\n"
      "assert jax.device_count() == 1\n"
      "print('HISTORY', json.dumps([[h['total'], h['grad_norm']] for h in r['train_history']]))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.array(json.loads(result.stdout.split("HISTORY", 1)[1]))


@pytest.mark.slow
def test_one_device_matches_eight(straight_run, one_device_run):
  assert jax.device_count() == 8
  eight = straight_run[1]["train_history"]
  # The first step sees identical parameters: the loss agrees to float32 rounding. The gradient
  # norm agrees to ~0.1%: discontinuous choices (hard z-buffer visibility, SoftRas's strict inside
  # test) can flip when the sharded reductions round differently.
  np.testing.assert_allclose(one_device_run[0, 0], eight[0]["total"], rtol=1e-5)
  np.testing.assert_allclose(one_device_run[0, 1], eight[0]["grad_norm"], rtol=1e-2)
  # Later steps drift slightly more because Adam normalises near-zero gradient entries, turning
  # that noise into full-size updates; the losses still agree to 0.5%.
  np.testing.assert_allclose(one_device_run[:3, 0], _losses(eight), rtol=5e-3)


@pytest.mark.slow
def test_loss_decreases(one_device_run):
  losses = one_device_run[:, 0]
  assert losses[-10:].mean() < 0.9 * losses[:5].mean(), losses


def _random_weights(path, model: str) -> str:
  """A converted-weights file of `model` with random values (tests never download weights)."""
  spec = weights.SPECS[model]
  variables = spec.make_module().init(jax.random.key(1), jnp.zeros(spec.input_shape, jnp.float32))
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(variables, sep="/").items()}
  weights.save_npz(str(path), flat, {"model": model})
  return str(path)


def test_feature_terms_without_weights_are_off_with_a_warning(caplog):
  config = test_config.get_config()
  config.loss_weights.texture_perceptual = 3.0
  config.loss_weights.fid = 0.1
  with caplog.at_level("WARNING"):
    assert train.load_frozen_networks(config) == {}
  assert train.frozen_terms(config) == {}
  text = caplog.text
  assert "texture_perceptual=3.0 but config.weights.perceptual is not set" in text
  assert "fid=0.1 but config.weights.inception is not set" in text


def test_missing_weights_file_is_a_clear_error(tmp_path):
  config = test_config.get_config()
  config.loss_weights.fid = 0.1
  config.weights.inception = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="(?s)nope.npz not found.*convert_weights --model fid_inception"):
    train.load_frozen_networks(config)


def test_encoder_from_resnet18(tmp_path):
  path = _random_weights(tmp_path / "resnet18.npz", "resnet18")
  config = test_config.get_config()
  config.weights.resnet18 = path
  sphere = mesh_lib.symmetric_sphere()
  small = components.make_model(config, sphere).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  with pytest.raises(ValueError, match="resnet_widths=.*need \\(64, 128, 256, 512\\)"):
    train.init_encoder_from_resnet18(config, small["params"], small["batch_stats"])
  config.model.resnet_widths = (64, 128, 256, 512)
  full = components.make_model(config, sphere).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  params, batch_stats = train.init_encoder_from_resnet18(config, full["params"], full["batch_stats"])
  loaded = weights.load_variables(path, "resnet18")
  chex_equal = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  assert chex_equal(params["encoder"]["resnet"], loaded["params"])
  assert chex_equal(batch_stats["encoder"]["resnet"], loaded["batch_stats"])
  assert chex_equal(params["shape"], full["params"]["shape"])      # the rest is untouched


@pytest.mark.slow
def _objective_on_four_birds(config):
  """(initial state, a batch of 4 synthetic birds, the step's loss_fn) for `config`."""
  sphere = mesh_lib.symmetric_sphere()
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx = disc_tx = train.optax.adam(1e-3)
  state = train.create_state(config, model, disc, tx, disc_tx, (1, 64, 64, 3))
  examples = synthetic.make_examples(0, "train", range(4), synthetic.RenderSettings(image_size=64))
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples]), jnp.float32) / 255 for k in ("image", "mask")}
  batch["barrier"] = jnp.stack([components.AddBarrier().map({"mask": np.asarray(m)})["barrier"] for m in batch["mask"]])
  _, loss_fn = train.make_train_step(config, model, disc, sphere, tx, disc_tx)
  return state, batch, loss_fn


def test_perceptual_and_fid_terms_train(tmp_path):
  """With (random) converted AlexNet and Inception weights both terms enter the step, finite, and
  their gradients reach the network."""
  config = test_config.get_config()
  config.loss_weights.texture_perceptual = 3.0
  config.loss_weights.fid = 0.1
  config.loss_weights.gan = 0.0
  config.loss_weights.variance_lookahead = 0.0
  config.weights.perceptual = _random_weights(tmp_path / "alexnet.npz", "alexnet")
  config.weights.inception = _random_weights(tmp_path / "inception.npz", "fid_inception")
  frozen = train.load_frozen_networks(config)
  assert set(frozen) == {"texture_perceptual", "fid"}
  state, batch, loss_fn = _objective_on_four_birds(config)
  # One compiled function for the terms and the FID term's gradient (compiling Inception's backward
  # dominates this test).
  fid_and_terms = lambda p: (lambda out: (out[1][0]["fid"], out[1][0]))(
      loss_fn(p, state.batch_stats, state.disc_params, batch, jax.random.key(0), None, frozen))
  (_, terms), grads = jax.jit(jax.value_and_grad(fid_and_terms, has_aux=True))(state.params)
  assert np.isfinite(terms["texture_perceptual"]) and terms["texture_perceptual"] > 0
  assert np.isfinite(terms["fid"]) and terms["fid"] > 0
  norms = {k: float(train.optax.global_norm(v)) for k, v in grads.items()}
  assert all(np.isfinite(list(norms.values()))), norms
  assert norms["shape"] > 0 and norms["flow"] > 0, norms     # FID moves shape and texture (§3.3)


def test_camera_levers_enter_the_step():
  """The default camera levers (configs/synthetic.py): winner-takes-all selection's cross-entropy and the
  flip-consistency term are in the objective, finite, and move D_cam."""
  config = test_config.get_config()
  config.camera_selection = "best"
  config.loss_weights.camera_flip = 1.0
  config.loss_weights.camera_entropy = 0.0
  config.loss_weights.gan = 0.0
  config.loss_weights.variance_lookahead = 0.0
  state, batch, loss_fn = _objective_on_four_birds(config)
  flip_only = lambda p: (lambda out: (out[1][0]["camera_flip"], out[1][0]))(
      loss_fn(p, state.batch_stats, state.disc_params, batch, jax.random.key(0), None, {}))
  (_, terms), grads = jax.jit(jax.value_and_grad(flip_only, has_aux=True))(state.params)
  assert np.isfinite(terms["camera_flip"]) and terms["camera_flip"] >= 0
  assert 0 < terms["camera_choice"] < 10 and np.isfinite(terms["mask"])
  assert float(train.optax.global_norm(grads["camera"])) > 0      # the flip term moves D_cam
  assert float(train.optax.global_norm(grads["shape"])) == 0      # and nothing it does not see


@pytest.mark.parametrize("reference", ["template", "batch_mean"])
def test_deform_reference(reference):
  """A shift shared by every instance's offsets (D_shape's bias) is paid for by the deformation term
  around the template, and not at all by 'batch_mean', which regularises only the deviation from
  the batch's mean shape."""
  config = test_config.get_config()
  config.deform_reference = reference
  config.loss_weights.gan = 0.0
  config.loss_weights.variance_lookahead = 0.0
  state, batch, loss_fn = _objective_on_four_birds(config)
  deform = jax.jit(lambda p: loss_fn(p, state.batch_stats, state.disc_params, batch, jax.random.key(0), None,
                                     {})[1][0]["deform"])
  shifted = jax.tree.map(lambda x: x, state.params)
  shifted["shape"]["shape_fc"]["bias"] = shifted["shape"]["shape_fc"]["bias"] + 0.1
  before, after = float(deform(state.params)), float(deform(shifted))
  if reference == "template":
    assert after > before + 0.1, (before, after)      # every offset grew by |(0.1, 0.1, 0.1)| = 0.17
  else:
    np.testing.assert_allclose(after, before, rtol=1e-4)
    assert before > 1e-4        # the birds' own deviations are paid for


def _one_step(config, mesh, batch):
  sphere = components.sphere_for(config)
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx = disc_tx = train.optax.adam(1e-3)
  state = train.create_state(config, model, disc, tx, disc_tx, (1, 64, 64, 3))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  step = train.jit_train_step(config, model, disc, sphere, tx, disc_tx, mesh)
  new_state, metrics = step(jax.device_put(state, replicated), jax.device_put(batch, data), {})
  return jax.device_get(new_state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def test_ordered_reduction_is_the_same_step():
  """config.reduction='ordered' (per-device step, sums in device order) computes what the global
  view computes, to float32 rounding: every loss term, the gradient norm, the BatchNorm statistics.
  (Without the GAN, whose random novel views are drawn per device in ordered mode.)"""
  config = test_config.get_config()
  config.loss_weights.gan = 0.0
  # The lookahead is per sample (nothing to sum across devices) and doubles the compile time; the
  # two-process test runs it in ordered mode.
  config.loss_weights.variance_lookahead = 0.0
  config.deform_reference = "batch_mean"     # its batch mean must be the global one in ordered mode
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  examples = synthetic.make_examples(0, "train", range(8), synthetic.RenderSettings(image_size=64))
  batch = {k: np.stack([e[k] for e in examples]).astype(np.float32) / 255 for k in ("image", "mask")}
  batch["barrier"] = np.stack([components.AddBarrier().map({"mask": m})["barrier"] for m in batch["mask"]])
  xla_state, xla = _one_step(config, mesh, batch)
  config.reduction = "ordered"
  ordered_state, ordered = _one_step(config, mesh, batch)
  assert set(ordered) == set(xla)
  for key, value in xla.items():
    np.testing.assert_allclose(ordered[key], value, rtol=1e-4, atol=1e-7, err_msg=key)
  for a, b in zip(jax.tree.leaves(ordered_state.batch_stats), jax.tree.leaves(xla_state.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_reduction_setting_is_checked():
  config = test_config.get_config()
  config.reduction = "fast"
  with pytest.raises(ValueError, match=r"config.reduction='fast': must be one of xla, ordered"):
    components.make_model(config, components.sphere_for(config))
  config.reduction = "xla"
  sphere = components.sphere_for(config)
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  with pytest.raises(ValueError, match=r"needs a model built with the same batch_axis"):
    train.make_train_step(config, model, disc, sphere, None, None, batch_axis="data")


