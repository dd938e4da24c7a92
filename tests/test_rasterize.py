"""jaxrecon.render.rasterize against a float64 NumPy port of SoftRas's kernel, and tiled vs dense.

The NumPy reference below is written from SoftRas's CUDA kernel (ShichenLiu/SoftRas
``soft_renderer/cuda/soft_rasterize_cuda_kernel.cu``, commit b569bed, cited as ``kernel.cu:LINE``: the
forward kernel at 285-459, the analytic backward at 463-637) independently of the JAX code: it
loops over faces in index order with the kernel's *online* softmax (running max m, rescaled sums),
so the closed form used in JAX is checked too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrecon.geometry import mesh
from jaxrecon.render import rasterize
from jaxrecon.render import soft_rasterize

# ------------------------------------------------------------------------------------------------
# The NumPy reference.


def _reference(fv, tex, size, *, sigma=1e-5, gamma=1e-4, dist_eps=1e-4, eps=1e-3, near=1.0,
               far=100.0, background=(0.0, 0.0, 0.0), double_sided=True, aggr_alpha="prod",
               aggr_rgb="softmax", dist_func="euclidean", bg_double_eps=True, texel_eps=1e-5,
               grads=None):
  """Forward (and, with `grads`=(g_rgba,), SoftRas's analytic backward) in float64.

  Returns:
    dict: rgba (B, S, S, 4), face_index, depth (B, S, S), p2f (B, F, 2), p2f_weight (B, F), and
    with `grads`: d_fv (B, F, 3, 3), d_tex (B, F, R*R, 3).
  """
  fv = np.asarray(fv, np.float64)
  tex = np.asarray(tex, np.float64)
  bsz, nf = fv.shape[:2]
  r = int(round(np.sqrt(tex.shape[2])))
  thr = np.log(1.0 / dist_eps - 1.0) * sigma
  margin = np.sqrt(thr)
  cols, rows = np.meshgrid(np.arange(size), np.arange(size))
  px = ((2 * cols + 1 - size) / size).ravel()
  py = ((size - 1 - 2 * rows) / size).ravel()
  npix = px.size
  bg = np.asarray(background, np.float64)
  out = {k: [] for k in ("rgba", "face_index", "depth", "p2f", "p2f_weight", "d_fv", "d_tex")}

  def pairs(b, f):
    (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = fv[b, f]
    det = x2 * (y0 - y1) + x0 * (y1 - y2) + x1 * (y2 - y0)
    det = max(det, 1e-10) if det > 0 else min(det, -1e-10)
    w = np.stack([((y1 - y2) / det) * px + ((x2 - x1) / det) * py + (x1 * y2 - x2 * y1) / det,
                  ((y2 - y0) / det) * px + ((x0 - x2) / det) * py + (x2 * y0 - x0 * y2) / det,
                  ((y0 - y1) / det) * px + ((x1 - x0) / det) * py + (x0 * y1 - x1 * y0) / det])
    v = fv[b, f, :, :2]
    # Closest boundary point: per edge k (a = v_k, b = v_k+1) the clamped projection.
    best = np.full(npix, np.inf)
    tw = np.zeros((3, npix))  # barycentric weights of the closest point Q (for the backward)
    for k in range(3):
      a, e = v[k], v[(k + 1) % 3] - v[k]
      l2 = e @ e
      t = np.clip(((px - a[0]) * e[0] + (py - a[1]) * e[1]) / l2, 0, 1) if l2 > 0 else 0 * px
      d2k = (a[0] + t * e[0] - px) ** 2 + (a[1] + t * e[1] - py) ** 2
      better = d2k < best
      best = np.where(better, d2k, best)
      for kk in range(3):
        tw[kk] = np.where(better, (1 - t) * (kk == k) + t * (kk == (k + 1) % 3), tw[kk])
    inside = np.all((w > 0) & (w < 1), axis=0)
    inbox = ((px >= v[:, 0].min() - margin) & (px <= v[:, 0].max() + margin)
             & (py >= v[:, 1].min() - margin) & (py <= v[:, 1].max() + margin))
    if dist_func == "euclidean":
      sign = np.where(inside, 1.0, -1.0)
      dis = sign * best
      keep = inbox & (inside | (best < thr))
    else:
      mw = w.min(axis=0)
      dis = np.sign(mw) * mw * mw
      sign = None
      keep = inbox & (-dis < thr)
    with np.errstate(over="ignore"):
      prob = 1.0 / (1.0 + np.exp(-dis / sigma))
    wc = np.clip(w, 0, 1)
    wc = wc / np.maximum(wc.sum(0), 1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
      zp = 1.0 / (wc[0] / z0 + wc[1] / z1 + wc[2] / z2)
    in_range = (zp >= near) & (zp <= far)
    front = (y2 - y0) * (x1 - x0) < (y1 - y0) * (x2 - x0)
    contrib = keep & in_range & (front or double_sided)
    u0, u1 = wc[0] * (1 - texel_eps) + texel_eps / 3, wc[1] * (1 - texel_eps) + texel_eps / 3
    i = np.clip(np.floor(u0 * r), 0, r - 1)
    j = np.clip(np.floor(u1 * r), 0, r - 1)
    texel = np.where((u0 + u1) * r - i - j <= 1, j * r + i, (r - 1 - j) * r + (r - 1 - i))
    colour = tex[b, f][texel.astype(int)]
    incl = np.all((w >= 0) & (w <= 1), axis=0)
    return dict(keep=keep, D=prob, zp=zp, contrib=contrib, in_range=in_range, colour=colour,
                texel=texel.astype(int), incl=incl, wc=wc, d2=best, sign=sign, tw=tw)

  for b in range(bsz):
    acc = np.ones(npix) if aggr_alpha == "prod" else np.zeros(npix)
    m = np.full(npix, eps)
    ssum = np.full(npix, np.exp(eps / gamma))
    num = ssum[:, None] * bg
    if not bg_double_eps:
      ssum, num = np.ones(npix), np.ones((npix, 1)) * bg  # background weight e^{(eps-m)/γ} at m = eps
    depth = np.full(npix, far)
    face = np.full(npix, -1)
    cache = [pairs(b, f) for f in range(nf)]
    for f in range(nf):
      p = cache[f]
      keep, prob = p["keep"], p["D"]
      if aggr_alpha == "prod":
        acc = np.where(keep, acc * (1 - prob), acc)
      elif aggr_alpha == "sum":
        acc = acc + np.where(keep, prob, 0)
      else:
        acc = np.maximum(acc, keep & (prob > 0.5))
      ok = p["contrib"]
      zn = (far - p["zp"]) / (far - near)
      up = ok & (zn > m)
      with np.errstate(over="ignore", invalid="ignore"):
        rescale = np.where(up, np.exp((m - zn) / gamma), 1.0)
      ssum, num, m = ssum * rescale, num * rescale[:, None], np.where(up, zn, m)
      with np.errstate(over="ignore", invalid="ignore"):
        ez = np.where(ok, prob * np.exp((zn - m) / gamma), 0.0)
      ssum, num = ssum + ez, num + ez[:, None] * p["colour"]
      hard = ok & p["incl"] & (p["zp"] < depth)
      depth, face = np.where(hard, p["zp"], depth), np.where(hard, f, face)
    alpha = {"prod": 1 - acc, "sum": acc / nf, "hard": acc.astype(float)}[aggr_alpha]
    if aggr_rgb == "softmax":
      rgb = num / ssum[:, None]
    else:
      rgb = np.stack([cache[f]["colour"][q] if f >= 0 else bg for q, f in enumerate(face)])
    out["rgba"].append(np.concatenate([rgb, alpha[:, None]], 1).reshape(size, size, 4))
    out["face_index"].append(face.reshape(size, size))
    out["depth"].append(depth.reshape(size, size))
    # p2f with the final running max m (the unnormalised weights of the closed form).
    sums = np.zeros((nf, 3))
    for f in range(nf):
      p = cache[f]
      zn = (far - p["zp"]) / (far - near)
      with np.errstate(over="ignore", invalid="ignore"):
        e = np.where(p["contrib"], p["D"] * np.exp((zn - m) / gamma), 0.0)
      sums[f] = [e @ px, e @ py, e.sum()]
    with np.errstate(invalid="ignore"):
      out["p2f"].append(np.where(sums[:, 2:] > 0, sums[:, :2] / sums[:, 2:], 0.0))
    out["p2f_weight"].append(sums[:, 2])

    if grads is not None:  # SoftRas's analytic backward (kernel.cu:463-637)
      assert dist_func == "euclidean" and aggr_alpha == "prod" and aggr_rgb == "softmax"
      g = np.asarray(grads[b], np.float64).reshape(npix, 4)
      g_rgb, g_alpha = g[:, :3], g[:, 3]
      image = out["rgba"][-1].reshape(npix, 4)
      d_fv, d_tex = np.zeros((nf, 3, 3)), np.zeros(tex.shape[1:])
      for f in range(nf):
        p = cache[f]
        live = p["keep"] & p["in_range"]  # kernel.cu:575 skips out-of-range pairs
        prob = p["D"]
        # Exact Π_{i≠j}(1 - D_i) = (1 - A)/(1 - D_j) (SoftRas clamps 1 - D_j at 1e-6).
        d_prob = np.where(live, g_alpha * (1 - image[:, 3]) / (1 - prob), 0.0)
        zn = (far - p["zp"]) / (far - near)
        with np.errstate(over="ignore", invalid="ignore"):
          omega = np.where(p["contrib"], prob * np.exp((zn - m) / gamma) / ssum, 0.0)
        c_rgb = omega * np.sum(g_rgb * (p["colour"] - image[:, :3]), axis=1)
        np.add.at(d_tex[f], p["texel"], omega[:, None] * g_rgb)
        with np.errstate(divide="ignore", invalid="ignore"):
          d_prob = d_prob + np.where(p["contrib"], c_rgb / prob, 0.0)
        d_zn = np.where(p["contrib"], c_rgb / gamma, 0.0)
        c = d_prob * prob * (1 - prob) / sigma
        qx = sum(p["tw"][k] * fv[b, f, k, 0] for k in range(3)) - px
        qy = sum(p["tw"][k] * fv[b, f, k, 1] for k in range(3)) - py
        for k in range(3):
          d_fv[f, k, 0] += np.sum(2 * p["sign"] * c * p["tw"][k] * qx)
          d_fv[f, k, 1] += np.sum(2 * p["sign"] * c * p["tw"][k] * qy)
          dz = d_zn / (near - far) * p["zp"] ** 2 * p["wc"][k] / fv[b, f, k, 2] ** 2
          d_fv[f, k, 2] += np.sum(np.where(p["contrib"], dz, 0.0))
      out["d_fv"].append(d_fv)
      out["d_tex"].append(d_tex)
  return {k: np.stack(v) for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------------
# Scenes.


def _random_scene(seed, batch=2, faces=14, texture_res=2, special=True):
  """Random overlapping triangles plus, with `special`, the awkward cases of the issue."""
  rng = np.random.default_rng(seed)
  centre = rng.uniform(-0.8, 0.8, (batch, faces, 1, 2))
  xy = centre + rng.normal(0, 0.25, (batch, faces, 3, 2))
  z = rng.uniform(2.0, 8.0, (batch, faces, 3, 1))
  fv = np.concatenate([xy, z], -1)
  if special:
    fv[:, 0] = [[-0.6, -0.5, 3.0], [0.7, -0.4, 3.5], [0.65, -0.35, 3.2]]   # very obtuse
    fv[:, 1] = [[-0.3, 0.1, 4.0], [0.1, 0.3, 4.0], [0.5, 0.5, 4.0]]         # collinear: zero area
    fv[:, 2] = [[0.2, -0.2, 2.5], [0.2, -0.2, 2.5], [0.4, 0.1, 3.0]]        # coincident vertices
    fv[:, 3] = [[1.3, 1.2, 3.0], [1.8, 1.5, 3.0], [1.4, 1.9, 3.0]]          # off-screen
    fv[:, 4] = [[-0.5, 0.2, 150.0], [0.0, 0.6, 150.0], [-0.2, -0.1, 140.0]]  # beyond far
    fv[:, 5] = [[0.1, 0.4, 0.5], [0.6, 0.7, 0.5], [0.5, 0.1, 0.4]]          # nearer than near
    fv[:, 6] = [[-0.9, -0.9, 3.0], [0.9, -0.9, 3.0], [0.9, 0.9, 3.0]]       # big, edge-on-ish...
    fv[:, 6, 2, :2] = [-0.88, -0.86]                                          # ... a sliver
  tex = rng.uniform(0, 1, (batch, faces, texture_res**2, 3))
  if special:
    # Degenerate faces have meaningless barycentrics (±1e10 after the det clamp, their clipped
    # values decided by rounding): give them one depth and one colour so the image is well defined.
    fv[:, 2, :, 2] = 2.5
    tex[:, 1:3] = tex[:, 1:3, :1]
  return fv, tex


def _sphere_scene(batch=2, size_scale=0.45, seed=0):
  rng = np.random.default_rng(seed)
  sphere = mesh.symmetric_sphere()
  out = []
  for _ in range(batch):
    v = sphere.vertices * rng.uniform(0.7, 1.3, 3) * size_scale
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    v = v @ q.T
    out.append(np.concatenate([v[:, :2] + rng.uniform(-0.1, 0.1, 2), 5.0 + v[:, 2:]], 1))
  return np.stack(out)[:, sphere.faces]


@functools.lru_cache(maxsize=None)
def _jitted(**kw):
  return jax.jit(functools.partial(soft_rasterize, **kw))


def _render(fv, tex, **kw):
  return _jitted(**kw)(fv, tex)


# Settings where soft edges span pixels of a 12-16 px image (the library defaults are far sharper).
SOFT = dict(sigma=3e-3, gamma=3e-2, dist_eps=1e-3, eps=1e-3)

# ------------------------------------------------------------------------------------------------
# Forward against the NumPy reference.

OPTION_SETS = [
    dict(),
    dict(dist_func="barycentric", aggr_alpha="sum", double_sided=False, background=(0.2, 0.5, 1.0),
         bg_double_eps=False, eps=0.3),
    dict(aggr_alpha="hard", aggr_rgb="hard"),
    dict(sigma=1e-5, gamma=1e-4, dist_eps=1e-4, near=2.0, far=60.0, background=(1.0, 1.0, 1.0)),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["default", "bary-sum-1side", "hard", "sharp"])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_forward_matches_numpy_float64(options, impl):
  fv, tex = _random_scene(seed=1)
  kw = {**SOFT, **options}
  ref = _reference(fv, tex, 12, **kw)
  with jax.enable_x64(True):
    rgba, aux = _render(jnp.asarray(fv), jnp.asarray(tex), image_size=12, impl=impl, tile_size=4,
                        faces_per_item=3, return_aux=True, **kw)
    assert rgba.dtype == jnp.float64
    np.testing.assert_allclose(rgba, ref["rgba"], rtol=0, atol=1e-10)
    np.testing.assert_array_equal(aux["face_index"], ref["face_index"])
    np.testing.assert_allclose(aux["depth"], ref["depth"], rtol=1e-12)
    np.testing.assert_allclose(aux["p2f"], ref["p2f"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(aux["p2f_weight"], ref["p2f_weight"], rtol=1e-10, atol=1e-300)
  # The scene must exercise what it claims to: soft edges, overlaps, a visible background.
  alpha = ref["rgba"][..., 3]
  assert np.any(alpha == 0) and np.any(alpha > (0.1 if kw.get("aggr_alpha") == "sum" else 0.99))
  if kw.get("aggr_alpha") != "hard":
    assert np.any((alpha > 0.02) & (alpha < 0.9))


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_forward_matches_numpy_float32(impl):
  fv, tex = _random_scene(seed=2, texture_res=1)
  ref = _reference(fv, tex, 16, **SOFT)
  rgba = _render(jnp.asarray(fv, jnp.float32), jnp.asarray(tex, jnp.float32), image_size=16,
                 impl=impl, **SOFT)
  assert rgba.dtype == jnp.float32
  np.testing.assert_allclose(rgba, ref["rgba"], rtol=0, atol=1e-5)


def test_library_defaults_on_sphere_float32():
  """Library σ/γ/dist_eps on the 1280-face sphere at 32 px (textured, R = 3) against NumPy."""
  fv = _sphere_scene(batch=1)
  tex = np.random.default_rng(0).uniform(0, 1, (1, fv.shape[1], 9, 3))
  ref = _reference(fv, tex, 32, sigma=1e-4, dist_eps=1e-10)
  rgba = _render(jnp.asarray(fv, jnp.float32), jnp.asarray(tex, jnp.float32), image_size=32,
                 sigma=1e-4, dist_eps=1e-10)
  # RGB at silhouette pixels is decided by e^{(zn-M)/γ} with γ = 1e-4: a float32 ulp of zn moves a
  # weight by ~1e-3 relative, hence the looser RGB tolerance; alpha is tight.
  np.testing.assert_allclose(rgba[..., 3], ref["rgba"][..., 3], rtol=0, atol=1e-5)
  np.testing.assert_allclose(rgba[..., :3], ref["rgba"][..., :3], rtol=0, atol=2e-3)
  assert 0.05 < ref["rgba"][..., 3].mean() < 0.5


def test_pixel_centre_convention():
  """A tiny triangle around the centre of pixel (row 0, column S-1) lights only that pixel."""
  s = 8
  cx, cy = (2 * (s - 1) + 1 - s) / s, (s - 1 - 0) / s
  fv = np.array([[[[cx - 0.05, cy - 0.05, 2.0], [cx + 0.05, cy - 0.05, 2.0],
                   [cx, cy + 0.05, 2.0]]]])
  tex = np.ones((1, 1, 1, 3))
  rgba = np.asarray(_render(jnp.asarray(fv, jnp.float32), jnp.asarray(tex, jnp.float32),
                            image_size=s, sigma=1e-5, impl="dense"))
  assert rgba[0, 0, s - 1, 3] > 0.99
  assert np.sum(rgba[0, ..., 3] > 1e-3) == 1
  np.testing.assert_allclose(rgba[0, 0, s - 1, :3], 1.0, atol=1e-6)
  xs, ys = rasterize.pixel_centres(s)
  assert (xs[-1], ys[0]) == (np.float32(cx), np.float32(cy))


def test_back_faces_leave_rgb_not_alpha():
  s = 8
  ccw = np.array([[-0.6, -0.6, 2.0], [0.6, -0.6, 2.0], [0.0, 0.6, 2.0]])   # counter-clockwise
  fv = np.stack([ccw, ccw[[0, 2, 1]]])[:, None]                              # (2, 1, 3, 3)
  tex = np.full((2, 1, 1, 3), 0.7)
  rgba = np.asarray(_render(jnp.asarray(fv, jnp.float32), jnp.asarray(tex, jnp.float32),
                            image_size=s, double_sided=False, background=(0.0, 0.0, 1.0),
                            impl="dense"))
  np.testing.assert_allclose(rgba[0, ..., 3], rgba[1, ..., 3])
  centre = rgba[:, s // 2, s // 2]
  np.testing.assert_allclose(centre[0, :3], [0, 0, 1], atol=1e-6)   # CCW = back-facing (§1.2)
  np.testing.assert_allclose(centre[1, :3], 0.7, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Tiled vs dense.


@pytest.mark.parametrize("tile,k,batch,faces", [(1, 1, 1, 9), (3, 2, 3, 20), (4, 64, 2, 30),
                                                (16, 5, 3, 12)])
def test_tiled_equals_dense(tile, k, batch, faces):
  fv, tex = _random_scene(seed=3, batch=batch, faces=faces)
  kw = dict(image_size=14, return_aux=True, **SOFT)
  with jax.enable_x64(True):
    fv64, tex64 = jnp.asarray(fv), jnp.asarray(tex)
    dense, aux_d = _render(fv64, tex64, impl="dense", **kw)
    tiled, aux_t = _render(fv64, tex64, impl="tiled", tile_size=tile, faces_per_item=k, **kw)
    np.testing.assert_allclose(tiled, dense, rtol=0, atol=1e-12)
    for key in ("face_index", "depth", "p2f", "p2f_weight"):
      np.testing.assert_allclose(aux_t[key], aux_d[key], rtol=1e-12, atol=1e-12, err_msg=key)
  if tile != 16:
    return
  # float32: same answer up to summation order.
  d32 = _render(fv64.astype(np.float32), tex64.astype(np.float32), impl="dense", **kw)[0]
  t32 = _render(fv64.astype(np.float32), tex64.astype(np.float32), impl="tiled", tile_size=tile,
                faces_per_item=k, **kw)[0]
  np.testing.assert_allclose(t32, d32, rtol=0, atol=1e-5)
  np.testing.assert_allclose(t32[..., 3], d32[..., 3], rtol=0, atol=1e-6)


def test_overfull_tiles_lose_no_face():
  """40 faces stacked on one spot and K = 4: every tile lists up to 40 faces, none is dropped."""
  rng = np.random.default_rng(4)
  n = 40
  base = np.array([[-0.3, -0.2], [0.25, -0.25], [0.05, 0.3]])
  xy = base[None] * rng.uniform(0.3, 1.0, (n, 1, 1)) + rng.normal(0, 0.02, (n, 1, 2))
  fv = np.concatenate([xy, rng.uniform(2, 9, (n, 3, 1))], -1)[None]
  tex = rng.uniform(0, 1, (1, n, 1, 3))
  kw = dict(sigma=3e-2, gamma=3e-2, dist_eps=1e-3)
  ref = _reference(fv, tex, 12, **kw)
  with jax.enable_x64(True):
    rgba, aux = _render(jnp.asarray(fv), jnp.asarray(tex), image_size=12, impl="tiled", tile_size=6,
                        faces_per_item=4, return_aux=True, **kw)
    assert int(aux["faces_per_tile"]) == n
    assert int(aux["work_items"]) > 4 * 4  # more items than tiles: tiles were split
    np.testing.assert_allclose(rgba, ref["rgba"], rtol=0, atol=1e-10)
    # Dropping any one face would be visible: the centre pixel's alpha is Π over all 40.
    dropped = _reference(fv[:, 1:], tex[:, 1:], 12, **kw)["rgba"]
    assert np.max(np.abs(dropped - ref["rgba"])) > 1e-6


def test_tile_face_counts_superset_of_pixel_test():
  fv = _sphere_scene(batch=1)
  counts = np.asarray(rasterize.tile_face_counts(fv, image_size=32, sigma=1e-4, dist_eps=1e-10,
                                                 tile_size=8))
  thr = rasterize.threshold(1e-4, 1e-10)
  xs, ys = rasterize.pixel_centres(32, np.float64)
  m = np.sqrt(thr)
  v = fv[0, :, :, :2]
  lo, hi = v.min(1) - m, v.max(1) + m
  expected = np.zeros((4, 4), int)
  for ty in range(4):
    for tx in range(4):
      x, y = xs[tx * 8:tx * 8 + 8], ys[ty * 8:ty * 8 + 8]
      hit = (np.any((x[None] >= lo[:, :1]) & (x[None] <= hi[:, :1]), 1)
             & np.any((y[None] >= lo[:, 1:]) & (y[None] <= hi[:, 1:]), 1))
      expected[ty, tx] = hit.sum()
  np.testing.assert_array_equal(counts[0], expected)


def _scan_item_ids(fv, plan, cfg, tile, k):
  """The previous binning, as a reference: each work item scans all F faces' boxes (`_overlaps`)
  and takes the k-th K-slice of its tile's list in face-index order."""
  boxes = rasterize._face_boxes(fv, cfg)
  out = []
  for i in range(int(plan.num_chunks)):
    bi, ids, ok, *_ = plan.chunk(i)
    c = plan.tiling.chunk
    j = i * c + np.arange(c)
    item_end, items = np.asarray(plan.item_end), np.asarray(plan.items)
    g = np.minimum(np.searchsorted(item_end, j, side="right"), items.size - 1)
    sub = j - (item_end[g] - items[g])
    tile_id = g % (plan.nt * plan.nt)
    ty, tx = tile_id // plan.nt, tile_id % plan.nt
    listed = np.asarray(rasterize._overlaps(boxes[np.asarray(bi)], plan.ext, jnp.asarray(tx),
                                            jnp.asarray(ty)))
    ref = np.full((c, k), plan.f)
    for row in range(c):
      if j[row] < item_end[-1]:
        faces = np.flatnonzero(listed[row])[sub[row] * k:sub[row] * k + k]
        ref[row, :faces.size] = faces
    out.append((np.asarray(ids), ref, np.asarray(ok)))
  return out


@pytest.mark.parametrize("tile,k,faces", [(4, 32, 1280), (3, 5, 45), (8, 64, 70), (1, 1, 33)])
def test_bitmask_tile_lists_equal_face_scan(tile, k, faces):
  """The bitmask binning (per tile row and column) gives every work item exactly the faces, in
  the order, that scanning all F boxes gives; so no face is dropped, for any F (not only 32·W)."""
  if faces == 1280:
    fv = _sphere_scene(batch=2, size_scale=0.6)
    size, sigma, dist_eps = 64, 1e-4, 1e-10
  else:
    fv, _ = _random_scene(seed=12, batch=2, faces=faces)
    size, sigma, dist_eps = 14, 3e-3, 1e-3
  fv = jnp.asarray(fv, jnp.float32)
  _, _, cfg = rasterize._check_and_config(
      fv, None, image_size=size, sigma=sigma, gamma=1e-4, dist_eps=dist_eps, eps=1e-3, near=1.0,
      far=100.0, background=(0.0,) * 3, double_sided=True, aggr_alpha="prod", aggr_rgb="softmax",
      dist_func="euclidean", softras_grad=True, bg_double_eps=True,
      drop_alpha_grad_beyond_near_far=None, texel_eps=1e-5, return_aux=False)
  tiling = rasterize._Tiling(tile=tile, k=k, chunk=7 if k > 1 else 64)  # chunk edges in items
  plan = rasterize._Plan.build(fv, cfg, tiling)
  # Per-tile counts equal the face scan's.
  boxes = rasterize._face_boxes(fv, cfg)
  tiles = np.arange(plan.nt * plan.nt)
  scan_counts = np.stack([np.asarray(rasterize._overlaps(
      boxes[b][None], plan.ext, jnp.asarray(tiles % plan.nt), jnp.asarray(tiles // plan.nt))).sum(-1)
      for b in range(fv.shape[0])])
  np.testing.assert_array_equal(np.asarray(plan.counts).reshape(scan_counts.shape), scan_counts)
  listed = 0
  for ids, ref, ok in _scan_item_ids(fv, plan, cfg, tile, k):
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(ok, ref < plan.f)
    listed += int(np.sum(ok))
  assert listed == int(np.sum(scan_counts)) > 0


# ------------------------------------------------------------------------------------------------
# Gradients.


def _weights(shape, seed=5):
  return np.random.default_rng(seed).normal(size=shape)


def test_softras_grad_matches_analytic_backward():
  """softras_grad=True equals SoftRas's hand-written backward (kernel.cu:463-637) in float64.

  Non-degenerate faces only: where two edges of a collapsed face are equally near, the distance has
  no derivative and any subgradient is as right as another.
  """
  fv, tex = _random_scene(seed=6, batch=2, faces=10, texture_res=2, special=False)
  fv[:, 0] = [[-0.6, -0.5, 3.0], [0.7, -0.4, 3.5], [0.65, -0.35, 3.2]]     # very obtuse
  fv[:, 1] = [[-0.5, 0.2, 150.0], [0.0, 0.6, 150.0], [-0.2, -0.1, 140.0]]  # beyond far
  kw = dict(sigma=3e-3, gamma=3e-2, dist_eps=1e-3)
  g = _weights((2, 12, 12, 4))
  ref = _reference(fv, tex, 12, grads=g, **kw)
  with jax.enable_x64(True):
    for impl in ("dense", "tiled"):
      f = _jitted(image_size=12, impl=impl, tile_size=4, faces_per_item=3, **kw)
      d_fv, d_tex = jax.grad(lambda a, t: jnp.sum(f(a, t) * g), (0, 1))(jnp.asarray(fv),
                                                                           jnp.asarray(tex))
      scale = np.abs(ref["d_fv"]).max()
      np.testing.assert_allclose(d_fv, ref["d_fv"], rtol=0, atol=1e-9 * scale, err_msg=impl)
      np.testing.assert_allclose(d_tex, ref["d_tex"], rtol=0, atol=1e-10, err_msg=impl)
  assert np.abs(ref["d_fv"][..., :2]).max() > 1e-3 and np.abs(ref["d_fv"][..., 2]).max() > 1e-6


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_full_autodiff_check_grads(impl):
  """softras_grad=False is the true derivative: finite differences agree (float64)."""
  fv, tex = _random_scene(seed=7, batch=1, faces=5, texture_res=1, special=False)
  kw = dict(image_size=8, sigma=2e-2, gamma=5e-2, dist_eps=1e-10, softras_grad=False, impl=impl,
            tile_size=4, faces_per_item=2)
  g = _weights((1, 8, 8, 4))
  with jax.enable_x64(True):
    f = _jitted(**kw)
    loss = lambda a, t: jnp.sum(f(a, t) * g)
    check_grads(loss, (jnp.asarray(fv), jnp.asarray(tex)), order=1, modes=["rev"], eps=1e-6,
                atol=1e-5, rtol=1e-5)


def test_softras_grad_flag_changes_only_rgb_geometry_terms():
  fv, tex = _random_scene(seed=8, batch=1, faces=8, texture_res=1)
  kw = dict(image_size=10, impl="dense", **SOFT)  # tiled gradients: test_tiled_gradients_equal_dense
  with jax.enable_x64(True):
    fv64, tex64 = jnp.asarray(fv), jnp.asarray(tex)
    grads = {}
    for flag in (True, False):
      f = _jitted(softras_grad=flag, drop_alpha_grad_beyond_near_far=False, **kw)
      rgba, vjp = jax.vjp(lambda a: f(a, tex64), fv64)
      grads[flag, "alpha"], = vjp(rgba * jnp.asarray([0.0, 0.0, 0.0, 1.0]))
      grads[flag, "rgb"], = vjp(rgba * jnp.asarray([1.0, 1.0, 1.0, 0.0]))
  np.testing.assert_allclose(grads[True, "alpha"], grads[False, "alpha"], rtol=1e-12, atol=1e-12)
  assert np.max(np.abs(grads[True, "rgb"] - grads[False, "rgb"])) > 1e-3


def test_drop_alpha_grad_beyond_near_far():
  """A face beyond `far` shapes alpha; SoftRas's backward gives it no alpha gradient."""
  fv = np.array([[[[-0.5, -0.5, 200.0], [0.5, -0.5, 200.0], [0.0, 0.5, 200.0]]]])
  grads = {}
  for drop in (True, False):
    f = _jitted(image_size=8, drop_alpha_grad_beyond_near_far=drop, impl="dense", **SOFT)
    grads[drop] = jax.grad(lambda a: jnp.sum(f(a, None)[..., 3]))(jnp.asarray(fv, jnp.float32))
  assert float(jnp.max(f(jnp.asarray(fv, jnp.float32), None)[..., 3])) > 0.9
  np.testing.assert_array_equal(grads[True], 0.0)
  assert float(jnp.max(jnp.abs(grads[False]))) > 1e-2


@pytest.mark.parametrize("impl,softras_grad", [("dense", False), ("tiled", False), ("tiled", True)])
def test_gradients_finite_on_degenerate_inputs(impl, softras_grad):
  fv, tex = _random_scene(seed=9, batch=1, faces=12, texture_res=2)
  s = 8
  xs, ys = rasterize.pixel_centres(s, np.float64)
  fv[0, 7] = [[xs[2], ys[2], 3.0], [xs[5], ys[2], 3.0], [xs[3], ys[6], 3.0]]  # on pixel centres
  fv[0, 8] = [[0.1, 0.1, 0.0], [0.4, 0.1, 2.0], [0.1, 0.5, 2.0]]            # z = 0
  fv[0, 9] = [[-0.4, 0.1, -2.0], [0.0, 0.1, -2.0], [-0.2, 0.5, 3.0]]        # behind the camera
  fv[0, 10] = [[0.0, 0.0, 4.0], [0.0, 0.0, 4.0], [0.0, 0.0, 4.0]]           # a point
  fv[0, 11] = [[-0.7, -0.7, 3.0], [0.7, -0.7, 3.0], [0.0, 0.7, 3.0]]        # D == 1 at tiny σ
  fv32, tex32 = jnp.asarray(fv, jnp.float32), jnp.asarray(tex, jnp.float32)
  # σ = 1e-6: D == 1 in float32 a few pixels inside every face, yet edges through pixel centres.
  f = _jitted(image_size=s, sigma=1e-6, gamma=1e-4, dist_eps=1e-4, impl=impl, tile_size=4,
              faces_per_item=3, softras_grad=softras_grad, return_aux=True)

  def loss(a, t):
    rgba, aux = f(a, t)
    return jnp.sum(rgba * jnp.arange(1.0, 5.0)) + jnp.sum(aux["p2f"])

  value, (d_fv, d_tex) = jax.value_and_grad(loss, (0, 1))(fv32, tex32)
  assert np.isfinite(value)
  assert np.all(np.isfinite(d_fv)) and np.all(np.isfinite(d_tex))
  assert np.max(np.abs(d_fv[0, 7])) > 0 and np.max(np.abs(d_tex)) > 0


def test_tiled_gradients_equal_dense():
  fv, tex = _random_scene(seed=10, batch=2, faces=16, texture_res=2)
  g = _weights((2, 12, 12, 4))
  with jax.enable_x64(True):
    out = {}
    for impl in ("dense", "tiled"):
      f = _jitted(image_size=12, impl=impl, tile_size=4, faces_per_item=2, softras_grad=False,
                  **SOFT)
      out[impl] = jax.grad(lambda a, t: jnp.sum(f(a, t) * g), (0, 1))(jnp.asarray(fv),
                                                                        jnp.asarray(tex))
    for d, t in zip(out["dense"], out["tiled"]):
      np.testing.assert_allclose(t, d, rtol=1e-9, atol=1e-9)


HAND_VJP_OPTIONS = [
    dict(),
    dict(aggr_alpha="sum", double_sided=False, drop_alpha_grad_beyond_near_far=False),
    dict(aggr_alpha="hard", aggr_rgb="hard", near=3.0, far=7.0),
    dict(near=3.0, far=7.0, texture_res=1),
]


@pytest.mark.parametrize("options", HAND_VJP_OPTIONS, ids=["default", "sum-1side-nodrop",
                                                            "hard-nearfar", "nearfar-r1"])
def test_hand_vjp_equals_autodiff(options):
  """The tiled path's hand-written backward (softras_grad) equals autodiff of the dense path."""
  options = dict(options)
  fv, tex = _random_scene(seed=13, batch=2, faces=16, texture_res=options.pop("texture_res", 2),
                          special=False)
  g = _weights((2, 12, 12, 4), seed=14)
  kw = dict(SOFT, image_size=12, **options)
  with jax.enable_x64(True):
    out = {}
    for impl in ("dense", "tiled"):
      f = _jitted(impl=impl, tile_size=4, faces_per_item=3, **kw)
      out[impl] = jax.grad(lambda a, t: jnp.sum(f(a, t) * g), (0, 1))(jnp.asarray(fv),
                                                                        jnp.asarray(tex))
      alpha = _jitted(impl=impl, tile_size=4, faces_per_item=3, **kw)
      out[impl, "alpha"] = jax.grad(lambda a: jnp.sum(alpha(a, None) * g))(jnp.asarray(fv))
    for key in ((0,), (1,), ("alpha",)):
      d = out["dense"][key[0]] if key != ("alpha",) else out["dense", "alpha"]
      t = out["tiled"][key[0]] if key != ("alpha",) else out["tiled", "alpha"]
      scale = max(np.abs(d).max(), 1e-30)
      np.testing.assert_allclose(t, d, rtol=0, atol=1e-10 * scale, err_msg=str(key))
      if options.get("aggr_alpha") != "hard" or key == (1,):
        assert np.abs(d).max() > 0, key


@pytest.mark.parametrize("softras_grad", [True, False])
def test_texture_only_and_vertex_only_gradients(softras_grad):
  """With the vertices (or the textures) under stop_gradient, the backward skips their part and
  the other gradient is unchanged."""
  fv, tex = _random_scene(seed=15, batch=2, faces=12, texture_res=2, special=False)
  g = _weights((2, 12, 12, 4), seed=16)
  with jax.enable_x64(True):
    f = _jitted(image_size=12, tile_size=4, faces_per_item=4, softras_grad=softras_grad,
                return_aux=True, **SOFT)
    loss = lambda a, t: jnp.sum(f(a, t)[0] * g) + 0.0 * jnp.sum(f(a, t)[1]["p2f"])
    fv64, tex64 = jnp.asarray(fv), jnp.asarray(tex)
    d_fv, d_tex = jax.grad(loss, (0, 1))(fv64, tex64)
    only_tex = jax.grad(lambda t: loss(jax.lax.stop_gradient(fv64), t))(tex64)
    only_fv = jax.grad(lambda a: loss(a, jax.lax.stop_gradient(tex64)))(fv64)
  np.testing.assert_allclose(only_tex, d_tex, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(only_fv, d_fv, rtol=1e-12, atol=1e-14)
  assert np.abs(d_fv).max() > 0 and np.abs(d_tex).max() > 0


# ------------------------------------------------------------------------------------------------
# Aux outputs, API and memory.


def test_p2f_is_the_weighted_pixel_mean():
  """UMR's texture-cycle target: a face's soft-weighted mean pixel, not zero (even in 'hard' RGB mode).

  UMR's stage 2 reads it from the hard renderer (NVlabs/UMR nnutils/loss_utils.py, MultiTextureLoss),
  whose kernel fills it in softmax mode only, so there it is always zero.
  """
  fv = np.array([[[[0.2, 0.2, 3.0], [0.7, 0.2, 3.0], [0.45, 0.7, 3.0]]]])
  tex = np.ones((1, 1, 1, 3))
  rgba, aux = _render(jnp.asarray(fv, jnp.float32), jnp.asarray(tex, jnp.float32), image_size=16,
                      return_aux=True, aggr_rgb="hard", sigma=1e-4, impl="dense")
  centroid = fv[0, 0, :, :2].mean(0)
  np.testing.assert_allclose(aux["p2f"][0, 0], centroid, atol=0.03)
  assert float(aux["p2f_weight"][0, 0]) > 1
  visible = np.unique(np.asarray(aux["face_index"]))
  np.testing.assert_array_equal(visible, [-1, 0])


def test_api_validation_and_alpha_only():
  fv, tex = _random_scene(seed=11, batch=1, faces=8, texture_res=1)
  fv32 = jnp.asarray(fv, jnp.float32)
  rgba = _render(fv32, None, image_size=8, background=(0.1, 0.2, 0.3), **SOFT)
  np.testing.assert_allclose(rgba[..., :3], np.broadcast_to([0.1, 0.2, 0.3], (1, 8, 8, 3)),
                             atol=1e-7)
  with_tex = _render(fv32, jnp.asarray(tex, jnp.float32), image_size=8, **SOFT)
  np.testing.assert_allclose(rgba[..., 3], with_tex[..., 3], atol=1e-7)
  with pytest.raises(ValueError):
    soft_rasterize(fv32[0], None, image_size=8)
  with pytest.raises(ValueError):
    soft_rasterize(fv32, jnp.zeros((1, 8, 5, 3)), image_size=8)
  with pytest.raises(ValueError):
    soft_rasterize(fv32, None, image_size=8, aggr_rgb="max")
  with pytest.raises(ValueError):
    soft_rasterize(fv32, None, image_size=8, near=0.0)


@pytest.mark.slow
def test_tiled_memory_is_bounded():
  """At 64 px, B = 4, F = 1280 the tiled forward+backward needs < 1/50 of dense's temporaries."""
  fv = jnp.asarray(_sphere_scene(batch=4), jnp.float32)
  mem = {}
  for impl in ("dense", "tiled"):
    f = jax.jit(jax.grad(lambda a, impl=impl: jnp.sum(
        soft_rasterize(a, None, image_size=64, sigma=1e-4, dist_eps=1e-10, impl=impl)[..., 3])))
    mem[impl] = f.lower(fv).compile().memory_analysis().temp_size_in_bytes
  assert mem["tiled"] < 64 * 2**20
  assert mem["tiled"] * 50 < mem["dense"]
