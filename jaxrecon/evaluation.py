"""Evaluation and visualisation of a trained reconstructor (floor 3).

`make_eval_step` (per-image metrics under a documented protocol), `evaluate` (every image of a
split, means keyed 'eval/<split>/<metric>', plus FID and keypoint-transfer PCK over the split),
`make_report` / `markdown_table` (what ``python -m jaxrecon.evaluate`` writes), `restore_model`
(a workdir's config and latest parameters), `make_visualise` (the reconstruction grid) and
`log_images` (that grid to TensorBoard and PNG).

Protocols (`PROTOCOLS` holds the strings written next to every result):

* ``default``: the most probable camera hypothesis, no noise, no flips, every image of the split.
* ``umr_compatible``: NVlabs/UMR ``experiments/test_iou.py`` (its test loader is ``data/cub.py``'s
  ``data_loader(mirror=True)``, its camera ``MultiCamPredictor.sample`` of ``nnutils/cub_mesh.py``): each image
  is flipped horizontally with probability 0.5, the camera hypothesis is *sampled* from the
  predicted probabilities, the soft (not thresholded) silhouette is scored against the soft mask,
  and UMR's ``batch_size=32, drop_last=True`` is replicated (only the first ``32·⌊N/32⌋`` images are
  scored when N >= 32, e.g. 2848 of CUB's 2874). Random draws come from ``jax.random.key(seed)``
  folded with the batch index, so a seed gives one result. Our network has no VAE noise (UMR
  samples z at test time; there is nothing to sample here). Only the image metrics of test_iou.py
  (mask IoU, plus SSIM and texture L1 on the same renders) are reported under this protocol; the
  others are recorded as skipped. Keypoint-transfer PCK is UMR's separate test_kp.py protocol, which
  the default protocol's PCK already follows ('flow' mode does not use the camera).

Metric definitions are in `METRICS` (also written into every metrics.json).
"""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxrecon import components, losses, ops
from jaxrecon import workdir as workdir_lib
from jaxrecon.geometry import camera as camera_lib
from jaxrecon.metrics import fid as fid_lib
from jaxrecon.metrics import image as image_metrics
from jaxrecon.metrics import keypoints as kp_metrics
from jaxrecon.metrics import shape as shape_metrics

PROTOCOLS = {
    "default": ("most probable camera hypothesis (argmax of the predicted probabilities), no noise, "
                "no flips, every image of the split; soft silhouettes at the dataset resolution"),
    "umr_compatible": ("UMR experiments/test_iou.py: each image flipped horizontally with p=0.5, the "
                       "camera hypothesis sampled from the predicted probabilities (seeded), soft "
                       "silhouette vs soft mask, UMR's batch 32 with drop_last (first 32*floor(N/32) "
                       "images when N >= 32); mask IoU, SSIM and texture L1 only"),
}

# The metrics that need the default protocol (skipped under umr_compatible).
_CAMERA_METRICS = ("camera_error_deg", "camera_error_twin_deg", "camera_error_raw_deg")
_DEFAULT_ONLY = ("fid", "pck_0.1", "pck_0.15", *_CAMERA_METRICS, "chamfer_3d", "f_score", "novel_view_l1",
                 "novel_view_ssim")

