"""Bilinear grid sampling, exact against ``torch.nn.functional.grid_sample`` (paper Eq. 7-8, 18).

``grid_sample(image, grid)`` reads ``image`` at the continuous positions in ``grid``. It is GS in
the paper's Eq. 7-8 (the input image sampled through the texture flow) and in UMR's texture-flow
lookup (NVlabs/UMR nnutils/geom_utils.py, sample_textures). Two implementations live here:

* `grid_sample_reference`: plain ``jnp`` code differentiated by JAX's autodiff, written to be
  obviously correct. It is the oracle for the tests and for `grid_sample`.
* `grid_sample`: the same forward value with a hand-written `jax.custom_vjp` (gathers of the four
  corners fused into the weighted sum, scatter-adds for the image cotangent, closed-form grid
  cotangent, only the inputs kept as residuals). The backward rule is itself plain ``jnp`` code,
  so it can be differentiated again (second order, lookahead of Eq. 31-32).

Conventions (shared by every function in `jaxrecon.ops`):

* Channels last: ``image`` is ``(B, H, W, C)``, ``grid`` is ``(B, ..., 2)``, the result
  ``(B, ..., C)``.
* ``grid[..., 0]`` is x (along the width), ``grid[..., 1]`` is y (along the height), both
  normalised to [-1, 1]; values outside are allowed and handled by ``padding_mode``.
* ``align_corners=True`` maps -1 and 1 to the centres of the corner pixels (pixel ``i`` sits at
  ``-1 + 2i/(W-1)``): torch<1.3's behaviour, which UMR relies on (it pins torch==1.1.0 in
  NVlabs/UMR requirements.txt).
  ``align_corners=False`` maps -1 and 1 to the outer edges of the corner pixels (torch's default).
* ``padding_mode``: 'zeros' (out-of-image corners read 0), 'border' (coordinates clamped to the
  image), 'reflection' (coordinates reflected at the border, then clamped), with torch's exact
  rules, also for the gradients (a clamped coordinate gets zero gradient, borders included).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

PADDING_MODES = ("zeros", "border", "reflection")


def check_args(image, grid, padding_mode):
  """Raises ValueError unless image is (B, H, W, C), grid (B, ..., 2), padding_mode known."""
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
  # The same float operations, in the same order, as torch's CPU kernel (GridSamplerKernel.cpp):
  # bit-equal source indices keep floor(), hence the one-sided derivative at pixel centres, equal.
  scale = (size - 1) / 2.0 if align_corners else size / 2.0
  index = (coord + 1.0) * scale if align_corners else (coord + 1.0) * scale - 0.5
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
  # Unnormalise as torch's CPU kernel does (same float ops, so floor() agrees at pixel centres).
  if align_corners:
    index = (coord + 1.0) * ((size - 1) / 2.0)
  else:
    index = (coord + 1.0) * (size / 2.0) - 0.5
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
  check_args(image, grid, padding_mode)
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


class Corners(NamedTuple):
  """The four corners around every sample point, ordered (y0,x0), (y0,x1), (y1,x0), (y1,x1).

  Structure of arrays: every field is (B, N) or a list of four (B, N) arrays. XLA:CPU vectorises
  this far better than a trailing axis of size 4, and fuses the gathers into their consumers.

  Attributes:
    index: 4 x (B, N) int32 into each image flattened to (H*W, C), clamped to a valid pixel. Per
      image, not into the whole batch: gathers that keep the batch axis let a batch-sharded step
      sample each device's images locally (a flat index into B*H*W made XLA's partitioner
      all-reduce the (B, N, C) samples of the whole global batch on every device).
    weight: 4 x (B, N) bilinear weights lambda_ij of Eq. 22, zero for corners outside the image.
    inside: 4 x (B, N) float 1/0, whether the corner lies in the image (only 'zeros' padding
      produces 0).
    tx, ty: (B, N) fractional positions ``x - x0``, ``y - y0`` in pixels.
    dix, diy: (B, N) d(source pixel coordinate)/d(normalised grid coordinate), torch's
      ``gix_mult`` times the unnormalisation scale (0 where padding clamps the coordinate).
  """
  index: list
  weight: list
  inside: list
  tx: jax.Array
  ty: jax.Array
  dix: jax.Array
  diy: jax.Array


def corner_weights(grid, height: int, width: int, align_corners: bool,
                   padding_mode: str) -> Corners:
  """The `Corners` of every point of ``grid`` (B, N, 2) in an image of size ``height x width``."""
  ix, dix = _source_index(grid[..., 0], width, align_corners, padding_mode)
  iy, diy = _source_index(grid[..., 1], height, align_corners, padding_mode)
  x0, y0 = jnp.floor(ix), jnp.floor(iy)
  tx, ty = ix - x0, iy - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  index, weight, inside = [], [], []
  for dy in (0, 1):
    for dx in (0, 1):
      xc, yc = x0 + dx, y0 + dy
      valid = ((xc >= 0) & (xc <= width - 1) & (yc >= 0) & (yc <= height - 1)).astype(tx.dtype)
      wx = tx if dx else 1.0 - tx
      wy = ty if dy else 1.0 - ty
      index.append(jnp.clip(yc, 0, height - 1) * width + jnp.clip(xc, 0, width - 1))
      weight.append(wx * wy * valid)
      inside.append(valid)
  return Corners(index, weight, inside, tx, ty, dix, diy)


def gather(flat_image, index):
  """(B, H*W, C) images, (B, N) per-image pixel indices -> (B, N, C): a gather whose batch axis
  stays a batch axis (vmap), so it partitions along a sharded batch."""
  return jax.vmap(lambda image, i: image[i])(flat_image, index)


def interpolate(flat_image, corners: Corners):
  """Eq. 18: ``sum_k weight_k * U[index_k]``; (B, H*W, C) images -> (B, N, C)."""
  return sum(w[..., None] * gather(flat_image, i) for i, w in zip(corners.index, corners.weight))


def grid_cotangent(flat_image, corners: Corners, cotangent):
  """d/dgrid of ``sum(cotangent * interpolate(flat_image, corners))`` (Eq. 24-25; Eq. 27-30).

  This is ``h(I, theta_c)`` of Eq. 15 contracted with the output cotangent; passing the modulated
  image ``I * I_var`` gives the variance branch ``h(I', theta_c)`` of Eq. 16-17. Written with
  differences of neighbouring corners, so a flat image gives exactly zero (Eq. 26).

  Args:
    flat_image: (B, H*W, C) the images whose corner values U_ij enter the gradient.
    corners: `Corners` of the sample points.
    cotangent: (B, N, C) d loss / d out (``2 (C_xy - C'_xy)`` in Eq. 20-21).
  Returns:
    (B, N, 2) float.
  """
  num_channels = flat_image.shape[-1]
  projected = []  # U_k . cotangent per corner, zero outside the image
  for index, inside in zip(corners.index, corners.inside):
    value = gather(flat_image, index)
    # An explicit sum over the (few) channels: a reduce over a minor axis of size C is ~10x slower
    # on XLA:CPU (it becomes a library call instead of being fused with the gather).
    p = value[..., 0] * cotangent[..., 0]
    for c in range(1, num_channels):
      p = p + value[..., c] * cotangent[..., c]
    projected.append(p * inside)
  p00, p01, p10, p11 = projected
  tx, ty = corners.tx, corners.ty
  grad_x = corners.dix * ((1.0 - ty) * (p01 - p00) + ty * (p11 - p10))
  grad_y = corners.diy * ((1.0 - tx) * (p10 - p00) + tx * (p11 - p01))
  return jnp.stack([grad_x, grad_y], axis=-1)


def image_cotangent(corners: Corners, cotangent, image_shape):
  """Transpose of `interpolate` w.r.t. the image: scatter-adds ``weight_k * cotangent``.

  Args:
    corners: `Corners` of the sample points.
    cotangent: (B, N, C).
    image_shape: (B, H, W, C).
  Returns:
    image_shape float array.
  """
  b, h, w, c = image_shape
  scatter_add = jax.vmap(lambda total, i, v: total.at[i].add(v, mode="promise_in_bounds"))
  total = jnp.zeros((b, h * w, c), cotangent.dtype)
  for index, weight in zip(corners.index, corners.weight):
    total = scatter_add(total, index, weight[..., None] * cotangent)
  return total.reshape(image_shape)


def flatten_image(image):
  """(B, H, W, C) -> (B, H*W, C), the layout `Corners.index` points into."""
  return image.reshape(image.shape[0], -1, image.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _grid_sample_flat(image, grid, align_corners, padding_mode):
  corners = corner_weights(grid, image.shape[1], image.shape[2], align_corners, padding_mode)
  return interpolate(flatten_image(image), corners)


def _grid_sample_fwd(image, grid, align_corners, padding_mode):
  # Residuals are the inputs only: the corners are cheap to recompute, and storing (B, N, 4, C)
  # gathered values costs more memory traffic than the gathers themselves.
  return _grid_sample_flat(image, grid, align_corners, padding_mode), (image, grid)


def _grid_sample_bwd(align_corners, padding_mode, residuals, cotangent):
  image, grid = residuals
  corners = corner_weights(grid, image.shape[1], image.shape[2], align_corners, padding_mode)
  return (image_cotangent(corners, cotangent, image.shape),
          grid_cotangent(flatten_image(image), corners, cotangent))


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
  check_args(image, grid, padding_mode)
  b, _, _, c = image.shape
  grid_shape = grid.shape[1:-1]
  flat = grid.reshape(b, -1, 2).astype(image.dtype)
  out = _grid_sample_flat(image, flat, bool(align_corners), padding_mode)
  return out.reshape((b,) + grid_shape + (c,))
