"""CUB in CMR's format, on a fabricated CUB tree (conftest.py's `cub_tree`): fields, crop/resize/flip geometry, errors."""

import os

import numpy as np
from PIL import Image
import pytest

from jaxrecon.data import cub


def test_annotations_are_zero_indexed(cub_tree):
  _, cache_dir, _ = cub_tree
  annotations = cub.read_annotations(cache_dir, "train")
  assert len(annotations) == 3
  a = annotations[1]
  np.testing.assert_array_equal(a.bbox, [15, 12, 55, 40])
  np.testing.assert_array_equal(a.keypoints[1], [55, 26, 1])
  np.testing.assert_array_equal(a.keypoints[10], [0, 0, 0])
  assert a.mask.shape == (60, 80) and a.rel_path == "001.Bird/bird_1.png"


def test_crop_geometry_and_keypoints(cub_tree):
  cub_dir, cache_dir, scops_dir = cub_tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  raw = source[0]
  a = source.annotations[0]
  out = cub.preprocess(raw["image"], a, image_size=64, scops=raw["scops"])
  assert out["image"].shape == (64, 64, 3) and out["mask"].shape == (64, 64, 1)
  # 41x29 box padded by 5% per side and squared: side = round(41 * 1.1) -> the bird spans ~91% of it.
  width_fraction = np.mean(out["mask"][32, :, 0] > 0.5)
  assert 0.85 < width_fraction < 0.95
  # The beak keypoint (at the box's right edge) lands on the mask's right edge, mid-height.
  beak = out["keypoints"][1]
  col, row = (beak[0] + 1) * 32, (beak[1] + 1) * 32
  assert abs(col - np.max(np.nonzero(out["mask"][32, :, 0] > 0.5))) <= 1.5
  assert abs(row - 32) <= 2.5
  np.testing.assert_array_equal(out["keypoints"][10], [0, 0, 0])    # invisible -> zeroed
  # SCOPS warped into the same crop: its bird channel agrees with the mask.
  assert np.mean(np.abs(out["parts"][..., 1] - out["mask"][..., 0])) < 0.05


def test_crop_fills_outside_the_image():
  image = np.zeros((4, 5, 3), np.float32)
  out = cub.crop(image, np.array([-2, -1, 3, 4]), fill=1.0)
  assert out.shape == (6, 6, 3)
  assert np.all(out[:1] == 1.0) and np.all(out[:, :2] == 1.0)      # above and left of the image
  assert np.all(out[1:5, 2:6] == 0.0)                               # the image itself
  assert np.all(out[5:] == 1.0)                                     # below the image


def test_resize_matches_half_pixel_bilinear():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).uniform(size=(7, 9, 2)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=(16, 5),
                                         mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(cub.resize_bilinear(x, 16, 5), want, atol=1e-6)


def test_flip_mirrors_image_and_permutes_keypoints(cub_tree):
  cub_dir, cache_dir, scops_dir = cub_tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  raw, a = source[1], source.annotations[1]
  plain = cub.preprocess(raw["image"], a, image_size=48)
  flipped = cub.preprocess(raw["image"], a, image_size=48, flip=True)
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
  # LEye (6) becomes REye (10) with x mirrored about the image centre.
  np.testing.assert_allclose(flipped["keypoints"][10, 0], -plain["keypoints"][6, 0] - 2.0 / 48, atol=1e-6)
  np.testing.assert_allclose(flipped["keypoints"][10, 1], plain["keypoints"][6, 1])
  np.testing.assert_array_equal(flipped["keypoints"][6], [0, 0, 0])


def test_grain_transform_jitters_only_train(cub_tree):
  cub_dir, cache_dir, scops_dir = cub_tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  train = cub.CubPreprocess(32, train=True)
  test = cub.CubPreprocess(32, train=False)
  boxes = {tuple(train.random_map(source[0], np.random.default_rng(s))["crop_box"]) for s in range(8)}
  assert len(boxes) > 1
  outs = [test.random_map(source[0], np.random.default_rng(s)) for s in range(4)]
  assert all(not o["flipped"] for o in outs)
  assert len({tuple(o["crop_box"]) for o in outs}) == 1


def test_missing_and_bad_inputs_are_named(tmp_path, cub_tree):
  cub_dir, cache_dir, scops_dir = cub_tree
  with pytest.raises(FileNotFoundError, match="val_cub_cleaned.mat"):
    cub.CubSource(cub_dir, cache_dir, "val")
  with pytest.raises(FileNotFoundError, match="images"):
    cub.CubSource(str(tmp_path / "nowhere"), cache_dir, "train")
  os.remove(os.path.join(scops_dir, "001.Bird", "bird_2_2.npy"))
  with pytest.raises(ValueError, match="SCOPS map missing"):
    cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir, on_bad_record="skip")
  assert len(source) == 2 and source.skipped == {"SCOPS map missing": 1}
  with open(os.path.join(cub_dir, "images", "001.Bird", "bird_0.png"), "wb") as f:
    f.write(b"not an image")
  with pytest.raises(ValueError, match="cannot decode"):
    source[0]


def test_flows_through_the_pipeline(cub_tree):
  from jaxrecon.data import pipeline  # pylint: disable=g-import-not-at-top
  cub_dir, cache_dir, scops_dir = cub_tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  loader = pipeline.make_loader(source, batch_size=2, image_size=32, seed=0,
                                preprocess=[cub.CubPreprocess(32, train=True)])
  batch = next(iter(loader))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["parts"].shape == (2, 32, 32, 5)
  assert batch["image"].max() <= 1.0 and batch["image"].min() >= 0.0


def test_sample_grid_command(cub_tree, tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  cub_dir, cache_dir, scops_dir = cub_tree
  out = str(tmp_path / "grid.png")
  result = subprocess.run(
      [sys.executable, "-m", "jaxrecon.tools.sample_grid", "--dataset=cub", f"--cub_dir={cub_dir}",
       f"--cache_dir={cache_dir}", f"--scops_dir={scops_dir}", "--num=3", "--image_size=32", f"--out={out}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  grid = np.asarray(Image.open(out))
  assert grid.shape == (3 * 32, 3 * 32, 3)
  assert grid[..., 0].max() == 255  # keypoints drawn in red