METRICS = {
    "mask_iou": ("soft IoU sum(p*g)/sum(p+g-p*g) of the rendered silhouette p vs the ground-truth mask "
                 "g at the dataset resolution, mean over images (NVlabs/UMR experiments/test_iou.py)"),
    "ssim": ("SSIM (skimage convention: Gaussian window sigma=1.5, K1=0.01, K2=0.03, data range 1, "
             "mean over the valid region and RGB) of the render on black vs image*mask (paper §4.3, Table 1; "
             "UMR's scripts compute no SSIM, so this protocol is ours)"),
    "texture_l1": "mean |render*silhouette - image*mask| over pixels and channels (Eq. 10)",
    "camera_error_deg": ("median over images of the geodesic angle (degrees) between the predicted camera "
                         "rotation, after one change of the model's canonical frame fitted on the split (a "
                         "turn about the mirror-plane normal, with or without a 180-degree flip; "
                         "metrics.shape.fit_camera_frame, reported as camera_frame), and the true rotation "
                         "(synthetic ground truth)"),
    "camera_error_twin_deg": ("as camera_error_deg, but a prediction may match the true camera or its mirror "
                              "twin (geometry.camera.mirror_twin: the camera whose silhouette of a symmetric "
                              "shape is identical), whichever is closer: what silhouettes alone can decide"),
    "camera_error_raw_deg": ("mean geodesic angle (degrees) between the predicted and true camera rotations "
                             "with no change of frame: meaningful only for models whose canonical frame is "
                             "the generator's (uniformly random rotations score 126 on average)"),
    "chamfer_3d": ("symmetric squared Chamfer distance (sum of the two directional means) between the "
                   "predicted and true vertices, each rotated into its own camera's view frame, centred "
                   "and scaled to unit RMS radius (metrics.shape.align_to_camera_frame)"),
    "f_score": ("F-score at distance {threshold} between the same aligned vertex sets as chamfer_3d "
                "(Tatarchenko et al. 2019)"),
    "novel_view_l1": ("held-out views (synthetic): the prediction rendered from the true novel camera "
                      "expressed relative to the predicted camera (evaluation.relative_novel_camera); "
                      "sum over GT-mask pixels of m*|render*alpha - novel*m|, divided by 3*sum(m); mean "
                      "over views and images"),
    "novel_view_ssim": ("held-out views (synthetic): SSIM map (as ssim) of the render on black vs the "
                        "true novel view*mask, averaged over the true mask's pixels in the valid region"),
    "fid": ("Frechet Inception Distance (pytorch-fid InceptionV3 pool3, 2048-d, float64 statistics) "
            "between renders from random novel views (turned by U(0, 360) degrees about the image's "
            "vertical axis, Eq. 36; seeded) and the real images*mask, both on black, over the split"),
    "pck_0.1": ("keypoint-transfer PCK@0.1 (NVlabs/UMR experiments/test_kp.py, 'flow' mode): {pairs} random "
                "pairs (RandomState(N).choice, with replacement), both directions, keypoints visible "
                "in both images, correct when |err|*(1+2*0.05)/2 < 0.1, mean over keypoint types"),
    "pck_0.15": "as pck_0.1 with threshold 0.15",
}


def metric_definition(name: str, config=None, kp_pairs: int | None = None) -> str:
  text = METRICS[name]
  if name == "f_score":
    text = text.format(threshold=_f_threshold(config) if config is not None else 0.1)
  if name == "pck_0.1":
    text = text.format(pairs=kp_pairs if kp_pairs is not None else "N")
  return text


def _f_threshold(config) -> float:
  return float(config.eval.get("fscore_threshold", 0.1))


# ----------------------------------------------------------------------------------------------
# Per-batch metrics
# ----------------------------------------------------------------------------------------------


def relative_novel_camera(pred_cam, gt_cam, gt_novel_cam):
  """The true novel camera expressed relative to the true input camera, applied to the prediction.

  With ``k = s_n / s_g`` (the novel view's re-framing), ``R_rel = R_n R_g⁻¹`` (the novel rotation
  relative to the input one, in the view frame; shapes are compared in the view frame because the
  canonical frames of a prediction and the ground truth need not agree):

    s' = k · s_p,   q' = q_rel ⊗ q_p,   t' = k · [R_rel (t_p − t_g, 0)]_xy + t_n

  i.e. the view-frame points of the prediction, ``s_p R_p X + (t_p, 0)``, are rotated by R_rel about
  the point where the true object's origin appears in the input view (image position t_g, depth 0),
  scaled by k and moved to the novel view's centring t_n, exactly the map that takes the true
  object from its input view to its novel view. A perfect prediction (in any weak-perspective gauge
  ``(s, X) ~ (s/c, c X)``) therefore renders exactly the true novel view.

  Args:
    pred_cam, gt_cam, gt_novel_cam: (B, 7) ``[s, tx, ty, qw, qx, qy, qz]``.
  Returns:
    (B, 7) camera for rendering the predicted shape.
  """
  q_g = camera_lib.quat_normalize(gt_cam[:, 3:])
  q_n = camera_lib.quat_normalize(gt_novel_cam[:, 3:])
  q_rel = camera_lib.quat_multiply(q_n, camera_lib.quat_conjugate(q_g))
  k = gt_novel_cam[:, :1] / gt_cam[:, :1]
  offset = jnp.concatenate([pred_cam[:, 1:3] - gt_cam[:, 1:3], jnp.zeros_like(pred_cam[:, :1])], -1)
  shift = camera_lib.quat_rotate(q_rel, offset[:, None, :])[:, 0, :2]
  quat = camera_lib.quat_multiply(q_rel, camera_lib.quat_normalize(pred_cam[:, 3:]))
  return jnp.concatenate([k * pred_cam[:, :1], k * shift + gt_novel_cam[:, 1:3], quat], -1)


