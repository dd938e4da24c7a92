"""`python -m jaxrecon.evaluate` on a workdir of configs/test.py: the report, both protocols, FID and
PCK paths, and the errors (the workdir: conftest.py's `checkpointed_workdir`)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from jaxrecon import components, evaluate, evaluation
from jaxrecon.geometry import mesh as mesh_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(checkpointed_workdir):
  return checkpointed_workdir[0]


def _cheap_features(images):
  """A stand-in for Inception features (tests): per-channel means and a coarse 2x2 colour layout."""
  images = np.asarray(images, np.float64)
  b, s = images.shape[0], images.shape[1]
  quads = images.reshape(b, 2, s // 2, 2, s // 2, 3).mean((2, 4)).reshape(b, -1)
  return np.concatenate([images.mean((1, 2)), quads], -1)


@pytest.fixture(scope="module")
def default_report(workdir):
  return evaluate.run(workdir, "test", "default", kp_pairs=64, fid_features=_cheap_features, save_predictions=True)


def test_default_report(workdir, default_report):
  report = default_report
  out = os.path.join(workdir, "eval_test")
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert report["step"] == 1 and report["num_images"] == 8 and report["protocol"] == "default"
  assert report["protocol_description"] == evaluation.PROTOCOLS["default"]
  m = report["metrics"]
  expected = {"mask_iou", "ssim", "texture_l1", "fid", "pck_0.1", "pck_0.15", "camera_error_deg",
              "camera_error_twin_deg", "camera_error_raw_deg", "chamfer_3d", "f_score", "novel_view_l1",
              "novel_view_ssim"}
  assert set(m) == expected
  for name, entry in m.items():
    assert "value" in entry, (name, entry)
    assert np.isfinite(entry["value"]) and entry["definition"], name
  assert 0 <= m["mask_iou"]["value"] <= 1 and -1 <= m["ssim"]["value"] <= 1
  assert 0 <= m["pck_0.1"]["value"] <= m["pck_0.15"]["value"] <= 1
  assert 0 <= m["f_score"]["value"] <= 1 and 0 <= m["camera_error_deg"]["value"] <= 180
  assert 0 < m["novel_view_l1"]["value"] < 1 and -1 <= m["novel_view_ssim"]["value"] <= 1
  assert m["fid"]["value"] >= 0
  assert "64 random pairs" in m["pck_0.1"]["definition"]
  with open(os.path.join(out, "metrics.md")) as f:
    table = f.read()
  assert "| mask_iou | " in table and "protocol `default`" in table
  assert "change of canonical frame" in table and 0 <= report["camera_frame"]["turn_deg"] < 360


def test_saved_predictions_are_what_was_scored(workdir, default_report):
  """predictions.npz holds the scored cameras and shapes: the report's camera errors and chamfer come
  back from the file and the dataset's ground truth."""
  from jaxrecon import components
  from jaxrecon.metrics import shape
  with np.load(os.path.join(workdir, "eval_test", evaluation.PREDICTIONS_FILE)) as f:
    pred = dict(f)
  config = evaluation.load_config(workdir)
  truth = list(components.make_data(config, "test", shuffle=False, num_epochs=1, drop_remainder=False))
  cams = np.concatenate([b["camera"] for b in truth])
  vertices = np.concatenate([b["vertices"] for b in truth])
  n = len(cams)
  assert pred["vertices"].shape == (n, 642, 3) and pred["camera"].shape == (n, 7)
  np.testing.assert_array_equal(pred["index"], np.arange(n))
  np.testing.assert_allclose(pred["probs"].sum(1), 1.0, atol=1e-5)
  m = default_report["metrics"]
  raw = shape.rotation_error_degrees(pred["camera"][:, 3:], cams[:, 3:])
  np.testing.assert_allclose(np.mean(raw), m["camera_error_raw_deg"]["value"], rtol=1e-5)
  fit = evaluation.camera_errors(pred["camera"][:, 3:], cams[:, 3:])
  assert fit["median"] == pytest.approx(m["camera_error_deg"]["value"], rel=1e-6)
  assert fit["twin_median"] <= fit["median"] + 1e-6
  chamfer = shape.chamfer_distance(shape.align_to_camera_frame(pred["vertices"], pred["camera"]),
                                   shape.align_to_camera_frame(vertices, cams))
  np.testing.assert_allclose(np.mean(chamfer), m["chamfer_3d"]["value"], rtol=1e-4)


