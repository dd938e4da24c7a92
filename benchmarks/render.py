"""Benchmark of `jaxrecon.render.soft_rasterize`: dense vs tiled, forward+backward, time and memory.

Scenes: the 1280-face symmetric sphere from `jaxrecon.geometry.mesh`, randomly stretched, bumped and
rotated, placed as in training (weak perspective: x, y within about ±0.6, depth 5 ± 0.5).
Losses: a soft IoU loss on alpha (alpha-only render) and an L1 loss on RGB with R = 6 surface
textures (UMR's texture resolution). Timing: median of `--repeats` runs of a jitted
value_and_grad w.r.t. the face vertices (and textures for RGB), after one warm-up call.
Memory: XLA's `memory_analysis()` of the compiled function (temporaries + arguments + outputs);
the dense path is only executed when that estimate is below `--dense-max-gb`.

  python benchmarks/render.py                       # the full table (a few minutes on 2 cores)
  python benchmarks/render.py --sizes 64 --batches 8 --no-append
  python benchmarks/render.py --training            # only the 128 x 256² silhouette call
  python benchmarks/render.py --workload --repeats 9  # the train step's three calls at 64 px
  python benchmarks/render.py --workload --compare /tmp/old_rasterize.py   # A/B vs another file

The table is printed and appended to BENCHMARKS.md with the command line and the date.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import pathlib
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecon.geometry import mesh
from jaxrecon.render import rasterize

_REPO = pathlib.Path(__file__).resolve().parents[1]


def make_scene(batch: int, seed: int = 0, texture_res: int = 6, scale: float = 1.0):
  """Training-like face vertices (B, 1280, 3, 3) and textures (B, 1280, R*R, 3).

  `scale` multiplies the object's size: 1 gives a mean radius of 0.45 (about 16% of the image
  covered), 1.5 about 35% (birds late in training fill 30-50% of the image).
  """
  rng = np.random.default_rng(seed)
  sphere = mesh.symmetric_sphere()
  v = np.asarray(sphere.vertices)
  out = []
  for _ in range(batch):
    stretch = rng.uniform(0.7, 1.3, 3) * 0.45 * scale
    bump = 1.0 + 0.08 * np.sin(3 * v @ rng.normal(size=3))[:, None]
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    w = (v * stretch * bump) @ q.T
    xy = w[:, :2] + rng.uniform(-0.1, 0.1, 2)
    z = 5.0 + w[:, 2] + rng.uniform(-0.3, 0.3)
    out.append(np.concatenate([xy, z[:, None]], axis=1))
  verts = np.stack(out).astype(np.float32)
  fv = verts[:, sphere.faces]
  tex = rng.uniform(0, 1, (batch, sphere.num_faces, texture_res**2, 3)).astype(np.float32)
  return fv, tex


def target_masks(batch: int, size: int, seed: int = 1):
  """Ellipse masks (B, S, S) roughly matching the objects."""
  rng = np.random.default_rng(seed)
  xs, ys = rasterize.pixel_centres(size, np.float64)
  x, y = np.meshgrid(xs, ys)
  masks = []
  for _ in range(batch):
    a, b = rng.uniform(0.35, 0.55, 2)
    masks.append(((x / a) ** 2 + (y / b) ** 2 <= 1).astype(np.float32))
  return np.stack(masks)


def pair_counts(fv, size: int, sigma: float, dist_eps: float):
  """(all, in-bbox, kept) pixel-face pair counts, in NumPy over each face's bbox window."""
  fv = np.asarray(fv, np.float64)
  b, f = fv.shape[:2]
  thr = rasterize.threshold(sigma, dist_eps)
  m = math.sqrt(thr)
  xs, ys = rasterize.pixel_centres(size, np.float64)
  inbox = kept = 0
  for bi in range(b):
    for fi in range(f):
      p = fv[bi, fi, :, :2]
      cols = np.flatnonzero((xs >= p[:, 0].min() - m) & (xs <= p[:, 0].max() + m))
      rows = np.flatnonzero((ys >= p[:, 1].min() - m) & (ys <= p[:, 1].max() + m))
      if not len(cols) or not len(rows):
        continue
      inbox += len(cols) * len(rows)
      px, py = np.meshgrid(xs[cols], ys[rows])
      px, py = px.ravel(), py.ravel()
      d2 = np.full(px.shape, np.inf)
      for k in range(3):
        a, e = p[k], p[(k + 1) % 3] - p[k]
        t = np.clip(((px - a[0]) * e[0] + (py - a[1]) * e[1]) / max(e @ e, 1e-30), 0, 1)
        d2 = np.minimum(d2, (a[0] + t * e[0] - px) ** 2 + (a[1] + t * e[1] - py) ** 2)
      e1, e2 = p[1] - p[0], p[2] - p[0]
      det = e1[0] * e2[1] - e1[1] * e2[0]
      w1 = ((px - p[0, 0]) * e2[1] - (py - p[0, 1]) * e2[0]) / det
      w2 = (e1[0] * (py - p[0, 1]) - e1[1] * (px - p[0, 0])) / det
      inside = (w1 > 0) & (w2 > 0) & (w1 + w2 < 1)
      kept += int(np.sum(inside | (d2 < thr)))
  return b * size * size * f, inbox, kept