def masked_ssim(a, b, mask):
  """SSIM map of (a, b) (`metrics.image.ssim`'s convention) averaged over `mask`'s pixels.

  The map covers the valid region (a 5-pixel border is left out), so the mask is cropped the same
  way. Images whose cropped mask is empty score 0. (B, H, W, C), (B, H, W, C), (B, H, W, 1) -> (B,).
  """
  import dm_pix  # pylint: disable=g-import-not-at-top
  ssim_map = dm_pix.ssim(a, b, max_val=1.0, filter_size=image_metrics.SSIM_FILTER_SIZE,
                         filter_sigma=image_metrics.SSIM_FILTER_SIGMA, k1=0.01, k2=0.03, return_map=True)
  r = image_metrics.SSIM_FILTER_SIZE // 2
  m = mask[:, r:-r, r:-r, :]
  weight = jnp.sum(m, axis=(1, 2, 3)) * ssim_map.shape[-1]
  return jnp.where(weight > 0, jnp.sum(ssim_map * m, axis=(1, 2, 3)) / jnp.maximum(weight, 1e-12), 0.0)


def masked_l1_within(render, gt, mask):
  """Σ m·|render − gt·m| / (3·Σ m) per image: the L1 within the (soft) ground-truth mask."""
  num = jnp.sum(mask * jnp.abs(render - gt * mask), axis=(1, 2, 3))
  return num / jnp.maximum(render.shape[-1] * jnp.sum(mask, axis=(1, 2, 3)), 1e-12)


def make_scorer(config, sphere, protocol: str = "default"):
  """(batch, vertices, cam, colours, key) -> (per-image metrics, rgba, random_view): the per-image
  metrics of a prediction, whoever made it (the network in `make_eval_step`, or the oracles of
  benchmarks/ceiling.py).

  Args of the returned function: batch (image, mask and, where present, camera, vertices,
  novel_views, novel_cameras); vertices (B, V, 3) canonical shape; cam (B, 7) the scored camera;
  colours (B, F, T², 3) the per-texel colours; key for the random novel view of FID.
  Returns: metrics {name: (B,)} (definitions in `METRICS`), rgba (B, S, S, 4) the render from `cam`,
  random_view (B, S, S, 3) the prediction from a random novel camera (Eq. 36) on black.
  """
  rasterize = components.make_rasterizer(config, for_evaluation=True)
  screen_faces = components.make_screen_faces(config, sphere.faces)
  f_threshold = _f_threshold(config)

  def score(batch, vertices, cam, colours, key):
    image, mask = batch["image"], batch["mask"]
    rgba = rasterize(screen_faces(vertices, cam), colours)
    metrics = {
        "mask_iou": image_metrics.mask_iou(rgba[..., 3], mask[..., 0]),
        "ssim": image_metrics.ssim(rgba[..., :3] * rgba[..., 3:], image, mask),
        "texture_l1": losses.masked_l1(rgba[..., :3], rgba[..., 3:], image, mask),
    }
    if protocol == "default" and "camera" in batch and "vertices" in batch:
      # The aligned camera errors need the whole split (one change of frame): `evaluate` computes them.
      metrics["camera_error_raw_deg"] = shape_metrics.rotation_error_degrees(cam[:, 3:], batch["camera"][:, 3:])
      pred_aligned = shape_metrics.align_to_camera_frame(vertices, cam)
      gt_aligned = shape_metrics.align_to_camera_frame(batch["vertices"], batch["camera"])
      metrics["chamfer_3d"] = shape_metrics.chamfer_distance(pred_aligned, gt_aligned)
      metrics["f_score"] = shape_metrics.f_score(pred_aligned, gt_aligned, f_threshold)
    if protocol == "default" and "novel_views" in batch and "novel_cameras" in batch:
      l1s, ssims = [], []
      for v in range(batch["novel_views"].shape[1]):
        novel_cam = relative_novel_camera(cam, batch["camera"], batch["novel_cameras"][:, v])
        view = rasterize(screen_faces(vertices, novel_cam), colours)
        render = view[..., :3] * view[..., 3:]
        gt = batch["novel_views"][:, v]
        gt_rgb, gt_mask = gt[..., :3], gt[..., 3:]
        l1s.append(masked_l1_within(render, gt_rgb, gt_mask))
        ssims.append(masked_ssim(render, gt_rgb * gt_mask, gt_mask))
      metrics["novel_view_l1"] = jnp.mean(jnp.stack(l1s), axis=0)
      metrics["novel_view_ssim"] = jnp.mean(jnp.stack(ssims), axis=0)
    random_view = rasterize(screen_faces(vertices, components.random_novel_cameras(key, cam)), colours)
    return metrics, rgba, random_view[..., :3] * random_view[..., 3:]

  return score


