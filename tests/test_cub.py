"""CUB in CMR's format, on a fabricated CUB tree: fields, crop/resize/flip geometry, errors."""

import os

import numpy as np
from PIL import Image
import pytest
import scipy.io

from jaxrecon.data import cub

H, W = 60, 80


def _fake_cub(root, n=3, scops=True):
  """A tiny CUB tree: images with a white-edged red box 'bird', CMR .mat files, SCOPS maps."""
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
    if scops:
      stem_dir = scops_dir / "001.Bird"
      stem_dir.mkdir(parents=True, exist_ok=True)
      ref = cub.square_bbox(cub.perturb_bbox(np.array([x1, y1, x2, y2], float), 0.05, 0.0, None))
      crop_mask = cub.resize_bilinear(cub.crop(mask[..., None].astype(np.float32), ref, 0.0), 256, 256)[..., 0]
      probs = np.stack([1 - crop_mask, crop_mask, 0 * crop_mask, 0 * crop_mask, 0 * crop_mask], -1)
      np.save(stem_dir / f"bird_{i}_{i}.npy", probs.astype(np.float32))
  scipy.io.savemat(cache_dir / "data" / "train_cub_cleaned.mat", {"images": records})
  return str(cub_dir), str(cache_dir), str(scops_dir)


@pytest.fixture
def tree(tmp_path):
  return _fake_cub(tmp_path)


def test_annotations_are_zero_indexed(tree):
  _, cache_dir, _ = tree
  annotations = cub.read_annotations(cache_dir, "train")
  assert len(annotations) == 3
  a = annotations[1]
  np.testing.assert_array_equal(a.bbox, [15, 12, 55, 40])
  np.testing.assert_array_equal(a.keypoints[1], [55, 26, 1])
  np.testing.assert_array_equal(a.keypoints[10], [0, 0, 0])
  assert a.mask.shape == (H, W) and a.rel_path == "001.Bird/bird_1.png"


def test_crop_geometry_and_keypoints(tree):
  cub_dir, cache_dir, scops_dir = tree
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


def test_flip_mirrors_image_and_permutes_keypoints(tree):
  cub_dir, cache_dir, scops_dir = tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  raw, a = source[1], source.annotations[1]
  plain = cub.preprocess(raw["image"], a, image_size=48)
  flipped = cub.preprocess(raw["image"], a, image_size=48, flip=True)
  np.testing.assert_array_equal(flipped["image"], plain["image"][:, ::-1])
  # LEye (6) becomes REye (10) with x mirrored about the image centre.
  np.testing.assert_allclose(flipped["keypoints"][10, 0], -plain["keypoints"][6, 0] - 2.0 / 48, atol=1e-6)
  np.testing.assert_allclose(flipped["keypoints"][10, 1], plain["keypoints"][6, 1])
  np.testing.assert_array_equal(flipped["keypoints"][6], [0, 0, 0])


def test_grain_transform_jitters_only_train(tree):
  cub_dir, cache_dir, scops_dir = tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  train = cub.CubPreprocess(32, train=True)
  test = cub.CubPreprocess(32, train=False)
  boxes = {tuple(train.random_map(source[0], np.random.default_rng(s))["crop_box"]) for s in range(8)}
  assert len(boxes) > 1
  outs = [test.random_map(source[0], np.random.default_rng(s)) for s in range(4)]
  assert all(not o["flipped"] for o in outs)
  assert len({tuple(o["crop_box"]) for o in outs}) == 1


def test_missing_and_bad_inputs_are_named(tmp_path, tree):
  cub_dir, cache_dir, scops_dir = tree
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


def test_flows_through_the_pipeline(tree):
  from jaxrecon.data import pipeline  # pylint: disable=g-import-not-at-top
  cub_dir, cache_dir, scops_dir = tree
  source = cub.CubSource(cub_dir, cache_dir, "train", scops_dir=scops_dir)
  loader = pipeline.make_loader(source, batch_size=2, image_size=32, seed=0,
                                preprocess=[cub.CubPreprocess(32, train=True)])
  batch = next(iter(loader))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["parts"].shape == (2, 32, 32, 5)
  assert batch["image"].max() <= 1.0 and batch["image"].min() >= 0.0


def test_sample_grid_command(tree, tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  cub_dir, cache_dir, scops_dir = tree
  out = str(tmp_path / "grid.png")
  result = subprocess.run(
      [sys.executable, "-m", "jaxrecon.tools.sample_grid", "--dataset=cub", f"--cub_dir={cub_dir}",
       f"--cache_dir={cache_dir}", f"--scops_dir={scops_dir}", "--num=3", "--image_size=32", f"--out={out}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  grid = np.asarray(Image.open(out))
  assert grid.shape == (3 * 32, 3 * 32, 3)
  assert grid[..., 0].max() == 255  # keypoints drawn in red
