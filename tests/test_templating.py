"""Stage 1 → semantic template → stage 2 (`train.run_pipeline`, `jaxrecon.templating`) on a tiny config."""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import synthetic_pipeline
from configs import test as test_config
from jaxrecon import components, template, templating, train
from jaxrecon.metrics import shape as shape_metrics


def _stage(data_dir, stage1: bool, steps: int):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.num_train_steps = steps
  config.log_every = 1              # train_history: one entry per step (the counts below)
  config.eval.splits = ("test",)
  if stage1:
    reference = synthetic_pipeline.get_config().stage1
    config.stage = "template"
    config.model.num_hypotheses = 1
    config.variance.mode = "none"
    config.loss_weights = reference.loss_weights
    config.loss_steps = ml_collections.ConfigDict({"deform": (4, None), "symmetry_plane": (0, 2)})
    config.gan_input, config.loss_weights.gan = "silhouette", 0.1     # UMR's stage-1 GAN, covered here
    config.template.update_every = 4
    config.eval.splits = ()
  else:
    config.loss_weights.part_probability = 5.0
    config.loss_weights.part_chamfer = 10.0
  return config


def _pipeline(data_dir, stage2_steps: int):
  return ml_collections.ConfigDict({"job": "pipeline", "data_dir": data_dir,
                                    "stage1": _stage(data_dir, True, 6), "stage2": _stage(data_dir, False, stage2_steps)})


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  return data_dir, workdir, train.train_and_evaluate(_pipeline(data_dir, 2), workdir)


@pytest.mark.slow
def test_stage1_learns_a_template_and_stage2_trains_on_it(pipeline_run):
  data_dir, workdir, results = pipeline_run
  directory = os.path.join(workdir, "template")
  sphere = components.sphere_for(test_config.get_config())
  learned = template.load(directory, sphere)
  # The template moved away from the sphere, toward the ground-truth mean shape.
  assert results["stage1/template/chamfer_learned"] < results["stage1/template/chamfer_sphere"]
  start = sphere.half(sphere.vertices) * test_config.get_config().model.template_scale
  assert np.sqrt(np.mean(np.sum((learned.vertices_half - start) ** 2, -1))) > 1e-3
  assert 0.0 <= results["stage1/template/part_agreement"] <= 1.0
  assert learned.meta["provenance"]["step"] == 6 and learned.meta["provenance"]["images_averaged"] > 0
  assert learned.meta["labels_from"] == "vertex_projection"
  assert len(results["stage1/train_history"]) == 6
  for h in results["stage1/train_history"]:     # the silhouette GAN and its discriminator trained
    assert np.isfinite(h["gan"]) and np.isfinite(h["discriminator"]) and h["discriminator"] > 0
  with open(os.path.join(workdir, "stage1", "config.json")) as f:
    assert json.load(f)["gan_input"] == "silhouette"
  # Stage 2 used it: its model's template is the folder's, and the semantic terms trained.
  with open(os.path.join(workdir, "stage2", "config.json")) as f:
    assert json.load(f)["model"]["template_dir"] == directory
  stage2_model = components.make_model(_with_template(data_dir, directory), sphere)
  np.testing.assert_array_equal(np.asarray(stage2_model.template_half), learned.vertices_half)
  for h in results["train_history"]:   # (6 stage-1 steps may label no vertex head or belly: then Eq. 13 is 0)
    assert np.isfinite(h["part_probability"]) and h["part_probability"] > 0 and np.isfinite(h["part_chamfer"])
  assert 0.0 <= results["eval/test/mask_iou"] <= 1.0
  with open(os.path.join(workdir, "metrics.json")) as f:
    saved = json.load(f)
  assert "stage1/template/chamfer_learned" in saved and "eval/test/mask_iou" in saved


def _with_template(data_dir, directory):
  config = _stage(data_dir, False, 2)
  config.model.template_dir = directory
  return config


@pytest.mark.slow
def test_pipeline_resumes_at_the_right_stage(pipeline_run):
  data_dir, workdir, _ = pipeline_run
  stage1_checkpoints = sorted(os.listdir(os.path.join(workdir, "stage1", "checkpoints")))
  # Template present: stage 1 is skipped, stage 2 continues from its checkpoint (1 more step).
  more = train.train_and_evaluate(_pipeline(data_dir, 3), workdir)
  assert len(more["train_history"]) == 1
  assert sorted(os.listdir(os.path.join(workdir, "stage1", "checkpoints"))) == stage1_checkpoints
  # Interrupted between stage 1's last step and the template's write: only the template is written.
  os.remove(os.path.join(workdir, "template", "template.json"))
  again = train.run_pipeline(_pipeline(data_dir, 3), workdir)
  assert template.exists(os.path.join(workdir, "template"))
  assert len(again["train_history"]) == 0          # stage 2 was already at its last step