def test_fid_skipped_without_weights_and_umr_protocol_is_seeded(workdir, default_report):
  a = evaluate.run(workdir, "test", "umr_compatible", kp_pairs=8, seed=3)
  b = evaluate.run(workdir, "test", "umr_compatible", kp_pairs=8, seed=3, out=os.path.join(workdir, "again"))
  assert a["metrics"] == b["metrics"] and a["num_images"] == 8    # < 32 images: all are scored
  assert os.path.exists(os.path.join(workdir, "eval_test_umr_compatible", "metrics.json"))
  for name in ("fid", "pck_0.1", "chamfer_3d", "novel_view_l1", "camera_error_deg"):
    assert a["metrics"][name]["status"] == "skipped" and "default protocol" in a["metrics"][name]["reason"]
  assert all("value" in a["metrics"][name] for name in ("mask_iou", "ssim", "texture_l1"))
  # Default protocol without Inception weights: FID recorded as skipped, with how to get weights.
  config = evaluation.load_config(workdir)
  sphere, model, state = evaluation.restore_model(workdir, config)
  results = evaluation.evaluate(config, model, sphere, state, split="test", kp_pairs=8)
  report = evaluation.make_report(results, config, "test", "default")
  assert report["metrics"]["fid"]["status"] == "skipped"
  assert "--inception" in report["metrics"]["fid"]["reason"]
  assert "fid | skipped" in evaluation.markdown_table(report)
  # The same numbers as the CLI run (deterministic, no FID influence on the others).
  for name in ("mask_iou", "ssim", "chamfer_3d", "novel_view_ssim"):
    assert report["metrics"][name]["value"] == pytest.approx(default_report["metrics"][name]["value"], rel=1e-5)


