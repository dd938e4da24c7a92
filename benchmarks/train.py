r"""Train-step benchmark: steps/s and peak memory of `train.make_train_step`, and where the time goes.

  python benchmarks/train.py [--config configs/synthetic.py] [--repeats 5] [--no-append] [--config.x=y ...]

Measures, on the devices JAX sees (one CPU device unless XLA_FLAGS says otherwise), with a real
batch from the synthetic generator (`batch_size` examples at the config's image size):

* the full compiled step and variants with one feature switched off (variance lookahead, GAN, the
  variance branch) — the difference is what that feature costs;
* the step's parts compiled alone at the step's shapes, forward + backward: the networks (encoder and
  all decoders), the renderer (every soft-rasterizer call the step makes: B·H silhouettes, the
  texture render with aux, the novel view, the lookahead's colour pass) and the sampler (UV flow →
  per-face flow, image → colours with the variance branch). Their shares are of the full step; the
  rest (losses, discriminator, optimizers, glue) is the remainder.

Times are medians of `--repeats` runs after compilation. Memory: XLA's temp + argument bytes of the
compiled step (`memory_analysis`) and the process's peak RSS. Prints a Markdown table and appends it,
with the command and the date, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxrecon import components, ops, train  # pylint: disable=g-import-not-at-top
from jaxrecon.data import synthetic  # pylint: disable=g-import-not-at-top
from jaxrecon.geometry import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from jaxrecon.models import reconstructor  # pylint: disable=g-import-not-at-top


def load_config(path: str, overrides: list[str]):
  """The config file with `--config.x=y` overrides, parsed as `jaxrecon.main` does."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", path)
  argv = ["benchmark", f"--config={path}", *overrides]
  sys.argv = argv          # ml_collections reads the overrides from sys.argv
  flags.FLAGS(argv)
  return flags.FLAGS.config


def median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))           # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def make_batch(config):
  settings = synthetic.RenderSettings(image_size=config.data.image_size)
  examples = synthetic.make_examples(1, "train", range(config.batch_size), settings)
  stack = lambda k: np.stack([e[k] for e in examples]).astype(np.float32) / 255.0
  batch = {"image": stack("image"), "mask": stack("mask")}
  batch["barrier"] = np.stack([components.AddBarrier().map({"mask": m})["barrier"] for m in batch["mask"]])
  return {k: jnp.asarray(v) for k, v in batch.items()}


def step_time(config, batch, repeats):
  """Median seconds of the compiled full step, and its XLA memory in bytes."""
  sphere = mesh_lib.symmetric_sphere(config.mesh.subdivisions)
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx, disc_tx = optax.adam(1e-4), optax.adam(1e-4)
  s = config.data.image_size
  state = train.create_state(config, model, disc, tx, disc_tx, (1, s, s, 3))
  step, _ = train.make_train_step(config, model, disc, sphere, tx, disc_tx)
  compiled = jax.jit(step).lower(state, batch).compile()
  memory = compiled.memory_analysis()
  nbytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes if memory is not None else 0
  return median_time(compiled, (state, batch), repeats), nbytes, (model, sphere, state)