def make_eval_step(config, model, sphere, protocol: str = "default"):
  """(params, batch_stats, batch, key=None) -> (per-image metrics, outputs), deterministic given key.

  Protocols: see the module docstring (`PROTOCOLS`). Colours are sampled from the input by the
  predicted flow through the sampler the model was trained with: plain bilinear sampling, or for
  ``variance.mode='paper'`` (Eq. 11 literally) the variance-modulated image GS(I·V) that training
  rendered (the 'adaptive' branch only changes gradients). Per-image metrics: see `make_scorer`.

  Outputs: render (B, S, S, 4), cam (B, 7), colours, pred, flow (B, F, T², 2) (the per-face flow
  for keypoint transfer), image (the input as scored, i.e. flipped under umr_compatible) and
  random_view (B, S, S, 3): the prediction from a random novel camera (Eq. 36) on black, for FID.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
  uv_sampler = components.make_uv_sampler(config, sphere)
  score = make_scorer(config, sphere, protocol)

  def eval_step(params, batch_stats, batch, key=None):
    image, mask = batch["image"], batch["mask"]
    b = image.shape[0]
    key = jax.random.key(0) if key is None else key
    flip_key, cam_key, view_key = jax.random.split(key, 3)
    if protocol == "umr_compatible":   # UMR's test loader flips at random (NVlabs/UMR data/cub.py)
      flip = jax.random.bernoulli(flip_key, 0.5, (b,))[:, None, None, None]
      image = jnp.where(flip, image[:, :, ::-1], image)
      mask = jnp.where(flip, mask[:, :, ::-1], mask)
    pred = model.apply({"params": params, "batch_stats": batch_stats}, image, train=False)
    if protocol == "umr_compatible":   # UMR samples the hypothesis (nnutils/cub_mesh.py)
      best = jax.random.categorical(cam_key, jnp.log(jnp.maximum(pred.cam_probs, 1e-30)), axis=1)
    else:
      best = jnp.argmax(pred.cam_probs, axis=1)
    cam = pred.cam_hypotheses[jnp.arange(b), best]
    flow = components.face_flow(pred.uv_flow, uv_sampler)
    colours = components.sample_texture(config, image, flow, pred.variance)
    metrics, rgba, random_view = score({**batch, "image": image, "mask": mask}, pred.vertices, cam, colours,
                                       view_key)
    outputs = {"render": rgba, "cam": cam, "colours": colours, "pred": pred, "flow": flow, "image": image,
               "random_view": random_view}
    return metrics, outputs

  return eval_step


# ----------------------------------------------------------------------------------------------
# Split-level metrics: FID and keypoint-transfer PCK
# ----------------------------------------------------------------------------------------------


def make_fid_features(variables):
  """A jitted (B, H, W, 3) in [0, 1] -> (B, 2048) pool3 feature function of the FID InceptionV3."""
  from jaxrecon.models import inception  # pylint: disable=g-import-not-at-top
  net = inception.FIDInceptionV3()
  return jax.jit(lambda images: net.apply(variables, images))


def draw_pairs(num_images: int, num_pairs: int) -> np.ndarray:
  """UMR's test_kp.py pairs: ``RandomState(N).choice(N, ...)`` with replacement, (num_pairs, 2)."""
  rng = np.random.RandomState(num_images)
  return np.stack([rng.choice(num_images, num_pairs), rng.choice(num_images, num_pairs)], -1)


def keypoint_faces(keypoints, flows, batch: int = 16) -> np.ndarray:
  """The face each keypoint picks in its own image, UMR's 'flow' mode (σ = 3 px at 256 px): (N, K) int.

  `metrics.keypoints.transfer_keypoints_flow` returns the picked face's mean *target* flow; with a
  target "flow" that holds each face's index as its x coordinate it returns that index, so the
  choice is exactly the metric module's. The choice depends only on the source image, so a split's
  faces are found once per image and every pair just reads the target's face centres.
  """
  n, f, t = flows.shape[:3]
  index_flow = jnp.broadcast_to(
      jnp.stack([jnp.arange(f, dtype=jnp.float32), jnp.zeros(f)], -1)[None, :, None, :], (batch, f, t, 2))

  @jax.jit
  def pick(kp, flow):
    chosen = kp_metrics.transfer_keypoints_flow(kp, flow.astype(jnp.float32), index_flow, sigma=3.0, image_size=256)
    return jnp.round(chosen[..., 0]).astype(jnp.int32)

  faces = []
  for start in range(0, n, batch):
    kp, flow = keypoints[start:start + batch], flows[start:start + batch]
    m = kp.shape[0]
    if m < batch:   # pad to one compiled shape
      kp = np.concatenate([kp, np.repeat(kp[-1:], batch - m, 0)])
      flow = np.concatenate([flow, np.repeat(flow[-1:], batch - m, 0)])
    faces.append(np.asarray(pick(kp, flow))[:m])
  return np.concatenate(faces)


