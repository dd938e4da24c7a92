"""The training losses (paper Eq. 1-6, 10-14, 35-39; UMR's definitions and weights: NVlabs/UMR
nnutils/loss_utils.py and the flag defaults of experiments/train_s1.py and train_s2.py).

Every loss is a pure function of arrays; each returns a per-image vector (B,) unless it says
otherwise, so the trainer can weight, average and log terms separately. Where the paper and UMR's
code differ, the docstring says which one is followed and why.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib

# --------------------------------------------------------------------------------------------
# Shape
# --------------------------------------------------------------------------------------------


def mask_iou_per_hypothesis(pred_masks, gt_masks, eps: float = 1e-6):
  """Negative soft IoU (Eq. 1) of each hypothesis: (B, H, S, S), (B, S, S) -> (B, H)
  ``1 − Σ p·t / Σ (p + t − p·t)``."""
  t = gt_masks[:, None]
  intersection = jnp.sum(pred_masks * t, axis=(-2, -1))
  union = jnp.sum(pred_masks + t - pred_masks * t, axis=(-2, -1))
  return 1.0 - intersection / (union + eps)


def mask_iou_loss(pred_masks, gt_masks, probs=None, eps: float = 1e-6):
  """Negative soft IoU (Eq. 1), per hypothesis, weighted by the hypothesis probabilities (UMR).

  Args:
    pred_masks: (B, H, S, S) soft silhouettes of H camera hypotheses (H = 1 for a single camera).
    gt_masks: (B, S, S) soft ground-truth masks.
    probs: (B, H) hypothesis probabilities, or None for a uniform weight 1 (single camera).
  Returns:
    (B,) Σ_h p_h (1 − Σ p·t / Σ (p + t − p·t)).
  """
  per_hypothesis = mask_iou_per_hypothesis(pred_masks, gt_masks, eps)
  if probs is None:
    return jnp.sum(per_hypothesis, axis=1)
  return jnp.sum(probs * per_hypothesis, axis=1)


def best_hypothesis_losses(per_hypothesis, probs, eps: float = 1e-12):
  """Winner-takes-all selection: the loss of each image's best hypothesis, and the cross-entropy
  that teaches the probabilities to predict it.

  UMR trains Σ_h p_h L_h, where a hypothesis that loses probability early stops being refined and
  the choice locks in. Here the hypothesis with the lowest loss gets the whole gradient whatever the
  probabilities say, and the probabilities learn which one that is (the argmin is not differentiated).

  Args:
    per_hypothesis: (B, H) losses (e.g. `mask_iou_per_hypothesis`); probs: (B, H).
  Returns:
    (best loss (B,), −log p_best (B,)).
  """
  best = jax.lax.stop_gradient(jnp.argmin(per_hypothesis, axis=1))
  rows = jnp.arange(per_hypothesis.shape[0])
  return per_hypothesis[rows, best], -jnp.log(probs[rows, best] + eps)


def laplacian_loss(vertices, laplacian):
  """Smoothness (Eq. 4-5) as SoftRas's `LaplacianLoss`: Σ_v ‖x_v − mean(neighbours)‖², per mesh.

  The paper writes the norm unsquared; UMR's weight (0.15) was tuned with SoftRas's squared form,
  which is what we follow.

  Args:
    vertices: (B, V, 3); laplacian: (V, V) from `SymmetricMesh.laplacian`.
  """
  delta = mesh_lib.laplacian_coordinates(vertices, jnp.asarray(laplacian))
  return jnp.sum(delta**2, axis=(1, 2))


def flatten_loss(vertices, edge_quads, eps: float = 1e-6):
  """Flatness (Eq. 6) as SoftRas's `FlattenLoss`: Σ over interior edges of (cos θ + 1)², per mesh.

  θ is the dihedral angle between the faces (a, b, c) and (b, a, d) of each edge a-b (1 − cos θ is
  0 for a flat pair); computed from the components of c − a and d − a orthogonal to the edge.

  Args:
    vertices: (B, V, 3); edge_quads: (E, 4) from `SymmetricMesh.edge_quads`.
  """
  a, b, c, d = (vertices[:, edge_quads[:, k]] for k in range(4))
  edge = b - a

  def orthogonal(p):
    v = p - a
    edge_l2 = jnp.sum(edge**2, -1)
    v_l1 = jnp.sqrt(jnp.sum(v**2, -1) + eps)
    cos = jnp.sum(edge * v, -1) / (jnp.sqrt(edge_l2 + eps) * v_l1 + eps)
    sin = jnp.sqrt(1.0 - cos**2 + eps)
    return v - edge * (jnp.sum(edge * v, -1) / (edge_l2 + eps))[..., None], v_l1 * sin

  oc, oc_len = orthogonal(c)
  od, od_len = orthogonal(d)
  cos = jnp.sum(oc * od, -1) / (oc_len * od_len + eps)
  return jnp.sum((cos + 1.0) ** 2, axis=1)


def deformation_loss(half_offsets):
  """Eq. 3 as UMR's `deform_l2reg`: the mean over free vertices of ‖δv‖₂ (not squared). (B,)"""
  return jnp.mean(jnp.sqrt(jnp.sum(half_offsets**2, -1) + 1e-12), axis=1)


