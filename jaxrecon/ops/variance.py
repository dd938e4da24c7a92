"""The paper's variance branch for grid sampling (§3.2, Eq. 11, 15-17, 22-32, Fig. 3-6).

Bilinear sampling gives a coordinate only the gradient of its four surrounding pixels (Eq. 24-25):
over a flat region it is exactly zero (Eq. 26) and the texture flow cannot move towards its target
(Fig. 3). The paper multiplies the sampled image by a predicted variance map ``I_var`` so that the
coordinates see the gradient of ``I' = I_r * I_var`` instead (Eq. 16-17, 27-30, Fig. 4 and 6):

  h(I, theta_c)  = d/dtheta_c GS(I, theta_c)             (Eq. 15, the plain gradient)
  h(I', theta_c) = d/dtheta_c GS(I_r * I_var, theta_c)   (Eq. 17, the "new branch")

Eq. 27 keeps the residual ``2 (C_xy - C'_xy)`` of the *true* colours, so the branch changes only the
gradient path to the coordinates (Fig. 6's green arrow), not the sampled colours. Three readings are
offered by `variance_grid_sample`:

* ``mode='paper'``: Eq. 11 literally, ``I_uv = GS(I_r * I_var, theta_c)`` with plain autodiff: the
  colours themselves are modulated.
* ``mode='adaptive'`` (default): colours ``GS(I_r, theta_c)``; the coordinate cotangent is
  ``h(I_r * I_var)`` (``combine='replace'``, Eq. 16-17, 27-30) or ``h(I_r) + h(I_r * I_var)``
  (``combine='add'``: Fig. 6's black and green arrows together); the image cotangent is the usual
  one.
  The variance gets no first-order gradient (it does not change the output) but the backward rule is
  differentiable in it, which is how Eq. 31-32 train it: see `lookahead_loss`.
* ``mode='none'``: plain `grid_sample`.

Conventions are those of `jaxrecon.ops.bilinear` (channels last, ``(x, y)`` in [-1, 1]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrecon.ops import bilinear as gs

MODES = ("adaptive", "paper", "none")
COMBINES = ("replace", "add")


def _check_variance(image, variance, mode, combine):
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if combine not in COMBINES:
    raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
  if variance.ndim != 4 or variance.shape[:3] != image.shape[:3] or variance.shape[3] not in (
      1, image.shape[3]):
    raise ValueError(f"variance must be (B, H, W, 1 or C) for image {image.shape}, "
                     f"got {variance.shape}")


def _gradient_image(image, variance, combine):
  """The image whose bilinear gradient the coordinates receive: I*V ('replace') or I*(1+V) ('add').

  ``h`` is linear in the image, so ``h(I) + h(I*V) = h(I*(1+V))``.
  """
  return image * variance if combine == "replace" else image * (1.0 + variance)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _adaptive_flat(image, variance, grid, align_corners, padding_mode, combine):
  del variance, combine
  corners = gs.corner_weights(grid, image.shape[1], image.shape[2], align_corners, padding_mode)
  return gs.interpolate(gs.flatten_image(image), corners)


def _adaptive_fwd(image, variance, grid, align_corners, padding_mode, combine):
  out = _adaptive_flat(image, variance, grid, align_corners, padding_mode, combine)
  return out, (image, variance, grid)


def _adaptive_bwd(align_corners, padding_mode, combine, residuals, cotangent):
  image, variance, grid = residuals
  corners = gs.corner_weights(grid, image.shape[1], image.shape[2], align_corners, padding_mode)
  modulated = gs.flatten_image(_gradient_image(image, variance, combine))
  # Plain jnp code throughout: differentiable again, w.r.t. `variance` too (Eq. 31-32).
  return (gs.image_cotangent(corners, cotangent, image.shape), jnp.zeros_like(variance),
          gs.grid_cotangent(modulated, corners, cotangent))


_adaptive_flat.defvjp(_adaptive_fwd, _adaptive_bwd)


def variance_grid_sample(image, grid, variance, *, mode: str = "adaptive", combine: str = "replace",
                         align_corners: bool = False, padding_mode: str = "zeros"):
  """Grid sampling with the paper's variance branch (Eq. 11, 16-17, 27-30).

  Args:
    image: (B, H, W, C) float, the sampled image I_r.
    grid: (B, ..., 2) float, the coordinates theta_c (``(x, y)`` in [-1, 1]).
    variance: (B, H, W, 1) or (B, H, W, C) float, the variance map I_var (positive; 1 is neutral).
      One channel is broadcast over the C colour channels.
    mode: 'adaptive' (colours of I_r, coordinate gradient of I_r * I_var), 'paper' (Eq. 11
      literally: GS(I_r * I_var), plain autodiff) or 'none' (plain `grid_sample`; variance unused).
    combine: for 'adaptive': 'replace' (coordinate cotangent h(I_r * I_var), Eq. 17) or 'add'
      (h(I_r) + h(I_r * I_var), Fig. 6's two arrows). Ignored by the other modes.
    align_corners, padding_mode: as in `grid_sample`.
  Returns:
    (B, ..., C): GS(I_r, grid) for 'adaptive' and 'none', GS(I_r * I_var, grid) for 'paper'.
  """
  gs.check_args(image, grid, padding_mode)
  _check_variance(image, variance, mode, combine)
  variance = variance.astype(image.dtype)
  if mode == "none":
    return gs.grid_sample(image, grid, align_corners=align_corners, padding_mode=padding_mode)
  if mode == "paper":
    return gs.grid_sample(image * variance, grid, align_corners=align_corners,
                          padding_mode=padding_mode)
  b, _, _, c = image.shape
  grid_shape = grid.shape[1:-1]
  flat = grid.reshape(b, -1, 2).astype(image.dtype)
  out = _adaptive_flat(image, variance, flat, bool(align_corners), padding_mode, combine)
  return out.reshape((b,) + grid_shape + (c,))


def variance_grid_sample_reference(image, grid, variance, *, mode: str = "adaptive",
                                   combine: str = "replace", align_corners: bool = False,
                                   padding_mode: str = "zeros"):
  """Same contract as `variance_grid_sample`, built from stop-gradients over the autodiff reference.

  For 'adaptive' (``sg`` = stop_gradient, ``GS`` = `grid_sample_reference`)::

    out = GS(I, sg(g)) + GS(I*V, g) - GS(I*V, sg(g))          ('replace')
    out = GS(I, g)     + GS(I*V, g) - GS(I*V, sg(g))          ('add')

  The last two terms cancel in value and in their first derivative w.r.t. I and V, and leave
  ``h(I*V)`` as the derivative w.r.t. g; higher derivatives (d/dV of the grid gradient, used by
  `lookahead_loss`) come out right as well. Slow but obviously correct: the tests' oracle.
  """
  _check_variance(image, variance, mode, combine)
  sample = functools.partial(gs.grid_sample_reference, align_corners=align_corners,
                             padding_mode=padding_mode)
  if mode == "none":
    return sample(image, grid)
  if mode == "paper":
    return sample(image * variance, grid)
  frozen = jax.lax.stop_gradient(grid)
  modulated = image * variance
  plain = sample(image, frozen if combine == "replace" else grid)
  return plain + sample(modulated, grid) - sample(modulated, frozen)


def lookahead_loss(inner_loss, outer_loss, params, variance, *, step_size: float,
                   normalize: bool = False):
  """The one-step lookahead objective that trains the variance (Eq. 31-32).

  ``theta' = theta - step_size * d inner_loss(theta, variance) / d theta``, then
  ``outer_loss(theta')``. When ``inner_loss`` samples through
  ``variance_grid_sample(..., mode='adaptive')``, the step depends on ``variance`` only through the
  backward rule (``I_grad^new`` of Eq. 17), so ``jax.grad(lookahead_loss, argnums=3)`` is the
  meta-gradient of Eq. 31 (``outer_loss`` = distance of theta' to the pseudo-label Y_pse) or Eq. 32
  (``outer_loss`` = reconstruction at theta') w.r.t. I_var; chain it into D_var's parameters by
  making ``variance`` their function. One step (t = 1) of the sum in Eq. 31-32.

  ``outer_loss`` is differentiated through as written: sample with plain `grid_sample` (or
  ``mode='none'``) there to get the exact meta-gradient; sampling through the adaptive rule there
  too yields a surrogate (the modulated gradient at theta' replaces the true one).

  With ``normalize=True`` the step is ``step_size * g / sg(rms(g))``: its RMS over the entries of
  theta is `step_size` whatever the loss's scale (``sg`` = stop_gradient, so the meta-gradient still
  flows through the direction g). A per-image-mean loss has tiny gradients (the default training
  loss moved the flow by ~0.02 px per look-ahead step at step 0.1); normalising makes the look-ahead a
  step of a chosen length (e.g. one pixel), so Eq. 31 scores where the flow would actually go.

  Args:
    inner_loss: ``(params, variance) -> scalar``, the training loss whose gradient moves theta
      (reconstruction and/or alignment, Eq. 10, 12, 19).
    outer_loss: ``params -> scalar``, evaluated at the updated parameters.
    params: pytree theta (the coordinates theta_c, or the parameters of D_flow).
    variance: pytree (usually a (B, H, W, 1) array) passed to ``inner_loss``.
    step_size: alpha in Eq. 31-32 (with `normalize`, the RMS length of the step).
    normalize: scale the step to RMS length `step_size` (see above).
  Returns:
    Scalar ``outer_loss(theta')``.
  """
  grads = jax.grad(inner_loss)(params, variance)
  if normalize:
    leaves = jax.tree.leaves(grads)
    mean_square = sum(jnp.sum(g * g) for g in leaves) / sum(g.size for g in leaves)
    # A zero gradient stays a zero step (tiny: the smallest normal number, not a scale-setting eps).
    mean_square = jnp.maximum(mean_square, jnp.finfo(mean_square.dtype).tiny)
    step_size = step_size / jax.lax.stop_gradient(jnp.sqrt(mean_square))
  updated = jax.tree.map(lambda p, g: p - step_size * g, params, grads)
  return outer_loss(updated)