def keypoint_transfer_pck(keypoints, flows, num_pairs: int, alphas=(0.1, 0.15), padding_frac: float = 0.05) -> dict:
  """UMR's keypoint-transfer PCK (NVlabs/UMR ``experiments/test_kp.py``, 'flow' mode) over a split.

  For `draw_pairs` pairs (i, j), keypoints move i→j and j→i through the per-face texture flows
  (`metrics.keypoints.transfer_keypoints_flow`: the face whose source flow samples respond most to a
  σ = 3 px Gaussian at the keypoint (3 px at 256, the same fraction of any image size), then that
  face's mean target flow; computed per image by `keypoint_faces`); scored on keypoints visible in
  both images (`metrics.keypoints.pck`, error scaled by (1 + 2·padding_frac)/2), counts summed over
  all pairs and both directions, then the mean over keypoint types (`metrics.keypoints.pck_score`).

  Args:
    keypoints: (N, K, 3) x, y in [-1, 1] image coordinates and visibility.
    flows: (N, F, T, 2) per-face flow of each image (any float dtype).
    num_pairs: pairs to draw (UMR's README: 10000).
  Returns:
    {'pck_<alpha>': score} and 'num_pairs'.
  """
  keypoints = np.asarray(keypoints, np.float32)
  pairs = draw_pairs(keypoints.shape[0], num_pairs)
  src = np.concatenate([pairs[:, 0], pairs[:, 1]])
  tgt = np.concatenate([pairs[:, 1], pairs[:, 0]])
  faces = keypoint_faces(keypoints, flows)                                 # (N, K)
  centres = np.asarray(flows, np.float32).mean(axis=2)                    # (N, F, 2)
  pred = centres[tgt[:, None], faces[src]]                                # (2P, K, 2)
  visible = keypoints[src, :, 2] * keypoints[tgt, :, 2]
  result = {}
  for alpha in alphas:
    correct, total = kp_metrics.pck(pred, keypoints[tgt], visible, alpha=alpha, padding_frac=padding_frac)
    result[f"pck_{alpha}"] = float(kp_metrics.pck_score(correct, total))
  result["num_pairs"] = int(num_pairs)
  return result


def camera_errors(q_pred, q_true) -> dict:
  """The split's camera errors after one change of the model's canonical frame.

  Args:
    q_pred, q_true: (N, 4) predicted and true camera quaternions.
  Returns:
    median, mean (aligned errors, degrees), twin_median (a camera or its mirror twin counts as right),
    turn_deg and flip (the change of frame found; `metrics.shape.fit_camera_frame`), errors and
    twin_errors (N,).
  """
  fit = shape_metrics.fit_camera_frame(q_pred, q_true)
  errors, twin = np.asarray(fit["errors"]), np.asarray(fit["twin_errors"])
  return {"median": float(np.median(errors)), "mean": float(np.mean(errors)),
          "twin_median": float(np.median(twin)), "turn_deg": fit["turn_deg"], "flip": fit["flip"],
          "errors": errors, "twin_errors": twin}


PREDICTIONS_FILE = "predictions.npz"