def symmetry_plane_loss(vertices, num_center: int):
  """Stage 1's `ori_reg`: mean |y| of the on-plane vertices, pulling them to y = 0. (B,)

  After UMR's ``sym_reg`` (NVlabs/UMR nnutils/loss_utils.py; weight ``ori_reg_wt`` in
  experiments/train_s1.py), which averages |y| over all vertices.
  """
  return jnp.mean(jnp.abs(vertices[:, :num_center, 1]), axis=1)


def camera_entropy(probs, eps: float = 1e-12):
  """Entropy of the hypothesis probabilities (UMR's `cam_div_loss`, added with a positive weight so
  it is *minimised*, as UMR does despite the name). (B,)"""
  return -jnp.sum(probs * jnp.log(probs + eps), axis=-1)


def flip_permutation(initial_quaternions) -> np.ndarray:
  """Which hypothesis of a flipped image answers hypothesis h of the image: (H,) int.

  For each hypothesis' starting rotation q_h, the one nearest `camera.flip_horizontal`(q_h) (exact for
  the 'azimuths' start at 360°·h/H, where the flip maps azimuth a to 180° − a; with all hypotheses at
  one start, as UMR's identity, every h answers itself).
  """
  q = jnp.asarray(initial_quaternions, jnp.float32)
  flipped = camera.flip_horizontal(jnp.concatenate([jnp.ones_like(q[:, :3]), q], -1))[:, 3:]
  overlap = jnp.abs(flipped @ q.T)                                       # |<q_a, q_b>|: 1 = the same rotation
  return np.asarray(jnp.argmax(overlap, axis=1))


def flip_consistency_loss(cams, probs, flipped_cams, flipped_probs, permutation):
  """The cameras of a horizontally flipped image must be the flipped cameras (`camera.flip_horizontal`).

  A mirror-symmetric object's flipped image is the object seen from the flipped camera, so D_cam must
  be equivariant: hypothesis ``permutation[h]`` of the flipped image is the flip of hypothesis h,
  with the same probability. What this rules out is the degenerate answer of silhouettes on a
  near-symmetric template (the same heading for birds facing left and right); images and their flips
  are all it uses. Per image: ``Σ_h ‖R'_h − R(flip(c_h))‖²_F / 8 + (s'_h − s_h)² + ‖t'_h − flip(t_h)‖²
  + (p'_h − p_h)²`` summed over hypotheses, both sides receiving gradients.

  Args:
    cams, flipped_cams: (B, H, 7) the hypotheses of the images and of their flips.
    probs, flipped_probs: (B, H).
    permutation: (H,) int, `flip_permutation`.
  Returns:
    (B,).
  """
  target = camera.flip_horizontal(cams)
  answer = flipped_cams[:, permutation]
  rotation = jnp.sum((camera.quat_to_matrix(answer[..., 3:]) - camera.quat_to_matrix(target[..., 3:])) ** 2,
                     axis=(-2, -1)) / 8.0                                 # in [0, 1]: 1 = turned by 180°
  scale_translation = jnp.sum((answer[..., :3] - target[..., :3]) ** 2, axis=-1)
  probability = (flipped_probs[:, permutation] - probs) ** 2
  return jnp.sum(rotation + scale_translation + probability, axis=-1)


# --------------------------------------------------------------------------------------------
# Texture
# --------------------------------------------------------------------------------------------


def masked_l1(rendered, pred_mask, image, gt_mask):
  """Image reconstruction (Eq. 10, 35): mean |render·mask_pred − image·mask_gt| per image.

  Args:
    rendered: (B, S, S, 3); pred_mask: (B, S, S, 1); image: (B, S, S, 3); gt_mask: (B, S, S, 1).
  """
  return jnp.mean(jnp.abs(rendered * pred_mask - image * gt_mask), axis=(1, 2, 3))


def perceptual_texture_loss(rendered, pred_mask, image, gt_mask,
                            features: Callable, distance: Callable):
  """UMR's `PerceptualTextureLoss` (Eq. 35's perceptual term): distance(features(render·mask_pred),
  features(image·mask_gt)) per image; `features` maps (B, S, S, 3) in [0, 1] to stage maps."""
  return distance(features(rendered * pred_mask), features(image * gt_mask))


