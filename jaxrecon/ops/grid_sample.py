"""Bilinear grid sampling, exact against ``torch.nn.functional.grid_sample`` (paper Eq. 7-8, 18).

``grid_sample(image, grid)`` reads ``image`` at the continuous positions in ``grid``. It is GS in the
paper's Eq. 7-8 (the input image sampled through the texture flow) and in UMR's texture-flow lookup
(umr.md §1.5). Two implementations live here:

* `grid_sample_reference`: plain ``jnp`` code differentiated by JAX's autodiff, written to be obviously
  correct. It is the oracle for the tests and for `grid_sample`.
* `grid_sample`: the same forward value with a hand-written `jax.custom_vjp` (one gather of the four
  corners, one scatter-add for the image cotangent, closed-form grid cotangent). The backward rule is
  itself plain ``jnp`` code, so it can be differentiated again (second order, lookahead of Eq. 31-32).

Conventions (shared by every function in `jaxrecon.ops`):

* Channels last: ``image`` is ``(B, H, W, C)``, ``grid`` is ``(B, ..., 2)``, the result ``(B, ..., C)``.
* ``grid[..., 0]`` is x (along the width), ``grid[..., 1]`` is y (along the height), both normalised to
  [-1, 1]; values outside are allowed and handled by ``padding_mode``.
* ``align_corners=True`` maps -1 and 1 to the centres of the corner pixels (pixel ``i`` sits at
  ``-1 + 2i/(W-1)``): torch<1.3's behaviour, which UMR relies on (umr.md §1.5).
  ``align_corners=False`` maps -1 and 1 to the outer edges of the corner pixels (torch's default now).
* ``padding_mode``: 'zeros' (out-of-image corners read 0), 'border' (coordinates clamped to the image),
  'reflection' (coordinates reflected at the border, then clamped), with torch's exact rules, also for
  the gradients (a clamped coordinate gets zero gradient, borders included).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PADDING_MODES = ("zeros", "border", "reflection")


def _check_args(image, grid, padding_mode):
  if image.ndim != 4:
    raise ValueError(f"image must be (B, H, W, C), got shape {image.shape}")
  if grid.ndim < 2 or grid.shape[-1] != 2 or grid.shape[0] != image.shape[0]:
    raise ValueError(f"grid must be (B, ..., 2) with B={image.shape[0]}, got shape {grid.shape}")
  if padding_mode not in PADDING_MODES:
    raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")


# --------------------------------------------------------------------------------------------------
# Coordinate transform: normalised grid value -> source pixel index (torch's grid_sampler_compute_
# source_index), with its derivative computed explicitly the way torch does it.


def _source_index(coord, size: int, align_corners: bool, padding_mode: str):
  """Pixel-space source coordinate of normalised coordinates, and its derivative.

  Args:
    coord: (...) float, normalised coordinates (-1 and 1 are the image ends, see module docstring).
    size: W for x, H for y.
    align_corners, padding_mode: as in `grid_sample`.
  Returns:
    index: (...) float, the coordinate in pixels (pixel centres at integers).
    dindex: (...) float, d index / d coord (torch's ``gix_mult`` times the unnormalisation scale).
  """
  if align_corners:
    scale = (size - 1) / 2.0
    index = (coord + 1.0) * scale
  else:
    scale = size / 2.0
    index = ((coord + 1.0) * size - 1.0) / 2.0
  mult = jnp.ones_like(index)
  if padding_mode == "reflection":
    # torch's reflect_coordinates_set_grad: reflect into [low, high] = [0, size-1] (align_corners)
    # or [-0.5, size-0.5], keeping the sign of the derivative.
    low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
    span = high - low
    if span <= 0:  # a single pixel with align_corners: every coordinate maps to 0
      index, mult = jnp.zeros_like(index), jnp.zeros_like(index)
    else:
      shifted = index - low
      sign = jnp.where(shifted < 0, -1.0, 1.0).astype(index.dtype)
      shifted = jnp.abs(shifted)
      extra = jnp.fmod(shifted, span)
      flips = jnp.floor(shifted / span)
      even = jnp.fmod(flips, 2.0) == 0
      index = jnp.where(even, extra + low, span - extra + low)
      mult = jnp.where(even, sign, -sign)
  if padding_mode in ("border", "reflection"):
    # torch's clip_coordinates_set_grad: borders count as out of range for the gradient.
    index, mult = (jnp.where(index <= 0, 0.0, jnp.where(index >= size - 1, size - 1.0, index)),
                   jnp.where((index <= 0) | (index >= size - 1), 0.0, mult))
    index = index.astype(coord.dtype)
  return index, (mult * scale).astype(coord.dtype)


# --------------------------------------------------------------------------------------------------
# The reference: obviously correct, plain autodiff.


def _reference_source_index(coord, size: int, align_corners: bool, padding_mode: str):
  """Like `_source_index` but built from differentiable ops only (autodiff gives the derivative)."""
  if align_corners:
    index = (coord + 1.0) / 2.0 * (size - 1)
  else:
    index = ((coord + 1.0) * size - 1.0) / 2.0
  if padding_mode == "reflection":
    low, high = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
    span = high - low
    if span <= 0:
      return jnp.zeros_like(index)
    shifted = jnp.abs(index - low)
    extra = jnp.fmod(shifted, span)
    flips = jax.lax.stop_gradient(jnp.floor(shifted / span))
    index = jnp.where(jnp.fmod(flips, 2.0) == 0, extra + low, span - extra + low)
  if padding_mode in ("border", "reflection"):
    index = jnp.where(index <= 0, 0.0, jnp.where(index >= size - 1, size - 1.0, index))
  return index.astype(coord.dtype)


def grid_sample_reference(image, grid, *, align_corners: bool = False, padding_mode: str = "zeros"):
  """Bilinear sampling, Eq. 18, written plainly; gradients come from JAX's autodiff.

  ``out = sum_ij U_ij max(0, 1-|x-i|) max(0, 1-|y-j|)`` over the four pixels around ``(x, y)``.

  Args:
    image: (B, H, W, C) float.
    grid: (B, ..., 2) float, ``(x, y)`` normalised to [-1, 1].
    align_corners, padding_mode: as in `grid_sample`.
  Returns:
    (B, ..., C), same dtype as ``image``.
  """
  _check_args(image, grid, padding_mode)
  b, h, w, c = image.shape
  grid_shape = grid.shape[1:-1]
  grid = grid.reshape(b, -1, 2).astype(image.dtype)
  ix = _reference_source_index(grid[..., 0], w, align_corners, padding_mode)
  iy = _reference_source_index(grid[..., 1], h, align_corners, padding_mode)
  x0 = jax.lax.stop_gradient(jnp.floor(ix))
  y0 = jax.lax.stop_gradient(jnp.floor(iy))
  batch = jnp.arange(b)[:, None]
  out = jnp.zeros((b, ix.shape[1], c), image.dtype)
  for dy in (0, 1):
    for dx in (0, 1):
      xc, yc = x0 + dx, y0 + dy
      # Bilinear weights (Eq. 22): max(0, 1-|x-i|) max(0, 1-|y-j|) for the corner (i, j).
      weight = (1.0 - jnp.abs(ix - xc)) * (1.0 - jnp.abs(iy - yc))
      inside = (xc >= 0) & (xc <= w - 1) & (yc >= 0) & (yc <= h - 1)
      xi = jnp.clip(xc, 0, w - 1).astype(jnp.int32)
      yi = jnp.clip(yc, 0, h - 1).astype(jnp.int32)
      value = jnp.where(inside[..., None], image[batch, yi, xi], 0.0)
      out = out + weight[..., None] * value
  return out.reshape((b,) + grid_shape + (c,))


# --------------------------------------------------------------------------------------------------
# The fast path: custom_vjp.


def corner_weights(grid, height: int, width: int, align_corners: bool, padding_mode: str):
  """Flat corner indices, bilinear weights and their grid derivatives for every sample point.

  The four corners are ordered (y0,x0), (y0,x1), (y1,x0), (y1,x1). A corner outside the image gets
  weight 0 (only 'zeros' padding can produce one) and a clamped, valid index.

  Args:
    grid: (B, N, 2) float, normalised ``(x, y)``.
    height, width: H and W of the sampled image.
    align_corners, padding_mode: as in `grid_sample`.
  Returns:
    index: (B, N, 4) int32 into the flattened ``(B*H*W, ...)`` image.
    weight: (B, N, 4) float, the weights lambda_ij of Eq. 22 (zero for corners outside the image).
    dweight: (B, N, 4, 2) float, d weight / d grid (x, y) (the d lambda_ij / dx of Eq. 24-25, in
      normalised units), zero for corners outside the image.
  """
  b, n, _ = grid.shape
  ix, dix = _source_index(grid[..., 0], width, align_corners, padding_mode)
  iy, diy = _source_index(grid[..., 1], height, align_corners, padding_mode)
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  tx, ty = ix - x0, iy - y0
  x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xs = jnp.stack([x0i, x0i + 1, x0i, x0i + 1], axis=-1)
  ys = jnp.stack([y0i, y0i, y0i + 1, y0i + 1], axis=-1)
  wx = jnp.stack([1.0 - tx, tx, 1.0 - tx, tx], axis=-1)
  wy = jnp.stack([1.0 - ty, 1.0 - ty, ty, ty], axis=-1)
  sx = jnp.array([-1.0, 1.0, -1.0, 1.0], grid.dtype)  # d wx / d ix
  sy = jnp.array([-1.0, -1.0, 1.0, 1.0], grid.dtype)  # d wy / d iy
  inside = ((xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)).astype(grid.dtype)
  weight = wx * wy * inside
  dweight = jnp.stack([sx * wy * inside * dix[..., None], wx * sy * inside * diy[..., None]], -1)
  flat = (jnp.clip(ys, 0, height - 1) * width + jnp.clip(xs, 0, width - 1)
          + (jnp.arange(b, dtype=jnp.int32) * (height * width))[:, None, None])
  return flat, weight, dweight


def gather_corners(image, index):
  """Values of the four corners: (B, H, W, C) image, (B, N, 4) flat index -> (B, N, 4, C)."""
  return image.reshape(-1, image.shape[-1])[index]


def scatter_corners(values, index, image_shape):
  """Transpose of `gather_corners`: adds (B, N, 4, C) corner values into a (B, H, W, C) image."""
  c = image_shape[-1]
  total = jnp.zeros((image_shape[0] * image_shape[1] * image_shape[2], c), values.dtype)
  total = total.at[index.reshape(-1)].add(values.reshape(-1, c), mode="promise_in_bounds")
  return total.reshape(image_shape)


def grid_cotangent(corners, dweight, cotangent):
  """d/dgrid of ``sum(cotangent * out)`` for corner values ``corners`` (Eq. 24-25, 27-30).

  Args:
    corners: (B, N, 4, C) corner values U_ij (or U'_ij = U_ij * I_var^ij for the variance branch).
    dweight: (B, N, 4, 2) from `corner_weights`.
    cotangent: (B, N, C) d loss / d out.
  Returns:
    (B, N, 2).
  """
  projected = jnp.einsum("bnkc,bnc->bnk", corners, cotangent)
  return jnp.einsum("bnk,bnkd->bnd", projected, dweight)


def _interpolate(corners, weight):
  return jnp.einsum("bnkc,bnk->bnc", corners, weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grid_sample_flat(image, grid, align_corners, padding_mode):
  index, weight, _ = corner_weights(grid, image.shape[1], image.shape[2], align_corners,
                                    padding_mode)
  return _interpolate(gather_corners(image, index), weight)


def _grid_sample_fwd(image, grid, align_corners, padding_mode):
  index, weight, dweight = corner_weights(grid, image.shape[1], image.shape[2], align_corners,
                                          padding_mode)
  corners = gather_corners(image, index)
  return _interpolate(corners, weight), (corners, index, weight, dweight, image.shape)


def _grid_sample_bwd(align_corners, padding_mode, residuals, cotangent):
  del align_corners, padding_mode
  corners, index, weight, dweight, image_shape = residuals
  image_ct = scatter_corners(weight[..., None] * cotangent[:, :, None, :], index, image_shape)
  return image_ct, grid_cotangent(corners, dweight, cotangent).astype(dweight.dtype)


_grid_sample_flat.defvjp(_grid_sample_fwd, _grid_sample_bwd)


def grid_sample(image, grid, *, align_corners: bool = False, padding_mode: str = "zeros"):
  """Bilinear sampling of ``image`` at ``grid`` (GS of Eq. 7-8), equal to torch's ``grid_sample``.

  Forward value and gradients (w.r.t. ``image`` and ``grid``) match
  ``torch.nn.functional.grid_sample(image_nchw, grid, 'bilinear', padding_mode, align_corners)`` to
  float32 round-off, for any coordinates (also outside [-1, 1]). The gradient w.r.t. ``grid`` is the
  plain bilinear one, ``h(I, theta_c)`` of Eq. 15 (Eq. 24-25 per point); see
  `jaxrecon.ops.variance_grid_sample` for the paper's variance branch.

  Args:
    image: (B, H, W, C) float.
    grid: (B, ..., 2) float, ``grid[..., 0]`` = x along the width, ``grid[..., 1]`` = y along the
      height, normalised to [-1, 1].
    align_corners: True: -1/1 are the centres of the corner pixels (UMR, torch<1.3); False: their
      outer edges (torch's default).
    padding_mode: 'zeros', 'border' or 'reflection' (torch's rules).
  Returns:
    (B, ..., C), same dtype as ``image``.
  """
  _check_args(image, grid, padding_mode)
  b, _, _, c = image.shape
  grid_shape = grid.shape[1:-1]
  flat = grid.reshape(b, -1, 2).astype(image.dtype)
  out = _grid_sample_flat(image, flat, bool(align_corners), padding_mode)
  return out.reshape((b,) + grid_shape + (c,))