def save_predictions(path: str, predictions: dict):
  """Write a split's predictions as .npz: vertices (N, V, 3) in the model's canonical frame, camera
  (N, 7) the scored hypothesis ``[s, tx, ty, qw, qx, qy, qz]``, probs (N, H) the hypotheses'
  probabilities and index (N,) each example's position in the split (read in order)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  n = len(predictions["camera"])
  np.savez_compressed(path, index=np.arange(n), **predictions)
  logging.info("Wrote the predictions of %d images to %s", n, path)


# ----------------------------------------------------------------------------------------------
# The split loop
# ----------------------------------------------------------------------------------------------

_BATCH_KEYS = ("image", "mask", "camera", "vertices", "novel_views", "novel_cameras")
UMR_BATCH_SIZE = 32


def _has_keypoints(batch) -> bool:
  return "keypoints" in batch and np.asarray(batch["keypoints"]).shape[-1] == 3


def evaluate(config, model, sphere, state, writer=None, split: str | None = None, eval_step=None, *,
             protocol: str = "default", seed: int = 0, fid_variables=None, kp_pairs: int | None = None,
             fid_features=None, predictions_path: str | None = None) -> dict:
  """Every metric over every image of `split` (default `config.eval.split`) under `protocol`.

  Per-image metrics come from `make_eval_step` (pass a jitted one to reuse one compilation across
  splits; it must have been made with the same `protocol`). Split-level metrics:

  * FID (default protocol only) when Inception weights are available: `fid_variables`, or loaded
    from ``config.weights.inception``; `fid_features` (a (B, H, W, 3) -> (B, d) function) overrides
    both (tests). Without any, FID is skipped with a logged message.
  * Keypoint-transfer PCK@0.1/0.15 (default protocol) when the data has keypoints (CUB, synthetic),
    over `kp_pairs` pairs (default ``config.eval.kp_pairs``, else UMR's 10000); skipped otherwise.

  * The camera errors (default protocol, synthetic data): one change of frame fitted on the split
    (`camera_errors`), then the median aligned and twin-aware errors.

  Held-out views are used where the split has them (synthetic validation/test; the train split
  stores all-zero ones, which are ignored). `predictions_path`: also write the predictions
  (`save_predictions`).

  Returns:
    {'eval/<split>/<metric>': mean, 'eval/<split>/num_images': N, 'step': step,
     'eval_skipped/<split>': {metric: reason}} (the skipped dict is JSON, not a scalar).
  """
  split = split or config.eval.split
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
  eval_step = eval_step or jax.jit(make_eval_step(config, model, sphere, protocol))
  kp_pairs = int(config.eval.get("kp_pairs", 10000) if kp_pairs is None else kp_pairs)
  skipped = {}

  if fid_features is None and protocol == "default":
    if fid_variables is None and config.weights.inception:
      from jaxrecon.models import weights as weights_lib  # pylint: disable=g-import-not-at-top
      fid_variables = weights_lib.load_variables(config.weights.inception, "fid_inception")
    if fid_variables is not None:
      fid_features = make_fid_features(fid_variables)
  if protocol != "default":
    fid_features = None
    for name in _DEFAULT_ONLY:
      skipped[name] = f"defined under the default protocol only (this is {protocol})"
  elif fid_features is None:
    skipped["fid"] = ("no Inception weights: pass --inception=<converted .npz> (or set "
                      "config.weights.inception); convert once with python -m jaxrecon.tools.convert_weights "
                      "--model fid_inception --src pt_inception-2015-12-05-6726825d.pth --out FILE.npz")
    logging.warning("FID skipped: %s", skipped["fid"])

  loader = components.make_data(config, split, shuffle=False, num_epochs=1, drop_remainder=False)
  base_key = jax.random.key(seed)
  values, keypoints, flows, cameras = {}, [], [], {"pred": [], "true": []}
  predictions = {"vertices": [], "camera": [], "probs": []}
  real_stats, fake_stats = fid_lib.StreamingStatistics(), fid_lib.StreamingStatistics()
  batch_size = None
  for i, batch in enumerate(loader):
    if config.eval.max_batches and i >= config.eval.max_batches:
      break
    n = batch["image"].shape[0]
    batch_size = batch_size or n
    # Pad a short last batch to the batch size (one compilation); the padding is dropped below.
    inputs = {k: np.asarray(batch[k]) for k in _BATCH_KEYS if k in batch}
    if "novel_cameras" in inputs and not np.all(inputs["novel_cameras"][..., 0] > 0):
      inputs.pop("novel_cameras")   # synthetic train split: no held-out views (all zero)
      inputs.pop("novel_views", None)
    if n < batch_size:
      inputs = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) for k, v in inputs.items()}
    out, extra = eval_step(state.params, state.batch_stats, {k: jnp.asarray(v) for k, v in inputs.items()},
                           jax.random.fold_in(base_key, i))
    for k, v in out.items():
      values.setdefault(k, []).append(np.asarray(v)[:n])
    if "camera" in inputs and protocol == "default":
      cameras["pred"].append(np.asarray(extra["cam"][:n, 3:]))
      cameras["true"].append(inputs["camera"][:n, 3:])
    if predictions_path is not None:
      predictions["vertices"].append(np.asarray(extra["pred"].vertices[:n], np.float32))
      predictions["camera"].append(np.asarray(extra["cam"][:n], np.float32))
      predictions["probs"].append(np.asarray(extra["pred"].cam_probs[:n], np.float32))
    if protocol == "default" and _has_keypoints(batch):
      keypoints.append(np.asarray(batch["keypoints"], np.float32))
      flows.append(np.asarray(extra["flow"][:n], np.float16))
    if fid_features is not None:
      real = jnp.asarray(inputs["image"] * inputs["mask"])
      real_stats.update(np.asarray(fid_features(real))[:n])
      fake_stats.update(np.asarray(fid_features(extra["random_view"]))[:n])
  if not values:
    raise ValueError(f"split {split!r} of {config.data.dataset} has no images")

  per_image = {k: np.concatenate(v) for k, v in values.items()}
  num_images = len(per_image["mask_iou"])
  if protocol == "umr_compatible":
    if num_images >= UMR_BATCH_SIZE:
      num_images -= num_images % UMR_BATCH_SIZE
      per_image = {k: v[:num_images] for k, v in per_image.items()}
    else:
      logging.info("umr_compatible: %d images < UMR's batch of %d; all are scored (UMR would score none)",
                   num_images, UMR_BATCH_SIZE)
  results = {f"eval/{split}/{k}": float(np.mean(v)) for k, v in per_image.items()}
  if cameras["pred"]:
    fit = camera_errors(np.concatenate(cameras["pred"])[:num_images], np.concatenate(cameras["true"])[:num_images])
    results[f"eval/{split}/camera_error_deg"] = fit["median"]
    results[f"eval/{split}/camera_error_twin_deg"] = fit["twin_median"]
    results[f"eval_frame/{split}"] = {"turn_deg": fit["turn_deg"], "flip": fit["flip"]}
  if predictions_path is not None:
    save_predictions(predictions_path, {k: np.concatenate(v)[:num_images] for k, v in predictions.items()})

  if fid_features is not None:
    if real_stats.count < 2:
      skipped["fid"] = f"FID needs at least 2 images, the split has {real_stats.count}"
    else:
      results[f"eval/{split}/fid"] = fid_lib.frechet_distance(*real_stats.mean_and_covariance(),
                                                              *fake_stats.mean_and_covariance())
  if protocol != "default":
    pass
  elif keypoints:
    pck = keypoint_transfer_pck(np.concatenate(keypoints), np.concatenate(flows), kp_pairs)
    for k in ("pck_0.1", "pck_0.15"):
      results[f"eval/{split}/{k}"] = pck[k]
    results[f"eval/{split}/kp_pairs"] = pck["num_pairs"]
  else:
    for k in ("pck_0.1", "pck_0.15"):
      skipped[k] = f"the {config.data.dataset} {split} split has no keypoints"
    logging.info("PCK skipped: %s", skipped["pck_0.1"])
  if protocol == "default" and "camera_error_raw_deg" not in per_image:
    for k in _CAMERA_METRICS + ("chamfer_3d", "f_score"):
      skipped[k] = "no 3D ground truth (synthetic data only)"
  if protocol == "default" and "novel_view_l1" not in per_image:
    for k in ("novel_view_l1", "novel_view_ssim"):
      skipped[k] = "no held-out views (synthetic validation/test splits only)"

  results[f"eval/{split}/num_images"] = num_images
  results[f"eval_skipped/{split}"] = skipped
  results["step"] = int(state.step)
  if writer is not None:
    for k, v in results.items():
      if k.startswith("eval/") and not k.endswith(("num_images", "kp_pairs")):
        writer.add_scalar(k, v, int(state.step))
  logging.info("Evaluation on %s (%d images, %s protocol): %s", split, num_images, protocol,
               {k: round(v, 4) for k, v in results.items() if isinstance(v, float)})
  return results


# ----------------------------------------------------------------------------------------------
# Reports (python -m jaxrecon.evaluate)
# ----------------------------------------------------------------------------------------------

# Table order; anything else evaluated comes after.
_ORDER = ("mask_iou", "ssim", "texture_l1", "fid", "pck_0.1", "pck_0.15", *_CAMERA_METRICS, "chamfer_3d",
          "f_score", "novel_view_l1", "novel_view_ssim")


def make_report(results: dict, config, split: str, protocol: str, seed: int = 0, **info) -> dict:
  """The metrics.json content: protocol, step, image count and, per metric, value + definition, or
  status 'skipped' with the reason. `info` adds fields (workdir, checkpoint, ...)."""
  prefix = f"eval/{split}/"
  values = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
  kp_pairs = values.pop("kp_pairs", None)
  num_images = values.pop("num_images")
  skipped = results.get(f"eval_skipped/{split}", {})
  names = [m for m in _ORDER if m in values or m in skipped] + sorted(
      m for m in set(values) | set(skipped) if m not in _ORDER)
  metrics = {}
  for name in names:
    definition = metric_definition(name, config, kp_pairs) if name in METRICS else ""
    if name in values:
      metrics[name] = {"value": values[name], "definition": definition}
    else:
      metrics[name] = {"status": "skipped", "reason": skipped[name], "definition": definition}
  return {"split": split, "dataset": config.data.dataset, "protocol": protocol,
          "protocol_description": PROTOCOLS[protocol], "seed": seed, "step": results["step"],
          "num_images": num_images, "kp_pairs": kp_pairs,
          "camera_frame": results.get(f"eval_frame/{split}"), **info, "metrics": metrics}


def markdown_table(report: dict) -> str:
  """A Markdown table of a `make_report` report (a heading line, then | metric | value | notes |)."""
  lines = [f"Evaluation of step {report['step']} on {report['dataset']} {report['split']} "
           f"({report['num_images']} images), protocol `{report['protocol']}`: {report['protocol_description']}.",
           "", "| metric | value | notes |", "|---|---|---|"]
  for name, m in report["metrics"].items():
    if "value" in m:
      lines.append(f"| {name} | {m['value']:.4f} | |")
    else:
      lines.append(f"| {name} | skipped | {m['reason']} |")
  frame = report.get("camera_frame")
  if frame:
    lines += ["", f"Camera errors after the change of canonical frame fitted on the split: a turn of "
                  f"{frame['turn_deg']:.1f} degrees about the mirror-plane normal"
                  + (", after the 180-degree flip." if frame["flip"] else ", no flip.")]
  return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
  """Write metrics.json and metrics.md into out_dir; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, workdir_lib.METRICS_FILE)
  md_path = os.path.join(out_dir, workdir_lib.METRICS_MD_FILE)
  with open(json_path, "w") as f:
    json.dump(report, f, indent=1)
  with open(md_path, "w") as f:
    f.write(markdown_table(report))
  return json_path, md_path