def distance_transform_barrier(mask: np.ndarray, sharpness: float = 50.0) -> np.ndarray:
  """UMR's `compute_dt_barrier` (NumPy, data side): ≈0 inside the mask, →1 outside.

  ``sigmoid(sharpness · (dist_outside − dist_inside) / S)`` with Euclidean distance transforms of the
  binarised mask. (S, S) -> (S, S) float32.
  """
  inside = mask > 0.5
  dist_out = ndimage.distance_transform_edt(~inside)   # distance to the mask, outside it
  dist_in = ndimage.distance_transform_edt(inside)     # distance to the background, inside
  size = mask.shape[0]
  return (1.0 / (1.0 + np.exp(-sharpness * (dist_out - dist_in) / size))).astype(np.float32)


def texture_dt_loss(barrier, flow, sample: Callable):
  """Keep the texture flow on the object: mean of the barrier sampled at the flow. (B,)

  Args:
    barrier: (B, S, S, 1) from `distance_transform_barrier`.
    flow: (B, F, T*T, 2) per-face sampling coordinates in [-1, 1].
    sample: a grid sampler ``(image, grid) -> values`` (e.g. `jaxrecon.ops.grid_sample`).
  """
  return jnp.mean(sample(barrier, flow), axis=(1, 2, 3))


def texture_cycle_loss(flow, p2f, visible):
  """Texture-flow alignment with SoftRas's pseudo-label (Eq. 12): for every visible face, the squared
  distance between the mean of its flow samples and the soft-weighted mean pixel it covers (p2f).

  UMR's stage 2 takes p2f from the hard renderer (NVlabs/UMR nnutils/loss_utils.py,
  ``MultiTextureLoss``), whose kernel fills it in softmax mode only, so the target is always zero;
  here the target is the soft renderer's p2f, held constant (stop-gradient), as UMR's stage 1
  (experiments/train_s1.py) does. The mean is over visible faces (UMR divides by all faces).

  Args:
    flow: (B, F, T*T, 2) image coordinates; p2f: (B, F, 2) image coordinates (same convention);
    visible: (B, F) bool, faces that own at least one pixel of the hard z-buffer.
  Returns:
    (B,)
  """
  target = jax.lax.stop_gradient(p2f)
  err = jnp.sum((jnp.mean(flow, axis=2) - target) ** 2, axis=-1)
  w = visible.astype(err.dtype)
  return jnp.sum(err * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)


def visible_faces(face_index, num_faces: int):
  """(B, S, S) hard z-buffer face indices (−1 = background) -> (B, F) bool. Background is not a face
  (UMR's `TexCycle`, NVlabs/UMR nnutils/loss_utils.py, indexes its mask with the background's −1,
  which marks the last face visible)."""
  b = face_index.shape[0]
  flat = face_index.reshape(b, -1)
  hits = jnp.zeros((b, num_faces + 1), jnp.int32).at[jnp.arange(b)[:, None], jnp.where(flat >= 0, flat, num_faces)].add(1)
  return hits[:, :num_faces] > 0


# --------------------------------------------------------------------------------------------
# Parts (semantic consistency)
# --------------------------------------------------------------------------------------------


def part_centroids(probs, eps: float = 1e-3):
  """Probability-weighted mean image coordinates of each channel: (B, S, S, K) -> (B, K, 2) (x, y)."""
  s = probs.shape[1]
  coords = jnp.arange(s, dtype=probs.dtype) / s * 2 - 1          # UMR's arange(W)/W·2−1
  mass = jnp.sum(probs, axis=(1, 2)) + eps
  x = jnp.sum(probs * coords[None, None, :, None], axis=(1, 2)) / mass
  y = jnp.sum(probs * coords[None, :, None, None], axis=(1, 2)) / mass
  return jnp.stack([x, y], axis=-1)


def part_probability_loss(rendered_parts, part_maps, weights: Sequence[float] = (0.0, 5.0, 0.0, 0.0, 5.0),
                          background: float = 0.1):
  """UMR's `part_matching_loss` (the paper's probability-based semantic loss, Eq. 14).

  Args:
    rendered_parts: (B, S, S, 4) soft renders of the template's parts 1-4 (head, neck, back, belly).
    part_maps: (B, S, S, 5) part probabilities (SCOPS, or the synthetic maps), background first.
    weights: the appearance weight of each of the 5 channels (UMR: head and belly, 5 each).
  Returns:
    (B,) (appearance + landmark) / 4, where landmark is the squared distance between the part
    centroids of softmax([bg, rendered]) and softmax(part_maps), and appearance the weighted MSE of
    the per-channel max-normalised maps.
  """
  b, s = rendered_parts.shape[:2]
  proj = jnp.concatenate([jnp.full((b, s, s, 1), background, rendered_parts.dtype), rendered_parts], -1)
  p_pred, p_gt = jax.nn.softmax(proj, axis=-1), jax.nn.softmax(part_maps, axis=-1)
  landmark = jnp.mean(jnp.sum((part_centroids(p_pred[..., 1:]) - part_centroids(p_gt[..., 1:])) ** 2, -1), -1)
  normalise = lambda m: m / (jnp.max(m, axis=(1, 2), keepdims=True) + 1e-6)
  mse = jnp.mean((normalise(proj) - normalise(part_maps)) ** 2, axis=(1, 2))     # (B, 5)
  appearance = jnp.mean(mse * jnp.asarray(weights, mse.dtype), axis=-1)
  return (appearance + landmark) / 4.0