def test_umr_protocol_flips_and_samples(workdir):
  config = evaluation.load_config(workdir)
  sphere, model, state = evaluation.restore_model(workdir, config)
  batch = next(iter(components.make_data(config, "test", shuffle=False, num_epochs=1, drop_remainder=False)))
  batch = {k: jnp.asarray(batch[k]) for k in ("image", "mask")}
  step = jax.jit(evaluation.make_eval_step(config, model, sphere, "umr_compatible"))
  _, out = step(state.params, state.batch_stats, batch, jax.random.key(0))
  flipped = np.all(np.asarray(out["image"]) == np.asarray(batch["image"])[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(np.asarray(out["image"]) == np.asarray(batch["image"]), axis=(1, 2, 3))
  assert np.all(flipped | kept) and flipped.any() and kept.any()
  pred = out["pred"]
  chosen = [int(np.argmin(np.abs(np.asarray(pred.cam_hypotheses[i]) - np.asarray(out["cam"][i])).sum(-1)))
            for i in range(8)]
  probs = np.asarray(pred.cam_probs)
  # Sampled: with two hypotheses near 50/50, some images take the less probable one.
  assert any(c != int(np.argmax(p)) for c, p in zip(chosen, probs))


def test_relative_novel_camera_reproduces_novel_views():
  rng = np.random.default_rng(0)
  quat = lambda n: (lambda q: q / np.linalg.norm(q, axis=-1, keepdims=True))(rng.normal(size=(n, 4))).astype(np.float32)
  cam = lambda n: np.concatenate([rng.uniform(0.5, 1.5, (n, 1)), rng.normal(0, 0.1, (n, 2)), quat(n)], -1).astype(
      np.float32)
  gt, novel = cam(4), cam(4)
  points = rng.normal(size=(4, 30, 3)).astype(np.float32)
  from jaxrecon.geometry import camera
  # A prediction in another canonical frame (rotated by q_o) and scale gauge (c), same input view.
  q_o, c = quat(4), rng.uniform(0.5, 2.0, (4, 1)).astype(np.float32)
  pred_points = c[:, None] * np.asarray(camera.quat_rotate(jnp.asarray(q_o), jnp.asarray(points)))
  q_p = camera.quat_multiply(jnp.asarray(gt[:, 3:]), camera.quat_conjugate(jnp.asarray(q_o)))
  pred = np.concatenate([gt[:, :1] / c, gt[:, 1:3], np.asarray(q_p)], -1)
  np.testing.assert_allclose(camera.project(pred_points, pred)[0], camera.project(points, gt)[0], atol=1e-5)
  rel = evaluation.relative_novel_camera(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(novel))
  np.testing.assert_allclose(camera.project(pred_points, rel)[0], camera.project(points, novel)[0], atol=1e-5)
  np.testing.assert_allclose(evaluation.relative_novel_camera(gt, gt, novel), novel, atol=1e-6)
  # A translated prediction renders translated by the same rotation of the offset (not by t_n - t_g).
  shifted = pred.copy()
  shifted[:, 1:3] += 0.1
  moved = camera.project(pred_points, evaluation.relative_novel_camera(shifted, gt, novel))[0]
  assert not np.allclose(moved, camera.project(points, novel)[0], atol=1e-3)


def test_masked_image_metrics():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
  b = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)
  ones = jnp.ones((2, 32, 32, 1))
  from jaxrecon.metrics import image
  np.testing.assert_allclose(evaluation.masked_ssim(a, b, ones), image.ssim(a, b), rtol=1e-5)
  np.testing.assert_allclose(evaluation.masked_ssim(a, a, ones), 1.0, rtol=1e-5)
  assert np.all(np.asarray(evaluation.masked_ssim(a, b, jnp.zeros_like(ones))) == 0)
  mask = jnp.zeros((2, 32, 32, 1)).at[:, :8].set(1.0)
  expected = jnp.mean(jnp.abs(a - b)[:, :8], axis=(1, 2, 3))
  np.testing.assert_allclose(evaluation.masked_l1_within(a * mask, b, mask), expected, rtol=1e-5)


def test_keypoint_transfer_pck():
  # 6 images, 20 faces on a 5x4 grid of centres (>= 0.4 apart), each face 4 samples around its
  # centre; keypoints (15) at face centres. Identical flows transfer every keypoint exactly.
  rng = np.random.default_rng(0)
  xs, ys = np.meshgrid(np.linspace(-0.8, 0.8, 5), np.linspace(-0.75, 0.75, 4))
  centres = np.stack([xs.ravel(), ys.ravel()], -1)
  flow = np.repeat((centres[:, None] + rng.normal(0, 0.005, (20, 4, 2)))[None], 6, 0)
  kp = np.concatenate([np.repeat(centres[None, :15], 6, 0), np.ones((6, 15, 1))], -1).astype(np.float32)
  perfect = evaluation.keypoint_transfer_pck(kp, flow.astype(np.float16), num_pairs=10)
  assert perfect["pck_0.1"] == 1.0 and perfect["num_pairs"] == 10
  # Odd images' faces are permuted (face f sits where face f+1 sits in even images): a transfer
  # between images of different parity lands >= 0.4 (0.22 bbox sides) away, within a parity exactly.
  permuted = flow.copy()
  permuted[1::2] = np.roll(flow[1::2], 1, axis=1)
  pairs = evaluation.draw_pairs(6, 40)
  same = np.mean((pairs[:, 0] % 2) == (pairs[:, 1] % 2))
  assert 0 < same < 1
  scores = evaluation.keypoint_transfer_pck(kp, permuted, num_pairs=40)
  assert scores["pck_0.1"] == pytest.approx(same) and scores["pck_0.15"] == pytest.approx(same)
  # Invisible keypoints are not scored; types never scored are left out of the mean.
  kp_hidden = kp.copy()
  kp_hidden[:, 3:, 2] = 0
  assert evaluation.keypoint_transfer_pck(kp_hidden, permuted, num_pairs=40)["pck_0.1"] == pytest.approx(same)
  np.testing.assert_array_equal(evaluation.draw_pairs(6, 40), pairs)


def test_keypoint_transfer_pck_matches_pairwise_transfer():
  # The per-image face search gives what metrics.keypoints does pair by pair, on random flows.
  from jaxrecon.metrics import keypoints as kp_metrics
  rng = np.random.default_rng(1)
  kp = np.concatenate([rng.uniform(-0.9, 0.9, (5, 15, 2)), rng.uniform(size=(5, 15, 1)) > 0.3], -1)
  kp = kp.astype(np.float32)
  flows = rng.uniform(-1, 1, (5, 50, 4, 2)).astype(np.float32)
  pairs = evaluation.draw_pairs(5, 30)
  src, tgt = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
  pred = kp_metrics.transfer_keypoints_flow(kp[src], flows[src], flows[tgt], sigma=3.0, image_size=256)
  for alpha in (0.1, 0.15):
    correct, total = kp_metrics.pck(pred, kp[tgt], kp[src, :, 2] * kp[tgt, :, 2], alpha=alpha)
    expected = float(kp_metrics.pck_score(correct, total))
    assert evaluation.keypoint_transfer_pck(kp, flows, 30)[f"pck_{alpha}"] == pytest.approx(expected)
  assert 0 < expected < 1


def test_missing_checkpoint_and_workdir_errors(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate.run(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    evaluate.run(str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with open(os.path.join(workdir, "config.json")) as f:
    (empty / "config.json").write_text(f.read())
  with pytest.raises(FileNotFoundError, match=f"no checkpoints in --workdir={empty}"):
    evaluate.run(str(empty))
  with pytest.raises(FileNotFoundError, match="--inception"):
    evaluate.run(workdir, inception=str(tmp_path / "missing.npz"))


def test_cli_reports_a_missing_workdir(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-m", "jaxrecon.evaluate", f"--workdir={tmp_path}/none",
                           "--compilation_cache="], capture_output=True, text=True, cwd=_REPO, env=env,
                          timeout=300, check=False)
  assert result.returncode != 0 and f"--workdir={tmp_path}/none does not exist" in result.stderr


def test_novel_view_protocol_on_ground_truth(checkpointed_workdir):
  # The true shape with its flat per-face colours, rendered through `relative_novel_camera` from
  # the true input camera, matches the stored held-out views as well as it matches the input view
  # (the gap is flat colours vs textures, no supersampling); a 0.1 error in the predicted
  # translation, which moves the render, is penalised.
  from jaxrecon.metrics import image
  config = test_config.get_config()
  config.data.data_dir = checkpointed_workdir[1]
  batch = next(iter(components.make_data(config, "test", shuffle=False, num_epochs=1, drop_remainder=False)))
  sphere = mesh_lib.symmetric_sphere(3)
  screen_faces = components.make_screen_faces(config, sphere.faces)
  rasterize = jax.jit(components.make_rasterizer(config))     # one compilation for the three renders
  vertices, cam = jnp.asarray(batch["vertices"]), jnp.asarray(batch["camera"])
  colours = jnp.asarray(batch["face_colours"] / 255.0, jnp.float32)[:, :, None, :]
  view = jnp.asarray(batch["novel_views"][:, 0])

  def novel_l1(pred_cam):
    rgba = rasterize(screen_faces(vertices, evaluation.relative_novel_camera(pred_cam, cam, jnp.asarray(
        batch["novel_cameras"][:, 0]))), colours)
    l1 = evaluation.masked_l1_within(rgba[..., :3] * rgba[..., 3:], view[..., :3], view[..., 3:])
    return float(jnp.mean(l1)), float(jnp.mean(image.mask_iou(rgba[..., 3], view[..., 3])))

  rgba = rasterize(screen_faces(vertices, cam), colours)
  input_l1 = float(jnp.mean(evaluation.masked_l1_within(rgba[..., :3] * rgba[..., 3:], jnp.asarray(batch["image"]),
                                                        jnp.asarray(batch["mask"]))))
  l1, iou = novel_l1(cam)
  assert iou > 0.9 and l1 < 1.5 * input_l1 < 0.15
  assert novel_l1(cam.at[:, 1].add(0.1))[0] > 1.5 * l1


def test_scores_use_the_protocol_sigma_not_the_training_one():
  # Training may render softer silhouettes (a wider sigma reaches mask pixels further out); the
  # scored silhouette keeps config.eval.sigma, so a training choice cannot move the metric.
  config = test_config.get_config()
  config.render.sigma = 1e-2
  config.eval.sigma = 1e-4
  face = jnp.array([[[[-0.5, -0.5, 5.0], [0.5, -0.5, 5.0], [0.0, 0.5, 5.0]]]])
  train_alpha = components.make_rasterizer(config)(face)[..., 3]
  eval_alpha = components.make_rasterizer(config, for_evaluation=True)(face)[..., 3]
  soft = lambda a: float(jnp.mean((a > 0.02) & (a < 0.98)))   # share of pixels on a soft edge
  assert soft(train_alpha) > 5 * soft(eval_alpha) > 0
  del config.eval.sigma                                        # configs without it: the training sigma
  assert components.make_rasterizer(config, for_evaluation=True).keywords["sigma"] == 1e-2
