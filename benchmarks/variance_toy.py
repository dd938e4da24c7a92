"""The toy of the paper's Fig. 3-4: can a sample point cross a flat region to its target colour?

Setup (one point per image, all batched):

* Image: S x S x 3 (S = 32), a flat grey background (0.5, optionally plus a little smooth noise) and
  one target: the pixel p* (at least 10 px from the border) holds a random dark or bright colour
  that fades linearly to the background over 2 px, so the image is exactly flat beyond ~3 px.
* The point starts ``distance`` px from p* in a random direction, over the flat background. Its
  target colour C' is the image sampled at p*; the loss is Eq. 19, ``|GS(I, p) - C'|^2``.
* Optimiser: Adam on the pixel coordinates p (converted to grid_sample's [-1, 1] with
  align_corners=True, border padding), learning rate ``lr`` = 0.1 px.
* A point "reaches its target" when it ends within 0.5 px of p*.

Methods (all through `jaxrecon.ops.variance_grid_sample`):

* ``plain``: GS, the gradient of Eq. 24-25; zero over the flat background (Eq. 26, Fig. 3).
* ``adaptive``: true colours forward, coordinate gradient of GS(I * V) (Eq. 17, 27-30), with the
  fixed, documented variance map ``V = blur_s(I) / I`` (Gaussian blur, s = ``blur`` px), so that
  ``I * V`` is the blurred image: the target's colour is spread over the flat region around it and
  the coordinate gradient points to it (Fig. 4). ``combine='replace'``.
* ``adaptive_add``: the same with ``combine='add'`` (plain + modulated gradient).
* ``paper``: Eq. 11 literally, GS(I * V) with plain autodiff (the sampled colours are the blurred
  ones too).
* ``learned``: the variance is learned per image with the one-step lookahead of Eq. 31
  (`jaxrecon.ops.lookahead_loss`): V = exp(s), s = 0 at the start; each step first takes an Adam
  step (lr ``meta_lr``) on s along ``d/ds |p - alpha g(p; V) - Y_pse|^2`` (alpha = 1) with a rough
  pseudo-label Y_pse = p* + N(0, 1 px) (the SoftRas label of §3.2), then moves p by an Adam step on
  g(p; V), the adaptive (``combine='add'``) gradient of the reconstruction loss only. The
  pseudo-label never moves p directly: it only shapes V.
* ``align``: baseline for ``learned``: plain GS, and the same pseudo-label pulls p directly
  (reconstruction + |p - Y_pse|^2, cf. the alignment loss Eq. 12).

The points (and, for ``learned``, log V) are optimised with Adam (lr 0.1 px, 0.05), so what counts
is whether a useful gradient direction exists at all (Fig. 3-4), not its size.

  python benchmarks/variance_toy.py [--append BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecon.ops import lookahead_loss
from jaxrecon.ops import variance_grid_sample

SIZE = 32
METHODS = ("plain", "adaptive", "adaptive_add", "paper", "learned", "align")


def _gaussian_blur(image, sigma):
  """Separable Gaussian blur of (B, H, W, C) with edge padding; sigma in pixels."""
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = jnp.asarray(taps / taps.sum(), image.dtype)
  padded = jnp.pad(image, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  h, w = image.shape[1:3]
  rows = sum(taps[k] * padded[:, k:k + h, :, :] for k in range(2 * radius + 1))
  return sum(taps[k] * rows[:, :, k:k + w, :] for k in range(2 * radius + 1))


def make_problem(num_points, distance, *, noise=0.0, seed=0):
  """Images, targets and start points of the toy.

  The target p* is a pixel centre whose pixel holds the target colour; the colour fades linearly to
  the background over 2 px (``a(r) = max(0, 1 - r/2)``), so the interpolated image has its extremum
  exactly at p* (the loss has a unique minimum there) and is exactly flat beyond ~3 px.

  Returns:
    dict with image (P, S, S, 3), target (P, 2) pixel (x, y) of p*, start (P, 2), colour (P, 3)
    = C', pseudo (P, 2) = Y_pse.
  """
  rng = np.random.default_rng(seed)
  target = rng.integers(10, SIZE - 10, size=(num_points, 2)).astype(np.float64)
  angle = rng.uniform(0, 2 * np.pi, size=num_points)
  start = target + distance * np.stack([np.cos(angle), np.sin(angle)], -1)
  bright = rng.random(num_points) < 0.5
  colour = np.where(bright[:, None], rng.uniform(0.8, 0.95, (num_points, 3)),
                    rng.uniform(0.05, 0.2, (num_points, 3)))
  yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
  radius = np.sqrt((xx[None] - target[:, 0, None, None]) ** 2
                   + (yy[None] - target[:, 1, None, None]) ** 2)
  bump = np.maximum(0.0, 1.0 - radius / 2.0)
  image = 0.5 + bump[..., None] * (colour[:, None, None, :] - 0.5)
  if noise:
    texture = np.asarray(_gaussian_blur(jnp.asarray(rng.normal(size=image.shape)), 1.0))
    image = image + noise * texture / texture.std() * (bump[..., None] == 0)
  image = np.clip(image, 0.02, 1.0).astype(np.float32)
  pseudo = target + rng.normal(size=target.shape)
  return dict(image=image, target=target.astype(np.float32), start=start.astype(np.float32),
              colour=colour.astype(np.float32), pseudo=pseudo.astype(np.float32))


def _to_grid(points):
  return points * (2.0 / (SIZE - 1)) - 1.0  # align_corners=True: pixel i at -1 + 2i/(S-1)


def _sample(image, points, variance, mode, combine="replace"):
  """Colours at pixel positions points (P, 2) -> (P, 3)."""
  grid = _to_grid(points)[:, None, :]
  out = variance_grid_sample(image, grid, variance, mode=mode, combine=combine,
                             align_corners=True, padding_mode="border")
  return out[:, 0, :]


def _reconstruction(points, variance, image, colour, mode, combine):
  """Eq. 19 summed over points and channels."""
  return jnp.sum((_sample(image, points, variance, mode, combine) - colour) ** 2)


def _adam(grad, state, lr, b1=0.9, b2=0.999, eps=1e-8):
  """One Adam update; state = (m, v, t). Returns (step, new_state)."""
  m, v, t = state
  t = t + 1
  m = b1 * m + (1 - b1) * grad
  v = b2 * v + (1 - b2) * grad ** 2
  step = lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
  return step, (m, v, t)


@functools.partial(jax.jit, static_argnames=("method", "steps"))
def optimise(problem, method, steps, lr=0.1, blur=3.0, meta_lr=0.05, lookahead_step=1.0):
  """Adam on the pixel coordinates.

  Returns:
    trajectory (steps, P, 2): the points after each step; variance (P, S, S, 1) at the end (ones
    unless ``method='learned'``).
  """
  image, colour = problem["image"], problem["colour"]
  blurred_variance = _gaussian_blur(image, blur) / image
  mode, combine = {"plain": ("none", "replace"), "adaptive": ("adaptive", "replace"),
                   "adaptive_add": ("adaptive", "add"), "paper": ("paper", "replace"),
                   "learned": ("adaptive", "add"), "align": ("none", "replace")}[method]
  rec = functools.partial(_reconstruction, image=image, colour=colour, mode=mode, combine=combine)
  if method == "align":  # baseline: plain GS plus the pseudo-label pulling p directly (cf. Eq. 12)
    plain_rec = functools.partial(_reconstruction, image=image, colour=colour, mode="none",
                                  combine="replace")
    rec = lambda p, v: plain_rec(p, v) + jnp.sum((p - problem["pseudo"]) ** 2)

  def step(carry, _):
    points, point_state, log_variance, variance_state = carry
    if method == "learned":
      alignment = lambda p: jnp.sum((p - problem["pseudo"]) ** 2)  # Eq. 31 with Y_pse
      meta = jax.grad(lambda s: lookahead_loss(rec, alignment, points, jnp.exp(s),
                                               step_size=lookahead_step))(log_variance)
      update, variance_state = _adam(meta, variance_state, meta_lr)
      log_variance = log_variance - update
      variance = jnp.exp(log_variance)
    elif method in ("plain", "align"):
      variance = jnp.ones_like(image[..., :1])
    else:
      variance = blurred_variance
    update, point_state = _adam(jax.grad(rec)(points, variance), point_state, lr)
    points = points - update
    return (points, point_state, log_variance, variance_state), points

  zeros = lambda x: (jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros((), x.dtype))
  log_variance = jnp.zeros(image.shape[:3] + (1,), image.dtype)
  init = (problem["start"], zeros(problem["start"]), log_variance, zeros(log_variance))
  (_, _, log_variance, _), trajectory = jax.lax.scan(step, init, None, length=steps)
  return trajectory, jnp.exp(log_variance)


def reached(problem, points, tolerance=0.5):
  """Fraction of points within ``tolerance`` px of their target."""
  return float(np.mean(np.linalg.norm(np.asarray(points) - problem["target"], axis=-1) < tolerance))


def run(distances=(1.5, 3, 4, 6, 8), steps=(100, 300, 1000), num_points=256, noise=0.0,
        methods=METHODS, seed=0):
  """{(method, distance): [fraction reached after each entry of steps]}."""
  results = {}
  for distance in distances:
    problem = {k: jnp.asarray(v) for k, v in make_problem(num_points, distance, noise=noise,
                                                         seed=seed + int(10 * distance)).items()}
    for method in methods:
      trajectory = optimise(problem, method, max(steps))[0]
      results[(method, distance)] = [reached(problem, trajectory[n - 1]) for n in steps]
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--points", type=int, default=256)
  parser.add_argument("--append", default=None)
  args = parser.parse_args()
  steps = (100, 300, 1000)
  lines = [
      f"## Variance branch toy, paper Fig. 3-4 (benchmarks/variance_toy.py, "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
      "",
      f"{args.points} points per row, each in its own 32x32 image: flat grey background, one "
      "target: a pixel of random dark or bright colour fading linearly to grey over 2 px (the "
      "image is exactly flat beyond ~3 px); the point starts "
      "`distance` px away and descends Eq. 19 (|GS(I,p) - C'|^2) with Adam "
      "(lr 0.1 px). Fraction of points within 0.5 px of the target after N steps. "
      "plain = GS; adaptive = true colours, coordinate gradient of GS(I*V) with the fixed map "
      "V = blur_3px(I)/I (so I*V is the blurred image), combine='replace' / 'add'; paper = Eq. 11 "
      "literally, GS(I*V); learned = V = exp(s) learned per image by the one-step lookahead of "
      "Eq. 31 against a pseudo-label p* + N(0, 1 px) (the label trains V only, never moves p), "
      "combine='add'; align = baseline: plain GS + the same pseudo-label pulling p directly.",
      "",
  ]
  for noise in (0.0, 0.03):
    results = run(steps=steps, num_points=args.points, noise=noise)
    lines += [f"Background noise std {noise} (smooth, sigma 1 px, away from the target):", "",
              "| method | distance px | " + " | ".join(f"N={n}" for n in steps) + " |",
              "|---|---|" + "---|" * len(steps)]
    for (method, distance), fractions in results.items():
      lines.append(f"| {method} | {distance} | " + " | ".join(f"{f:.2f}" for f in fractions) + " |")
    lines.append("")
  text = "\n".join(lines)
  print(text)
  if args.append:
    with open(args.append, "a", encoding="utf-8") as f:
      f.write("\n" + text + "\n")


if __name__ == "__main__":
  main()