def sample_part_points(key, probs, num_points: int, oversample: float = 1.5, eps: float = 1e-6):
  """UMR's part point sampling (`utils/image.py:168-206`): draw ⌈oversample·n⌉ pixels from a part's
  probability map (multinomial) and keep the n closest to the part's centroid.

  Args:
    key: a PRNG key; probs: (B, S, S) one part's probabilities (any non-negative scale).
  Returns:
    points (B, n, 2) at pixel centres in image coordinates (x right, y down, [-1, 1], the
    convention of `camera.project`), and valid (B, n): False for images where the part is absent.
  """
  b, s = probs.shape[:2]
  draws = int(np.ceil(num_points * oversample))
  flat = probs.reshape(b, s * s)
  logits = jnp.log(jnp.maximum(flat, 0.0) + 1e-30)
  index = jax.random.categorical(key, logits, axis=-1, shape=(draws, b)).T          # (B, draws)
  centres = (2 * jnp.arange(s, dtype=probs.dtype) + 1) / s - 1
  xy = jnp.stack([centres[index % s], centres[index // s]], -1)                     # (B, draws, 2)
  mass = jnp.sum(flat, -1, keepdims=True)
  grid_x, grid_y = jnp.tile(centres, s), jnp.repeat(centres, s)
  centroid = jnp.stack([flat @ grid_x, flat @ grid_y], -1) / jnp.maximum(mass, eps)   # (B, 2)
  distance = jnp.sum((xy - centroid[:, None]) ** 2, -1)
  _, keep = jax.lax.top_k(-distance, num_points)
  points = jnp.take_along_axis(xy, keep[..., None], axis=1)
  return jax.lax.stop_gradient(points), jnp.broadcast_to(mass > eps, (b, num_points))


def vertex_part_chamfer(projected, points, point_mask):
  """The vertex-based semantic loss (Eq. 13, UMR's `CorrLossChamfer`): one-directional squared
  Chamfer distance from each projected part vertex to the nearest sampled part point. (B,)

  Args:
    projected: (B, N, 2) the part's template vertices projected to the image.
    points: (B, M, 2) points sampled from the part's probability map; point_mask: (B, M) valid ones.
  """
  d2 = jnp.sum((projected[:, :, None] - points[:, None]) ** 2, axis=-1)
  d2 = jnp.where(point_mask[:, None, :], d2, jnp.inf)
  nearest = jnp.min(d2, axis=-1)
  has_points = jnp.any(point_mask, axis=-1)
  return jnp.where(has_points, jnp.mean(jnp.where(jnp.isfinite(nearest), nearest, 0.0), axis=-1), 0.0)


# --------------------------------------------------------------------------------------------
# Adversarial (Eq. 37-39)
# --------------------------------------------------------------------------------------------


def discriminator_loss(real_logits, fake_logits):
  """Eq. 37 as binary cross-entropy: −log D(real) − log(1 − D(fake)), per sample pair. (B,)"""
  return jax.nn.softplus(-real_logits) + jax.nn.softplus(fake_logits)


def generator_loss(fake_logits, saturating: bool = False):
  """Eq. 38. The literal min log(1 − D(fake)) saturates when D wins; the default is the usual
  non-saturating form −log D(fake) with the same fixed point. (B,)"""
  if saturating:
    return -jax.nn.softplus(fake_logits)
  return jax.nn.softplus(-fake_logits)


def gradient_penalty(discriminator: Callable, real, fake, key):
  """WGAN-GP (Eq. 39): (‖∇_x D(x̂)‖ − 1)² at x̂ = ε·real + (1 − ε)·fake, ε ~ U(0, 1) per sample. (B,)"""
  eps = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), real.dtype)
  mixed = eps * real + (1.0 - eps) * fake
  grads = jax.grad(lambda x: jnp.sum(discriminator(x)))(mixed)
  norm = jnp.sqrt(jnp.sum(grads**2, axis=tuple(range(1, grads.ndim))) + 1e-12)
  return (norm - 1.0) ** 2
