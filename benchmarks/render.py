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

The table is printed and appended to BENCHMARKS.md with the command line and the date.
"""

from __future__ import annotations

import argparse
import datetime
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


def make_scene(batch: int, seed: int = 0, texture_res: int = 6):
  """Training-like face vertices (B, 1280, 3, 3), textures (B, 1280, R*R, 3) and target masks."""
  rng = np.random.default_rng(seed)
  sphere = mesh.symmetric_sphere()
  v = np.asarray(sphere.vertices)
  out = []
  for _ in range(batch):
    stretch = rng.uniform(0.7, 1.3, 3) * 0.45
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
  args = p.parse_args(argv)

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
