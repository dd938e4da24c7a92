"""Invariants of the symmetric icosphere, its topology, texels and UV sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from jaxrecon.geometry import mesh


@pytest.fixture(scope="module")
def sphere():
  return mesh.symmetric_sphere()


def test_counts_match_umr(sphere):
  assert (sphere.num_vertices, sphere.num_faces) == (642, 1280)
  assert (sphere.num_center, sphere.num_side) == (32, 305)
  assert (sphere.num_center_faces, sphere.num_side_faces) == (32, 624)
  assert sphere.num_half_vertices == 337
  assert len(sphere.edges) == 1920


@pytest.mark.parametrize("subdivisions", [0, 1, 2, 3])
def test_icosphere_refinement_counts(subdivisions):
  vertices, faces = mesh.icosphere(subdivisions)
  assert len(vertices) == 10 * 4**subdivisions + 2
  assert len(faces) == 20 * 4**subdivisions
  np.testing.assert_allclose(np.linalg.norm(vertices, axis=1), 1.0, atol=1e-12)


def test_closed_oriented_manifold(sphere):
  tm = trimesh.Trimesh(sphere.vertices, sphere.faces, process=False)
  assert tm.is_watertight and tm.is_winding_consistent
  assert tm.euler_number == 2  # V - E + F for a sphere
  assert tm.volume > 0  # positive volume <=> outward winding
  # Every edge is shared by exactly two faces, once in each direction.
  directed = np.concatenate([sphere.faces[:, [0, 1]], sphere.faces[:, [1, 2]], sphere.faces[:, [2, 0]]])
  assert len({tuple(e) for e in directed.tolist()}) == len(directed)
  assert len(sphere.edge_quads) == len(sphere.edges)


def test_all_normals_point_outward(sphere):
  a, b, c = (sphere.vertices[sphere.faces[:, k]] for k in range(3))
  normals = np.cross(b - a, c - a)
  centroids = (a + b + c) / 3
  assert np.all(np.sum(normals * centroids, axis=1) > 0)


def test_same_surface_as_plain_icosphere(sphere):
  vertices, faces = mesh.icosphere(3)
  np.testing.assert_allclose(np.sort(np.round(sphere.vertices, 9), axis=0),
                             np.sort(np.round(vertices, 9), axis=0), atol=1e-9)
  key = lambda v, f: {tuple(sorted(map(tuple, np.round(v[t], 9).tolist()))) for t in f}
  assert key(sphere.vertices, sphere.faces) == key(vertices, faces)


def test_symmetric_layout(sphere):
  c, s = sphere.num_center, sphere.num_side
  v = sphere.vertices
  assert np.all(v[:c, 1] == 0.0)
  assert np.all(v[c:c + s, 1] > 0) and np.all(v[c + s:, 1] < 0)
  np.testing.assert_array_equal(v[c + s:], v[c:c + s] * [1, -1, 1])
  # Face blocks: plane-crossing, one side, then the mirrored side in the same order.
  fc, fs = sphere.num_center_faces, sphere.num_side_faces
  side_faces = sphere.faces[fc:fc + fs]
  mirrored = sphere.faces[fc + fs:]
  np.testing.assert_array_equal(mirrored, sphere.vertex_mirror[side_faces][:, [0, 2, 1]])
  assert np.all(v[sphere.faces[fc:fc + fs], 1] >= 0)
  crossing_y = v[sphere.faces[:fc], 1]
  assert np.all((crossing_y.max(1) > 0) & (crossing_y.min(1) < 0))


def test_mirror_maps_are_involutions_onto_the_mesh(sphere):
  vm, fm = sphere.vertex_mirror, sphere.face_mirror
  np.testing.assert_array_equal(vm[vm], np.arange(sphere.num_vertices))
  np.testing.assert_array_equal(fm[fm], np.arange(sphere.num_faces))
  np.testing.assert_allclose(sphere.vertices[vm], sphere.vertices * [1, -1, 1], atol=0)
  faces_as_sets = {frozenset(f) for f in sphere.faces.tolist()}
  assert {frozenset(f) for f in vm[sphere.faces].tolist()} == faces_as_sets


def test_symmetrize_round_trip(sphere):
  half = sphere.half(sphere.vertices)
  np.testing.assert_array_equal(sphere.symmetrize(half), sphere.vertices)
  rng = np.random.default_rng(0)
  offsets = jnp.asarray(rng.normal(size=(2, 337, 3)), jnp.float32)
  full = jax.jit(sphere.symmetrize)(offsets)
  assert full.shape == (2, 642, 3)
  np.testing.assert_allclose(full[:, sphere.vertex_mirror] * jnp.array([1, -1, 1]),
                             full.at[:, :32, 1].multiply(-1), rtol=0, atol=0)


def test_symmetrize_rejects_nothing_silently():
  with pytest.raises(ValueError, match="not mirror-symmetric"):
    vertices, faces = mesh.icosphere(1)
    mesh.make_symmetric(vertices + [0.0, 0.1, 0.0], faces)


def test_edge_quads_are_adjacent_faces(sphere):
  faces = {tuple(f) for f in sphere.faces.tolist()}
  rotations = lambda f: {f, (f[1], f[2], f[0]), (f[2], f[0], f[1])}
  for a, b, c, d in sphere.edge_quads[::37].tolist():
    assert rotations((a, b, c)) & faces
    assert rotations((b, a, d)) & faces
    assert c != d


def test_laplacian_rows(sphere):
  lap = sphere.laplacian
  np.testing.assert_allclose(lap.sum(axis=1), 0.0, atol=1e-6)
  degree = sphere.adjacency.sum(axis=1)
  assert set(np.unique(degree)) == {5.0, 6.0}  # icosphere valences: 12 of degree 5
  assert int((degree == 5).sum()) == 12
  # A constant shift has zero Laplacian; a vertex moved off the surface is detected.
  x = jnp.asarray(sphere.vertices, jnp.float32) + jnp.array([3.0, -1.0, 2.0])
  base = mesh.laplacian_coordinates(x, lap)
  bumped = mesh.laplacian_coordinates(x.at[7].add(jnp.array([0.0, 0.0, 0.5])), lap)
  np.testing.assert_allclose(bumped[7] - base[7], [0.0, 0.0, 0.5], atol=1e-5)


@pytest.mark.parametrize("resolution", [1, 2, 3, 6])
def test_texel_centres_round_trip_through_lookup(resolution):
  bary = mesh.texel_barycentrics(resolution)
  assert bary.shape == (resolution**2, 3)
  assert np.all(bary > 0) and np.allclose(bary.sum(1), 1.0)
  index = mesh.texel_index(bary[:, 0], bary[:, 1], resolution)
  np.testing.assert_array_equal(index, np.arange(resolution**2))
  jindex = mesh.texel_index(jnp.asarray(bary[:, 0]), jnp.asarray(bary[:, 1]), resolution)
  np.testing.assert_array_equal(jindex, np.arange(resolution**2))


@pytest.mark.parametrize("resolution", [1, 2, 6])
def test_texel_lookup_partitions_the_face(resolution):
  """Uniform samples in the triangle land in every texel with equal probability (area R^-2)."""
  rng = np.random.default_rng(resolution)
  w = rng.dirichlet(np.ones(3), size=200_000)
  counts = np.bincount(mesh.texel_index(w[:, 0], w[:, 1], resolution), minlength=resolution**2)
  np.testing.assert_allclose(counts / len(w), 1.0 / resolution**2, rtol=0.1)
  # Corners and edges (w0 = 1 reads out of bounds in SoftRas) stay in range.
  corners = mesh.texel_index(np.array([1.0, 0.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.0, 0.5]), resolution)
  assert np.all((corners >= 0) & (corners < resolution**2))


def test_uv_sampler_range_and_continuity(sphere):
  uv = sphere.uv_sampler(6)
  assert uv.shape == (1280, 36, 2) and uv.dtype == np.float32
  assert np.all(np.abs(uv) <= 1.0)
  # Symmetric parametrisation: mirror faces sample the same UV, texel by texel.
  c_plus, fc = sphere.num_side_faces, sphere.num_center_faces
  side, other = uv[fc:fc + c_plus], uv[fc + c_plus:]
  # The mirrored face is wound (m(a), m(c), m(b)), so its texel k is the right face's texel
  # at barycentrics (w0, w2, w1).
  bary = mesh.texel_barycentrics(6)
  perm = mesh.texel_index(bary[:, 0], bary[:, 2], 6)
  np.testing.assert_allclose(other, side[:, perm], atol=1e-6)
  # No seam: no face's texels jump across the image in u (UMR's seam jumps by ~2, see below),
  # and away from the poles (where any azimuth is singular) a face spans a small UV patch.
  assert np.ptp(uv[..., 0], axis=1).max() < 1.0
  centroids = sphere.vertices[sphere.faces].mean(1)
  away_from_poles = np.abs(centroids[:, 2]) < 0.9
  assert np.ptp(uv[away_from_poles], axis=1).max() < 0.2


def test_umr_uv_has_exactly_one_seam(sphere):
  uv = sphere.uv_sampler(6, symmetric=False)
  assert np.all(np.abs(uv) <= 1.0)
  spread = np.ptp(uv[..., 0], axis=1)
  jumps = spread > 1.0
  # Only faces straddling y = 0 on the x < 0 half-plane jump across the image.
  centroids = sphere.vertices[sphere.faces].mean(1)
  assert jumps.any()
  assert np.all(centroids[jumps, 0] < 0)
  assert np.all(np.isin(np.flatnonzero(jumps), np.arange(sphere.num_center_faces)))


def test_sphere_uv_gradients_finite_at_poles_and_origin():
  points = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1e-9, 0.0, 1.0],
                      [0.3, 0.0, 0.2], [-0.5, 0.0, 0.1]])
  for symmetric in (True, False):
    f = lambda p, s=symmetric: jnp.sum(mesh.sphere_uv(p, symmetric=s) ** 2)
    grads = jax.grad(f)(points)
    assert np.all(np.isfinite(grads))
    uv = mesh.sphere_uv(points, symmetric=symmetric)
    assert np.all(np.isfinite(uv)) and np.all(np.abs(uv) <= 1.0)
  np.testing.assert_allclose(mesh.sphere_uv(points[:2])[:, 1], [-1.0, 1.0])


def test_sphere_uv_numpy_and_jax_agree(sphere):
  pts = sphere.vertices
  for symmetric in (True, False):
    a = mesh.sphere_uv(pts, symmetric=symmetric, xp=np)
    b = mesh.sphere_uv(jnp.asarray(pts, jnp.float32), symmetric=symmetric)
    np.testing.assert_allclose(a, b, atol=1e-5)