def test_stage2_without_a_template_is_a_clear_error(tmp_path):
  config = _stage(str(tmp_path), False, 1)
  with pytest.raises(ValueError, match="need the stage-1 template: set --config.model.template_dir"):
    train.part_setup(config, components.sphere_for(config))
  config.model.template_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="holds no template.json"):
    components.make_model(config, components.sphere_for(config))


def test_symmetric_frame_chamfer_ignores_the_frame():
  rng = np.random.default_rng(0)
  shape = rng.normal(size=(200, 3)) * [1.0, 0.4, 0.6]
  turn = np.deg2rad(73.0)
  rotation = np.array([[np.cos(turn), 0, np.sin(turn)], [0, 1, 0], [-np.sin(turn), 0, np.cos(turn)]])
  moved = 3.0 * shape @ rotation.T * [-1, 1, 1] + [0.5, 0.0, -2.0]
  value, _ = shape_metrics.symmetric_frame_chamfer(moved, shape, num_angles=360)
  assert value < 1e-3
  other, _ = shape_metrics.symmetric_frame_chamfer(rng.normal(size=(200, 3)), shape)
  assert other > 0.05


def test_ground_truth_mean_shape_is_in_vertex_correspondence(tmp_path):
  config = _stage(str(tmp_path), False, 1)
  from jaxrecon.data import builders  # pylint: disable=g-import-not-at-top
  builders.prepare(builders.make_builder(config.data.synthetic_config, data_dir=config.data.data_dir))
  mean, labels = templating.ground_truth(config, "train", max_images=4)
  assert mean.shape == (642, 3) and labels.shape == (642,)
  # Head, back and belly hold vertex majorities; the thin neck may hold none.
  assert {1, 3, 4} <= set(np.unique(labels)) <= {1, 2, 3, 4}
  sphere = components.sphere_for(config)
  np.testing.assert_allclose(mean, mean[sphere.vertex_mirror] * [1, -1, 1], atol=1e-5)   # symmetric


def test_semantic_terms_reach_the_shape_and_the_cameras(tmp_path):
  """Eq. 14's gradient reaches D_shape, Eq. 13's reaches D_cam (and not D_shape: it projects the
  fixed template), on a template whose parts are bands of the UV map."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxrecon.data import synthetic  # pylint: disable=g-import-not-at-top
  from jaxrecon.models import reconstructor  # pylint: disable=g-import-not-at-top
  config = _stage(str(tmp_path), False, 1)
  sphere = components.sphere_for(config)
  u, _ = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 16))
  probs = np.stack([np.zeros_like(u)] + [(np.digitize(u, [-0.5, 0.0, 0.5]) == k).astype(float) for k in range(4)], -1)
  half = sphere.half(sphere.vertices) * config.model.template_scale
  template.save(str(tmp_path / "t"), sphere, half, probs, sphere.uv_sampler(2), list(synthetic.PART_NAMES))
  config.model.template_dir = str(tmp_path / "t")
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx = train.optax.adam(1e-3)
  state = train.create_state(config, model, disc, tx, tx, (1, 64, 64, 3))
  examples = synthetic.make_examples(0, "train", range(2), synthetic.RenderSettings(image_size=64))
  batch = {k: jnp.asarray(np.stack([e[k] for e in examples]), jnp.float32) / 255 for k in ("image", "mask", "parts")}
  batch["barrier"] = jnp.stack([components.AddBarrier().map({"mask": np.asarray(m)})["barrier"] for m in batch["mask"]])
  _, loss_fn = train.make_train_step(config, model, disc, sphere, tx, tx)
  def term_grad(name):
    return jax.jit(jax.grad(lambda p: loss_fn(p, state.batch_stats, state.disc_params, batch,
                                              jax.random.key(0), None, {})[1][0][name]))(state.params)
  norm = lambda tree: float(train.optax.global_norm(tree))
  probability, chamfer = term_grad("part_probability"), term_grad("part_chamfer")
  assert norm(probability["shape"]) > 0
  assert norm(chamfer["camera"]) > 0 and norm(chamfer["shape"]) == 0