def build(kind: str, impl: str, size: int, args):
  """A jitted value_and_grad of the loss, as a function of the inputs."""
  kw = dict(image_size=size, sigma=args.sigma, gamma=args.gamma, dist_eps=args.dist_eps,
            impl=impl, tile_size=args.tile, faces_per_item=args.k,
            pairs_per_step=args.pairs_per_step)
  if kind == "iou":
    def loss(fv, target):
      alpha = rasterize.soft_rasterize(fv, None, **kw)[..., 3]
      inter = jnp.sum(alpha * target, axis=(1, 2))
      union = jnp.sum(alpha + target - alpha * target, axis=(1, 2))
      return jnp.mean(1.0 - inter / (union + 1e-6))
    return jax.jit(jax.value_and_grad(loss))

  def loss(fv, tex, target):
    rgb = rasterize.soft_rasterize(fv, tex, **kw)[..., :3]
    return jnp.mean(jnp.abs(rgb - target[..., None] * 0.5))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def memory_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def time_it(fn, inputs, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of `repeats` timed calls) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*inputs))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def run_row(kind, batch, size, args, fv, tex, target, per_pair):
  """Time and memory of one (loss, B, S) for both paths.

  Dense is compiled at the full batch for its memory estimate; if that is over `--dense-max-gb` it
  is timed at the largest batch B' = B/2^n that fits and scaled by B/B' (its cost is exactly linear
  in B); if not even B' = 1 fits, its time is extrapolated from the measured cost per pair at a
  smaller image (`per_pair`), and the table says so.
  """
  inputs = (fv, target) if kind == "iou" else (fv, tex, target)
  row = {"loss": "IoU (alpha)" if kind == "iou" else "RGB L1 (R=6)", "B": batch, "S": size}
  for impl in ("dense", "tiled"):
    if impl == "dense" and args.no_dense:
      row[impl] = None
      continue
    fn = build(kind, impl, size, args)
    mem = memory_bytes(fn.lower(*inputs).compile())
    entry = {"mem": mem, "note": ""}
    sub = batch
    while impl == "dense" and sub > 1 and mem * sub / batch > args.dense_max_gb * 2**30:
      sub //= 2
    if impl == "tiled" or mem * sub / batch <= args.dense_max_gb * 2**30:
      sub_inputs = tuple(a[:sub] for a in inputs)
      compiled = fn.lower(*sub_inputs).compile() if sub != batch else fn.lower(*inputs).compile()
      first, med = time_it(compiled, sub_inputs, args.repeats)
      entry["time"] = med * batch / sub
      if sub != batch:
        entry["note"] = f" (B'={sub}, ×{batch // sub})"
      if impl == "dense":
        per_pair[kind] = entry["time"] / (batch * size * size * fv.shape[1])
    elif kind in per_pair:
      entry["time"] = per_pair[kind] * batch * size * size * fv.shape[1]
      entry["note"] = " (extrapolated: per-pair cost at a smaller S)"
    else:
      entry["time"] = float("nan")
      entry["note"] = " (not run)"
    row[impl] = entry
    print(f"  {row['loss']} B={batch} S={size} {impl}: mem {gib(mem)}, "
          f"{entry['time'] * 1e3:.0f} ms{entry['note']}", file=sys.stderr, flush=True)
  return row