# ----------------------------------------------------------------------------------------------
# Restoring a trained model
# ----------------------------------------------------------------------------------------------


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run wrote to <workdir>/config.json (lists where the original had tuples)."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir={workdir} is not a jaxrecon training directory "
                            "(python -m jaxrecon.main writes config.json there); pass --config=configs/... "
                            "to give the config explicitly")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_model(workdir: str, config):
  """The network of `config` and the latest checkpoint's parameters in <workdir>/checkpoints.

  Only params, batch_stats and step are read (`workdir.restore_variables`: the checkpoint is
  restored without the optimiser's structure, so evaluation does not depend on how training was
  set up).

  Returns:
    (sphere, model, state) with state.params, state.batch_stats, state.step.
  Raises:
    FileNotFoundError: no checkpoint in the workdir (the message names it).
  """
  from jaxrecon.geometry import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  manager, step = workdir_lib.latest_checkpoint(workdir)
  sphere = mesh_lib.symmetric_sphere(config.mesh.subdivisions)
  model = components.make_model(config, sphere)
  s = config.data.image_size
  like = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, s, s, 3)), train=False))
  variables, step = workdir_lib.restore_variables(
      manager, step, {"params": like["params"], "batch_stats": like["batch_stats"]})
  state = types.SimpleNamespace(params=variables["params"], batch_stats=variables["batch_stats"], step=step)
  return sphere, model, state


