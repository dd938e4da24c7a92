"""Each loss against a hand-computed value or an invariant, and finite gradients at edge cases."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecon import losses
from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib


def test_mask_iou():
  a = jnp.zeros((1, 2, 4, 4)).at[:, 0, :2].set(1.0).at[:, 1, 2:].set(1.0)
  gt = jnp.zeros((1, 4, 4)).at[:, :2].set(1.0)
  per_h = losses.mask_iou_loss(a, gt, jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(per_h, 0.0, atol=1e-6)                  # perfect hypothesis
  np.testing.assert_allclose(losses.mask_iou_loss(a, gt, jnp.array([[0.0, 1.0]])), 1.0, atol=1e-6)
  np.testing.assert_allclose(losses.mask_iou_loss(a, gt, jnp.array([[0.25, 0.75]])), 0.75, atol=1e-6)
  half = jnp.full((1, 1, 4, 4), 0.5)
  np.testing.assert_allclose(losses.mask_iou_loss(half, gt), 1 - 4.0 / 12.0, atol=1e-6)
  g = jax.grad(lambda p: losses.mask_iou_loss(p, jnp.zeros((1, 4, 4))).sum())(jnp.zeros((1, 1, 4, 4)))
  assert np.all(np.isfinite(g))


def test_laplacian_invariants():
  sphere = mesh_lib.symmetric_sphere()
  v = jnp.asarray(sphere.vertices, jnp.float32)[None]
  base = losses.laplacian_loss(v, sphere.laplacian)
  np.testing.assert_allclose(losses.laplacian_loss(v + 3.0, sphere.laplacian), base, rtol=1e-4)
  np.testing.assert_allclose(losses.laplacian_loss(2 * v, sphere.laplacian), 4 * base, rtol=1e-5)
  # Against an explicit loop over neighbours.
  nbrs = [np.flatnonzero(row) for row in sphere.adjacency]
  want = sum(np.sum((sphere.vertices[i] - sphere.vertices[n].mean(0)) ** 2) for i, n in enumerate(nbrs))
  np.testing.assert_allclose(base[0], want, rtol=1e-4)


def test_flatten_is_zero_when_flat_and_four_when_folded():
  quads = np.array([[0, 1, 2, 3]])
  flat = jnp.array([[[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, -1, 0]]])
  folded = jnp.array([[[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.4, 1, 0.0]]])
  right = jnp.array([[[0.0, 0, 0], [1, 0, 0], [0.5, 1, 0], [0.5, 0, -1]]])
  np.testing.assert_allclose(losses.flatten_loss(flat, quads), 0.0, atol=1e-5)
  np.testing.assert_allclose(losses.flatten_loss(folded, quads), 4.0, atol=1e-3)
  np.testing.assert_allclose(losses.flatten_loss(right, quads), 1.0, atol=1e-3)   # 90°: (0 + 1)²
  sphere = mesh_lib.symmetric_sphere()
  g = jax.grad(lambda v: losses.flatten_loss(v, sphere.edge_quads).sum())(
      jnp.asarray(sphere.vertices, jnp.float32)[None])
  assert np.all(np.isfinite(g))


def test_deformation_entropy_symmetry():
  offsets = jnp.array([[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]])
  np.testing.assert_allclose(losses.deformation_loss(offsets), 2.5, atol=1e-5)
  assert np.all(np.isfinite(jax.grad(lambda o: losses.deformation_loss(o).sum())(jnp.zeros((1, 2, 3)))))
  np.testing.assert_allclose(losses.camera_entropy(jnp.full((2, 8), 1 / 8)), np.log(8), rtol=1e-6)
  np.testing.assert_allclose(losses.camera_entropy(jnp.eye(8)[:1]), 0.0, atol=1e-6)
  v = jnp.zeros((1, 5, 3)).at[0, :2, 1].set(jnp.array([0.2, -0.4]))
  np.testing.assert_allclose(losses.symmetry_plane_loss(v, 2), 0.3, atol=1e-6)


def test_masked_l1():
  img = jnp.ones((1, 2, 2, 3))
  m = jnp.ones((1, 2, 2, 1))
  np.testing.assert_allclose(losses.masked_l1(img * 0.5, m, img, m), 0.5)
  np.testing.assert_allclose(losses.masked_l1(img * 0.5, m * 0, img, m * 0), 0.0)


def test_distance_transform_barrier():
  mask = np.zeros((32, 32), np.float32)
  mask[8:24, 8:24] = 1.0
  barrier = losses.distance_transform_barrier(mask)
  assert barrier[16, 16] < 0.01 and barrier[0, 0] > 0.99
  row = barrier[16, :16]
  assert np.all(np.diff(row) <= 0)                       # falls monotonically into the mask
  assert row[7] > 0.5 > row[8]                           # and crosses 1/2 at its edge


def test_texture_dt_loss_uses_the_sampler():
  barrier = jnp.zeros((1, 4, 4, 1)).at[0, :, 2:].set(1.0)
  nearest = lambda img, grid: img[:, 0, jnp.clip(((grid[..., 0] + 1) * 2).astype(int), 0, 3)]
  on = jnp.full((1, 3, 2, 2), 0.9)
  off = jnp.full((1, 3, 2, 2), -0.9)
  assert losses.texture_dt_loss(barrier, on, nearest)[0] == 1.0
  assert losses.texture_dt_loss(barrier, off, nearest)[0] == 0.0


def test_texture_cycle_only_visible_and_no_gradient_to_target():
  flow = jnp.zeros((1, 3, 4, 2))
  p2f = jnp.array([[[0.1, 0.0], [0.0, 0.3], [5.0, 5.0]]])
  visible = jnp.array([[True, True, False]])
  np.testing.assert_allclose(losses.texture_cycle_loss(flow, p2f, visible), (0.01 + 0.09) / 2, rtol=1e-6)
  g = jax.grad(lambda t: losses.texture_cycle_loss(flow, t, visible).sum())(p2f)
  np.testing.assert_array_equal(g, 0.0)
  none = losses.texture_cycle_loss(flow, p2f, jnp.zeros((1, 3), bool))
  np.testing.assert_allclose(none, 0.0)


def test_visible_faces_ignores_background():
  index = jnp.array([[[-1, 0], [2, 2]]])
  np.testing.assert_array_equal(losses.visible_faces(index, 4), [[True, False, True, False]])


def test_part_centroids_and_probability_loss():
  p = jnp.zeros((1, 4, 4, 1)).at[0, 1, 3, 0].set(1.0)
  np.testing.assert_allclose(losses.part_centroids(p, eps=0.0)[0, 0], [0.5, -0.5], atol=1e-6)
  rng = np.random.default_rng(0)
  maps = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 8, 8, 5)) * 3, jnp.float32), -1)
  matched = losses.part_probability_loss(maps[..., 1:], maps)
  shuffled = losses.part_probability_loss(maps[::-1, ..., 1:], maps)
  assert np.all(matched < shuffled)


def test_vertex_part_chamfer():
  projected = jnp.array([[[0.0, 0.0], [1.0, 0.0]]])
  points = jnp.array([[[0.0, 0.1], [1.0, 0.3], [9.0, 9.0]]])
  mask = jnp.array([[True, True, False]])
  np.testing.assert_allclose(losses.vertex_part_chamfer(projected, points, mask), (0.01 + 0.09) / 2, rtol=1e-5)
  np.testing.assert_allclose(losses.vertex_part_chamfer(projected, points, mask * False), 0.0)


def test_adversarial_terms():
  zero = jnp.zeros(3)
  np.testing.assert_allclose(losses.discriminator_loss(zero, zero), 2 * np.log(2), rtol=1e-6)
  np.testing.assert_allclose(losses.generator_loss(zero), np.log(2), rtol=1e-6)
  assert float(losses.generator_loss(jnp.array([10.0]))[0]) < 1e-3
  # A linear discriminator with a unit-norm weight has gradient norm 1 everywhere: no penalty.
  w = jnp.array([0.6, 0.8, 0.0, 0.0]).reshape(1, 2, 2, 1)
  linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
  real, fake = jnp.ones((4, 2, 2, 1)), jnp.zeros((4, 2, 2, 1))
  np.testing.assert_allclose(losses.gradient_penalty(linear, real, fake, jax.random.key(0)), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.gradient_penalty(lambda x: 3 * linear(x), real, fake, jax.random.key(0)),
                             4.0, atol=1e-5)


def test_flip_permutation_matches_the_azimuth_starts():
  starts = camera.view_quaternions(np.arange(4) * 90.0)          # azimuths 0, 90, 180, 270
  np.testing.assert_array_equal(losses.flip_permutation(starts), [2, 1, 0, 3])   # a -> 180 - a
  np.testing.assert_array_equal(losses.flip_permutation(np.tile([[1.0, 0, 0, 0]], (3, 1))), [0, 0, 0])


def test_flip_consistency_is_zero_exactly_for_flipped_cameras():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  b, h = 5, 4
  quats = camera.quat_normalize(jax.random.normal(k1, (b, h, 4)))
  cams = jnp.concatenate([jax.random.uniform(k2, (b, h, 1), minval=0.5, maxval=1.0),
                          jax.random.uniform(k3, (b, h, 2), minval=-0.2, maxval=0.2), quats], -1)
  probs = jax.nn.softmax(jax.random.normal(k1, (b, h)))
  perm = np.array([2, 1, 0, 3])
  inverse = np.argsort(perm)
  answer = camera.flip_horizontal(cams)[:, inverse]               # hypothesis perm[h] answers h
  np.testing.assert_allclose(losses.flip_consistency_loss(cams, probs, answer, probs[:, inverse], perm), 0.0,
                             atol=1e-5)
  # The same cameras unflipped (the degenerate answer: one heading for both) are penalised.
  unflipped = losses.flip_consistency_loss(cams, probs, cams[:, inverse], probs[:, inverse], perm)
  assert np.all(np.asarray(unflipped) > 0.1)
  # Turned by 180 degrees: the rotation part is maximal (1 per hypothesis).
  turned = answer.at[..., 3:].set(camera.quat_multiply(answer[..., 3:], jnp.array([0.0, 0.0, 0.0, 1.0])))
  rotation_only = losses.flip_consistency_loss(cams, probs, turned, probs[:, inverse], perm)
  assert float(jnp.min(rotation_only)) > 1.0
  grads = jax.grad(lambda c: jnp.sum(losses.flip_consistency_loss(cams, probs, c, probs[:, inverse], perm)))(turned)
  assert np.all(np.isfinite(grads))


def test_best_hypothesis_takes_the_gradient_and_teaches_the_probabilities():
  per_h = jnp.array([[0.5, 0.2, 0.9], [0.1, 0.4, 0.3]])
  probs = jnp.array([[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
  loss, choice = losses.best_hypothesis_losses(per_h, probs)
  np.testing.assert_allclose(loss, [0.2, 0.1])
  np.testing.assert_allclose(choice, -np.log([0.1, 0.2]), rtol=1e-6)
  # Whatever the probabilities, only the winner's loss gets a gradient.
  g = jax.grad(lambda x: jnp.sum(losses.best_hypothesis_losses(x, probs)[0]))(per_h)
  np.testing.assert_array_equal(g, [[0, 1, 0], [1, 0, 0]])
  # The cross-entropy raises the winner's probability (through the logits).
  logits = jnp.log(probs)
  g_logits = jax.grad(lambda l: jnp.sum(losses.best_hypothesis_losses(per_h, jax.nn.softmax(l))[1]))(logits)
  assert float(g_logits[0, 1]) < 0 and float(g_logits[1, 0]) < 0
  # UMR's expected loss is the probability-weighted sum of the same per-hypothesis losses.
  masks = jax.random.uniform(jax.random.key(0), (2, 3, 8, 8))
  gt = (jax.random.uniform(jax.random.key(1), (2, 8, 8)) > 0.5).astype(jnp.float32)
  np.testing.assert_allclose(losses.mask_iou_loss(masks, gt, probs),
                             jnp.sum(probs * losses.mask_iou_per_hypothesis(masks, gt), 1), rtol=1e-6)
