"""The procedural birds: symmetry, geometry, parts, keypoints, cameras, determinism."""

import numpy as np
import pytest

from jaxrecon.data import synthetic as syn
from jaxrecon.geometry import mesh as mesh_lib


@pytest.fixture(scope="module")
def examples():
  return syn.make_examples(0, "validation", range(6), syn.RenderSettings(image_size=48, num_novel_views=2))


def test_radial_surface_matches_ray_marching():
  bird = syn.sample_bird(np.random.default_rng(1))
  directions = np.random.default_rng(2).normal(size=(200, 3))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  closed = syn.radial_surface(bird, directions)
  t = np.linspace(0.0, 1.5, 3001)
  inside = np.min(syn.ellipsoid_depth(bird, (directions[:, None] * t[None, :, None]).reshape(-1, 3)), -1)
  inside = inside.reshape(200, -1) < 1.0
  marched = t[len(t) - 1 - np.argmax(inside[:, ::-1], axis=1)]
  np.testing.assert_allclose(closed, marched, atol=1e-3)


def test_bird_is_a_symmetric_deformation_of_the_sphere():
  sphere = mesh_lib.symmetric_sphere()
  bird = syn.sample_bird(np.random.default_rng(0))
  v = syn.bird_vertices(bird, sphere)
  assert v.shape == (642, 3) and np.all(np.isfinite(v))
  np.testing.assert_allclose(v[sphere.vertex_mirror], v * [1, -1, 1], atol=1e-12)
  # Elongated along x (body + head + tail), narrower across the mirror plane.
  extent = v.max(0) - v.min(0)
  assert extent[0] > 1.3 * extent[1]
  # Every vertex lies on the union's surface: inside or on some ellipsoid, outside none deeper.
  depth = syn.ellipsoid_depth(bird, v).min(-1)
  np.testing.assert_allclose(depth, 1.0, atol=1e-6)


def test_parts_and_colours_are_mirror_symmetric():
  bird = syn.sample_bird(np.random.default_rng(3))
  points = np.random.default_rng(4).normal(0, 0.3, size=(500, 3))
  mirrored = points * [1, -1, 1]
  np.testing.assert_array_equal(syn.part_labels(bird, points), syn.part_labels(bird, mirrored))
  np.testing.assert_allclose(syn.surface_colour(bird, points), syn.surface_colour(bird, mirrored))


def test_eyes_are_small_dark_details():
  bird = syn.sample_bird(np.random.default_rng(5))
  pupil = syn.surface_colour(bird, bird.eye_centre[None])[0]
  assert np.all(pupil < 0.1)
  sphere = mesh_lib.symmetric_sphere()
  colours = syn.surface_colour(bird, syn.texel_points(syn.bird_vertices(bird, sphere), sphere.faces, 6))
  dark = np.all(colours < 0.1, axis=-1)
  assert 0 < dark.sum() < 0.01 * dark.size  # present, but only a few texels


def test_texel_points_are_the_exact_barycentric_sums():
  # Bit for bit the plain einsum: mirrored vertices cancel to exact zeros there, and the spots' hash
  # lattice would put a ±1e-19 (say, from a BLAS matmul's fused multiply-adds) in another cell.
  sphere = mesh_lib.symmetric_sphere()
  v = syn.bird_vertices(syn.sample_bird(np.random.default_rng(2)), sphere)
  expected = np.einsum("tk,fkd->ftd", mesh_lib.texel_barycentrics(6), v[sphere.faces])
  np.testing.assert_array_equal(syn.texel_points(v, sphere.faces, 6), expected)


def test_surface_colour_is_pointwise():
  # Computed in blocks of points: any subset gets the same colours as within the whole set.
  sphere = mesh_lib.symmetric_sphere()
  bird = syn.sample_bird(np.random.default_rng(6))
  points = syn.texel_points(syn.bird_vertices(bird, sphere), sphere.faces, 6).reshape(-1, 3)
  assert len(points) > 2 * syn._BLOCK  # pylint: disable=protected-access
  subset = np.random.default_rng(7).choice(len(points), 1000, replace=False)
  np.testing.assert_array_equal(syn.surface_colour(bird, points)[subset],
                                syn.surface_colour(bird, points[subset]))
  labels = syn.part_labels(bird, points[subset[:50]])
  np.testing.assert_array_equal(labels, [syn.part_labels(bird, p[None])[0] for p in points[subset[:50]]])


def test_examples_are_deterministic(examples):
  again = syn.make_examples(0, "validation", [2], syn.RenderSettings(image_size=48, num_novel_views=2))[0]
  for key, value in again.items():
    np.testing.assert_array_equal(value, examples[2][key], err_msg=key)
  assert not np.array_equal(examples[0]["vertices"], examples[1]["vertices"])


def test_example_fields(examples):
  for ex in examples:
    assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
    mask = ex["mask"][..., 0] / 255.0
    assert 0.1 < mask.mean() < 0.8                      # the bird fills a CUB-like share of the crop
    parts = ex["parts"].astype(np.float32) / 255.0
    np.testing.assert_allclose(parts.sum(-1), 1.0, atol=0.03)
    assert np.mean(parts[..., 0][mask < 0.01]) > 0.9   # background channel outside the bird
    assert set(np.unique(ex["face_parts"])) == {1, 2, 3, 4}
    kp = ex["keypoints"]
    assert kp.shape == (15, 3) and np.all(np.abs(kp[:, :2]) < 1.0)
    visible = kp[:, 2] > 0
    assert 3 <= visible.sum() < 15
    cols = np.clip(((kp[:, 0] + 1) * 24 - 0.5).round().astype(int), 0, 47)
    rows = np.clip(((kp[:, 1] + 1) * 24 - 0.5).round().astype(int), 0, 47)
    near = np.max([np.roll(mask, (dr, dc), (0, 1)) for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
    assert np.all(near[rows[visible], cols[visible]] > 0.5)   # visible keypoints lie on the bird
    assert ex["novel_views"].shape == (2, 48, 48, 4)
    assert np.all(ex["novel_views"][..., 3].mean(axis=(1, 2)) > 10)


def test_cameras_are_mostly_side_views():
  azimuths = np.array([syn.sample_camera(np.random.default_rng(i))[1] for i in range(400)])
  side = np.minimum(np.abs(((azimuths + 180) % 360) - 180), np.abs(((azimuths) % 360) - 180))
  assert np.mean(side < 45) > 0.6