# ----------------------------------------------------------------------------------------------
# Visualisation
# ----------------------------------------------------------------------------------------------


def make_visualise(config, model, sphere, num_novel: int = 2):
  """(params, batch_stats, image, mask) -> an image grid (n·S, (6 + num_novel)·S, 3) in [0, 1], one
  row per image:

  input | render from the predicted camera | silhouette (red) over the mask (green) | `num_novel` novel
  views, evenly spaced turns (+120°, +240° for two) | the UV texture (the input sampled by the UV flow;
  2S wide) | variance.
  """
  s = config.data.image_size
  eval_step = make_eval_step(config, model, sphere)
  rasterize = components.make_rasterizer(config, for_evaluation=True)
  screen_faces = components.make_screen_faces(config, sphere.faces)

  @jax.jit
  def panels(params, batch_stats, image, mask):
    _, out = eval_step(params, batch_stats, {"image": image, "mask": mask})
    pred, cam, b = out["pred"], out["cam"], image.shape[0]
    views = []
    for k in range(num_novel):
      novel_cam = components.turn_cameras(cam, jnp.full((b,), 2 * jnp.pi * (k + 1) / (num_novel + 1)))
      rgba = rasterize(screen_faces(pred.vertices, novel_cam), out["colours"])
      views.append(rgba[..., :3] * rgba[..., 3:])
    uv_texture = ops.grid_sample(image, pred.uv_flow, align_corners=True)
    uv_texture = jax.image.resize(uv_texture, (b, s, 2 * s, 3), "bilinear")
    if pred.variance is None:
      variance = jnp.zeros((b, s, s, 3))
    else:   # per image, min-max normalised for display
      v = pred.variance[..., 0]
      lo, hi = v.min((1, 2), keepdims=True), v.max((1, 2), keepdims=True)
      variance = jnp.repeat(((v - lo) / jnp.maximum(hi - lo, 1e-6))[..., None], 3, -1)
    render_rgb = out["render"][..., :3] * out["render"][..., 3:]
    overlay = jnp.concatenate([out["render"][..., 3:], mask, jnp.zeros_like(mask)], -1)
    return jnp.concatenate([image, render_rgb, overlay, *views, uv_texture, variance], axis=2)

  def visualise(params, batch_stats, image, mask):
    rows = np.asarray(panels(params, batch_stats, image, mask))
    return np.clip(rows.reshape(-1, *rows.shape[2:]), 0.0, 1.0)

  return visualise


def log_images(visualise, state, local_batch, writer, workdir, step, count):
  """Write the reconstruction grid (`make_visualise`) of the first images of this process's batch to
  TensorBoard and to <workdir>/images/step_<step>.png."""
  n = min(count, local_batch["image"].shape[0])
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  grid = visualise(params, batch_stats, jnp.asarray(local_batch["image"][:n]), jnp.asarray(local_batch["mask"][:n]))
  writer.add_image("train/reconstructions", grid, step, dataformats="HWC")
  path = workdir_lib.image_path(workdir, step)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.round(grid * 255).astype(np.uint8)).save(path)