def component_times(config, batch, model, sphere, state, repeats):
  """Forward + backward of the step's networks, renderer calls and sampler calls, each alone."""
  b, s = batch["image"].shape[:2]
  h = config.model.num_hypotheses
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  pred = model.apply(variables, batch["image"], train=False)

  def networks(params, image):
    out, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, image, train=True,
                         mutable=["batch_stats"])
    leaves = [x for x in jax.tree.leaves(out) if x is not None]
    return sum(jnp.sum(jnp.sin(x)) for x in leaves)

  rasterize = components.make_rasterizer(config)
  faces = sphere.faces
  screen = components.make_screen_faces(config, faces)
  t = config.mesh.texels_per_edge
  colours = jnp.full((b, faces.shape[0], t * t, 3), 0.5)
  use_lookahead = config.variance.mode == "adaptive" and config.loss_weights.variance_lookahead > 0

  def renderer(vertices, cams, colours):
    all_faces = screen(jnp.repeat(vertices, h, 0), cams.reshape(b * h, 7))
    total = jnp.sum(jnp.sin(rasterize(all_faces, None)))
    best = screen(vertices, cams[:, 0])
    rgba, aux = rasterize(best, colours, return_aux=True)
    total += jnp.sum(jnp.sin(rgba)) + jnp.sum(jnp.sin(aux["p2f"]))
    if config.loss_weights.gan > 0:
      total += jnp.sum(jnp.sin(rasterize(screen(vertices, cams[:, 1 % h]), colours)))
    if use_lookahead:   # the colour pass: one silhouette and one texture render
      total += jnp.sum(jnp.sin(rasterize(best, None))) + jnp.sum(jnp.sin(rasterize(best, colours)))
    return total

  uv_sampler = jnp.asarray(sphere.uv_sampler(t, config.mesh.symmetric_uv))

  def sampler(uv_flow, variance, image):
    flow = ops.grid_sample(uv_flow, jnp.broadcast_to(uv_sampler, (b,) + uv_sampler.shape), align_corners=True)
    if config.variance.mode == "none":
      col = ops.grid_sample(image, flow, align_corners=True)
    else:
      col = ops.variance_grid_sample(image, flow, variance, mode=config.variance.mode,
                                     combine=config.variance.combine, align_corners=True)
    return jnp.sum(jnp.sin(col)) + jnp.sum(jnp.sin(flow))

  variance = pred.variance if pred.variance is not None else jnp.ones((b, s, s, 1))
  cams = pred.cam_hypotheses
  return {
      "networks": median_time(jax.jit(jax.grad(networks)), (state.params, batch["image"]), repeats),
      "renderer": median_time(jax.jit(jax.grad(renderer, argnums=(0, 1, 2))),
                              (pred.vertices, cams, colours), repeats),
      "sampler": median_time(jax.jit(jax.grad(sampler, argnums=(0, 1))),
                             (pred.uv_flow, variance, batch["image"]), repeats),
  }


def variant(config, **changes):
  c = config.copy_and_resolve_references()
  for path, value in changes.items():
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no-append", action="store_true")
  args, overrides = parser.parse_known_args()     # the rest: --config.x=y overrides
  args.overrides = overrides
  config = load_config(args.config, args.overrides)
  batch = make_batch(config)

  rows = []
  full, nbytes, (model, sphere, state) = step_time(config, batch, args.repeats)
  rows.append(("full step", full, nbytes))
  variants = {
      "without the variance lookahead": {"loss_weights.variance_lookahead": 0.0},
      "without the variance branch (UMR)": {"variance.mode": "none", "loss_weights.variance_lookahead": 0.0},
  }
  if config.loss_weights.gan > 0:
    variants["without the GAN"] = {"loss_weights.gan": 0.0}
  else:
    variants["with the GAN (weight 0.1)"] = {"loss_weights.gan": 0.1}
  for name, changes in variants.items():
    t, m, _ = step_time(variant(config, **changes), batch, args.repeats)
    rows.append((name, t, m))
  parts = component_times(config, batch, model, sphere, state, args.repeats)

  b, s, h = config.batch_size, config.data.image_size, config.model.num_hypotheses
  lines = [(f"Train step, `{args.config}` {' '.join(args.overrides)} (B={b}, {s}x{s}, H={h}, variance "
            f"{config.variance.mode}/{config.variance.combine}, lookahead {config.loss_weights.variance_lookahead}, "
            f"gan {config.loss_weights.gan}); {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"median of {args.repeats}"),
           "",
           "| step | time (s) | steps/s | images/s | XLA memory (MiB) |",
           "|---|---|---|---|---|"]
  for name, t, m in rows:
    lines.append(f"| {name} | {t:.3f} | {1 / t:.2f} | {b / t:.1f} | {m / 2**20:.0f} |")
  lines += ["", "| part of the full step (fwd+bwd, compiled alone) | time (s) | share |", "|---|---|---|"]
  for name, t in parts.items():
    lines.append(f"| {name} | {t:.3f} | {t / full:.0%} |")
  rest = full - sum(parts.values())
  lines.append(f"| rest (losses, discriminator, optimizers, glue) | {rest:.3f} | {rest / full:.0%} |")
  lines.append(f"\nPeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.")
  table = "\n".join(lines)
  print(table)
  if not args.no_append:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
    with open(path, "a") as f:
      f.write(f"\n## Train step ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores)\n\n`python benchmarks/train.py --config {args.config} "
              f"{' '.join(args.overrides)}`\n\n{table}\n")


if __name__ == "__main__":
  main()