def counts_row(fv, size, args):
  tile = args.tile or rasterize.default_tile_size(size)
  counts = np.asarray(rasterize.tile_face_counts(
      fv, image_size=size, sigma=args.sigma, dist_eps=args.dist_eps, tile_size=tile))
  items = int(np.sum(-(-counts // args.k)))
  total, inbox, kept = pair_counts(fv, size, args.sigma, args.dist_eps)
  return {"all": total, "inbox": inbox, "kept": kept, "slots": items * tile**2 * args.k,
          "tile": tile, "kmax": int(counts.max()),
          "kmean": float(counts.mean()), "items": items}


def fmt_count(n):
  if n >= 1e9:
    return f"{n / 1e9:.2f}G"
  return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def table(rows, counts):
  lines = ["| loss | B | S | dense fwd+bwd | dense mem | tiled fwd+bwd | tiled mem | speed-up | "
           "mem ratio | pairs all / in-bbox / kept | slots evaluated (T: items; faces/tile max, mean) | "
           "floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d, t = r["dense"], r["tiled"]
    c = counts[(r["B"], r["S"])]
    if d is None:
      dt, dm, sp, mr = "skipped", "–", "–", "–"
    else:
      dm = gib(d["mem"])
      mr = f"1/{d['mem'] / t['mem']:.0f}"
      dt = f"{d['time'] * 1e3:.0f} ms{d['note']}"
      sp = f"{d['time'] / t['time']:.0f}x" + ("*" if d["note"] else "")
    floor = t["time"] * c["kept"] / c["slots"]
    lines.append(
        f"| {r['loss']} | {r['B']} | {r['S']} | {dt} | {dm} | {t['time'] * 1e3:.0f} ms | "
        f"{gib(t['mem'])} | {sp} | {mr} | {fmt_count(c['all'])} / {fmt_count(c['inbox'])} / "
        f"{fmt_count(c['kept'])} | {fmt_count(c['slots'])} (T={c['tile']}: {c['items']}; {c['kmax']}, "
        f"{c['kmean']:.0f}) | {floor * 1e3:.0f} ms |")
  return "\n".join(lines)


def training_call(args):
  """128 silhouettes at 256² (B=16 × 8 hypotheses), F = 1280: IoU loss forward+backward."""
  fv, _ = make_scene(128, seed=3)
  target = target_masks(128, 256)
  fn = build("iou", "tiled", 256, args)
  t0 = time.perf_counter()
  compiled = fn.lower(fv, target).compile()
  compile_s = time.perf_counter() - t0
  mem = memory_bytes(compiled)
  first, med = time_it(compiled, (fv, target), max(1, args.repeats // 2))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return (f"Training-size call (IoU loss, 128 × 256², F = 1280, tiled): fwd+bwd median "
          f"{med:.2f} s (first run {first:.1f} s; compile {compile_s:.1f} s, possibly from the "
          f"persistent cache), XLA memory {gib(mem)} (target ≤ 8 GiB), process peak RSS "
          f"{gib(rss)} (includes everything run before it in this process).")


# ------------------------------------------------------------------------------------------------
# The training workload: the three renderer calls of one train step (configs/synthetic.py).

WORKLOAD_SETTINGS = dict(image_size=64, sigma=1e-4, gamma=1e-4, dist_eps=1e-10)


def load_module(path: str):
  """A rasterize module loaded from a file (e.g. the HEAD version, for an A/B comparison)."""
  import importlib.util
  name = f"rasterize_{abs(hash(path))}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def workload_fns(module, kw):
  """The train step's three renderer calls as jitted functions of (fv64, fv16, colours, ...).

  1. `sil`: alpha-only silhouettes of B = 64 meshes (16 images × 4 camera hypotheses), soft IoU
     loss, forward + backward w.r.t. the vertices.
  2. `tex`: RGB render with return_aux of B = 16 meshes, masked L1, backward w.r.t. the colours
     only (vertices stop-gradient); p2f and face_index are outputs (the texture-cycle loss).
  3. `lookahead`: the colour gradient of the variance lookahead: an alpha-only render (forward
     only) and the RGB render with aux, forward + backward w.r.t. the colours.
  """
  render = functools.partial(module.soft_rasterize, **kw)

  def iou(fv, target):
    alpha = render(fv, None)[..., 3]
    inter = jnp.sum(alpha * target, axis=(1, 2))
    union = jnp.sum(alpha + target - alpha * target, axis=(1, 2))
    return jnp.mean(1.0 - inter / (union + 1e-6))

  def texture_l1(fv, colours, sil, image, mask):
    rgba, aux = render(jax.lax.stop_gradient(fv), colours, return_aux=True)
    loss = jnp.mean(jnp.abs(rgba[..., :3] * sil - image * mask), axis=(1, 2, 3))
    return loss, aux

  def tex(fv, colours, sil, image, mask):
    (loss, aux), grad = jax.value_and_grad(
        lambda c: (lambda l, a: (jnp.sum(l), a))(*texture_l1(fv, c, sil, image, mask)),
        has_aux=True)(colours)
    return loss, grad, aux["p2f"], aux["face_index"]

  def lookahead(fv, colours, image, mask):
    sil = render(fv, None)[..., 3:]
    return jax.grad(lambda c: jnp.sum(texture_l1(fv, c, sil, image, mask)[0]))(colours)

  return {"sil": jax.jit(jax.value_and_grad(iou)), "tex": jax.jit(tex),
          "lookahead": jax.jit(lookahead)}


def workload_inputs(scale: float, seed: int = 7):
  """Inputs of the three calls: 64 silhouette meshes, 16 textured meshes with R = 6 colours."""
  s = WORKLOAD_SETTINGS["image_size"]
  fv64, _ = make_scene(64, seed=seed, scale=scale)
  fv16, colours = make_scene(16, seed=seed + 1, scale=scale)
  target = target_masks(64, s)
  rng = np.random.default_rng(seed + 2)
  image = rng.uniform(0, 1, (16, s, s, 3)).astype(np.float32)
  mask = target_masks(16, s, seed=seed + 3)[..., None]
  sil = mask  # a stand-in for the best hypothesis's silhouette (stop-gradient in training)
  return {"sil": (fv64, target), "tex": (fv16, colours, sil, image, mask),
          "lookahead": (fv16, colours, image, mask)}


def workload(args):
  """Time the three calls (median of interleaved repeats) for each variant and scene scale."""
  variants = {"current": rasterize}
  if args.compare:
    variants = {f"A: {args.compare}": load_module(args.compare), "B: current": rasterize}
  kw = dict(WORKLOAD_SETTINGS, faces_per_item=args.k, pairs_per_step=args.pairs_per_step)
  if args.tile:
    kw["tile_size"] = args.tile
  lines = ["| scene scale | variant | sil B=64 fwd+bwd | tex B=16 fwd+bwd | lookahead B=16 | total "
           "| XLA memory (sil / tex / lookahead) |", "|---|---|---|---|---|---|---|"]
  for scale in args.scales:
    inputs = workload_inputs(scale)
    fv = inputs["sil"][0]
    counts = np.asarray(rasterize.tile_face_counts(
        fv, image_size=64, sigma=kw["sigma"], dist_eps=kw["dist_eps"], tile_size=args.tile))
    print(f"scale {scale}: faces per tile mean {counts.mean():.1f} (non-empty tiles "
          f"{counts[counts > 0].mean():.1f}), max {counts.max()}, "
          f"{np.mean(counts > 0):.0%} of tiles listing a face", file=sys.stderr, flush=True)
    compiled, mem, times = {}, {}, {}
    for name, module in variants.items():
      for call, fn in workload_fns(module, kw).items():
        c = fn.lower(*inputs[call]).compile()
        compiled[name, call] = c
        mem[name, call] = memory_bytes(c)
        jax.block_until_ready(c(*inputs[call]))  # warm-up
        times[name, call] = []
    for _ in range(args.repeats):  # interleaved: the variants see the same machine load
      for (name, call), c in compiled.items():
        t0 = time.perf_counter()
        jax.block_until_ready(c(*inputs[call]))
        times[name, call].append(time.perf_counter() - t0)
    for name in variants:
      med = {call: float(np.median(times[name, call])) for call in ("sil", "tex", "lookahead")}
      lines.append(
          f"| {scale:g} | {name} | " + " | ".join(f"{med[c] * 1e3:.0f} ms" for c in med)
          + f" | {sum(med.values()) * 1e3:.0f} ms | "
          + " / ".join(gib(mem[name, c]) for c in med) + " |")
    print("\n".join(lines[-len(variants):]), file=sys.stderr, flush=True)
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--batches", type=int, nargs="+", default=[8, 16])
  p.add_argument("--losses", nargs="+", default=["iou", "rgb"], choices=["iou", "rgb"])
  p.add_argument("--sigma", type=float, default=1e-5)
  p.add_argument("--gamma", type=float, default=1e-4)
  p.add_argument("--dist-eps", type=float, default=1e-10, help="UMR's training value")
  p.add_argument("--tile", type=int, default=None, help="default: the library's (4 to 128 px, then 8)")
  p.add_argument("--k", type=int, default=32, help="faces per work item")
  p.add_argument("--pairs-per-step", type=int, default=1 << 16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dense-max-gb", type=float, default=4.0,
                 help="run the dense path only if XLA's memory estimate is below this")
  p.add_argument("--no-dense", action="store_true")
  p.add_argument("--training", action="store_true", help="also run the 128 x 256² call")
  p.add_argument("--training-only", action="store_true")
  p.add_argument("--no-append", action="store_true", help="print only, do not touch BENCHMARKS.md")
  p.add_argument("--workload", action="store_true",
                 help="time the train step's three renderer calls at 64 px (σ = γ = 1e-4, "
                      "dist_eps = 1e-10) and exit; prints only")
  p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5],
                 help="--workload: object size factors (1: ~16%% of the image, 1.5: ~35%%)")
  p.add_argument("--compare", default=None,
                 help="--workload: also time the rasterize module in this file (A/B, interleaved)")
  args = p.parse_args(argv)
  if args.workload:
    print(workload(args))
    return

  rows, counts, per_pair = [], {}, {}
  if not args.training_only:
    for batch in args.batches:
      fv, tex = make_scene(batch)
      for size in args.sizes:
        target = target_masks(batch, size)
        counts[(batch, size)] = counts_row(fv, size, args)
        for kind in args.losses:
          rows.append(run_row(kind, batch, size, args, fv, tex, target, per_pair))
  text = []
  if rows:
    text.append(table(rows, counts))
  if args.training or args.training_only:
    text.append(training_call(args))
  body = "\n\n".join(text)
  print(body)
  if not args.no_append:
    cmd = "python benchmarks/render.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"\n## Soft rasterizer (`benchmarks/render.py`), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
              f"Command: `{cmd.strip()}`  \n"
              f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
              f"({jax.devices()[0].platform}); σ = {args.sigma:g}, γ = {args.gamma:g}, "
              f"dist_eps = {args.dist_eps:g}, T = {args.tile or 'default'}, K = {args.k}, "
              f"pairs/step = {args.pairs_per_step}, "
              f"median of {args.repeats}.\n"
              "Memory = XLA `memory_analysis()` (temp + arguments + outputs) of the jitted "
              "value_and_grad (dense: at the full B, compiled but not necessarily run). "
              "Dense times marked (B'=…) ran on a slice of the batch and were scaled; "
              "'extrapolated' ones use the measured dense cost per pair at a smaller S (speed-ups "
              "marked *). Floor = tiled time × kept pairs / evaluated slots (the time if only kept "
              "pairs cost anything).\n\n")
    with open(_REPO / "BENCHMARKS.md", "a", encoding="utf-8") as fh:
      fh.write(header + body + "\n")


if __name__ == "__main__":
  main()
