r"""Per-step communication of data-parallel training: what the compiled train step all-reduces.

  python benchmarks/communication.py [--configs configs/synthetic.py configs/cub.py] [--devices 4]
      [--reductions xla ordered]

For each config, compiles `train.make_train_step` exactly as `train.train_and_evaluate` jits it
(state replicated, batch sharded over a ('data',) mesh of `--devices` emulated CPU devices, one
example per device: the volume does not depend on the per-device batch), then reads the
partitioned HLO (`jit(...).lower(...).compile().as_text()`) and sums the operand sizes of every
cross-device collective. It compares the total with what data parallelism must exchange: the
gradients of the network and of the discriminator (the size of their parameters) plus the
per-channel BatchNorm statistics. Prints a Markdown table.

Per-device traffic at the measured N devices (last column): a ring all-reduce of V bytes sends
2·(N−1)/N·V, an all-gather or all-to-all whose result is V bytes (N−1)/N·V. `--reductions` compiles
each config under each `config.reduction` ('xla': XLA's all-reduces; 'ordered': the per-device step
whose sums are gathers / all-to-alls plus additions in device order).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_OP = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[(?P<dims>[0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def collective_bytes(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{op: (count, bytes)} of the collectives in an HLO module's text (result shapes; an async
  `*-start` is counted once, its `*-done` not at all)."""
  totals = collections.defaultdict(lambda: [0, 0])
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    size = 0
    shape = match.group("shape")
    if match.group("op") != "all-reduce" and shape.startswith("("):
      shape = shape.split("),")[0]          # async starts return (operands, results, ...): count once
    for array in _ARRAY.finditer(shape):
      dims = [int(d) for d in array.group("dims").split(",") if d]
      n = 1
      for d in dims:
        n *= d
      size += n * _BYTES[array.group("dtype")]
    totals[match.group("op")][0] += 1
    totals[match.group("op")][1] += size
  return {k: tuple(v) for k, v in totals.items()}


def tree_bytes(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


_TRAFFIC = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
            "all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: n - 1,
            "collective-permute": lambda n: 1.0}


def traffic(ops: dict, devices: int) -> float:
  """Bytes one device sends per step (see the module docstring)."""
  return sum(_TRAFFIC[op](devices) * size for op, (_, size) in ops.items())


def measure(config_path: str, devices: int, reduction: str = "xla") -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxrecon import components, distributed, train  # pylint: disable=g-import-not-at-top
  from jaxrecon.models import reconstructor  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("bench_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.batch_size = devices
  config.reduction = reduction
  if not config.model.get("template_dir"):
    # The semantic terms need a stage-1 template folder; they add no parameters, so without one the
    # gradient volume is the same with them off.
    config.loss_weights.part_probability = config.loss_weights.part_chamfer = 0.0
  sphere = components.sphere_for(config)
  model = components.make_model(config, sphere)
  disc = reconstructor.Discriminator(config.model.disc_channels, config.model.disc_layers)
  tx, disc_tx = optax.adam(1e-4), optax.adam(1e-4)
  s = config.data.image_size
  state = jax.eval_shape(lambda: train.create_state(config, model, disc, tx, disc_tx, (1, s, s, 3)))
  frozen = jax.eval_shape(lambda: train.load_frozen_networks(config))
  b = config.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
           "mask": jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32),
           "barrier": jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32)}
  if train.part_setup(config, sphere) is not None:
    batch["parts"] = jax.ShapeDtypeStruct((b, s, s, 5), jnp.float32)
  mesh = distributed.data_mesh(jax.devices()[:devices])
  jitted = train.jit_train_step(config, model, disc, sphere, tx, disc_tx, mesh)
  start = time.time()
  compiled = jitted.lower(state, batch, frozen).compile()
  seconds = time.time() - start
  hlo = compiled.as_text()
  ops = collective_bytes(hlo)
  return {
      "config": os.path.basename(config_path), "reduction": reduction, "image_size": s, "devices": devices,
      "params": tree_bytes(state.params), "disc_params": tree_bytes(state.disc_params),
      "batch_stats": tree_bytes(state.batch_stats), "ops": ops, "compile_s": seconds,
      "gan": config.loss_weights.gan > 0, "largest": largest_collectives(hlo),
  }


def largest_collectives(hlo_text: str, count: int = 8) -> list[tuple[int, str]]:
  """The `count` largest collectives of an HLO module: [(bytes, 'op shape'), ...], largest first."""
  found = []
  for line in hlo_text.splitlines():
    if _OP.search(line):
      size = sum(collective_bytes(line).get(op, (0, 0))[1] for op in _COLLECTIVES)
      match = _OP.search(line)
      found.append((size, f"{match.group('op')} {match.group('shape')[:120]}"))
  return sorted(found, reverse=True)[:count]


def _mb(n: float) -> str:
  return f"{n / 2**20:.2f}"


def table(rows: list[dict]) -> str:
  lines = [
      "| config | reduction | image | params (MiB) | disc params (MiB) | BN stats (MiB) | all-reduce ops "
      "| all-reduced (MiB) | gathered + all-to-all (MiB) | all collectives / (params + disc) "
      "| sent per device per step (MiB) |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    count, reduced = r["ops"].get("all-reduce", (0, 0))
    other = sum(v[1] for k, v in r["ops"].items() if k != "all-reduce")
    expected = r["params"] + (r["disc_params"] if r["gan"] else 0)
    lines.append(
        f"| {r['config']} | {r['reduction']} | {r['image_size']} | {_mb(r['params'])} | {_mb(r['disc_params'])}"
        f"{'' if r['gan'] else ' (GAN off)'} | {_mb(r['batch_stats'])} | {count} | {_mb(reduced)} | {_mb(other)} "
        f"| {(reduced + other) / max(expected, 1):.3f} | {_mb(traffic(r['ops'], r['devices']))} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", nargs="+", default=["configs/synthetic.py", "configs/cub.py"])
  parser.add_argument("--devices", type=int, default=4, help="emulated CPU devices of the data mesh")
  parser.add_argument("--reductions", nargs="+", default=["xla"], choices=["xla", "ordered"],
                      help="config.reduction values to compile each config with")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", args.devices)
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  rows = []
  for path, reduction in [(p, r) for p in args.configs for r in args.reductions]:
    row = measure(path, args.devices, reduction)
    print(f"{row['config']} ({reduction}): compiled in {row['compile_s']:.0f} s; collectives {row['ops']}", flush=True)
    for size, what in row["largest"]:
      print(f"  {size / 2**20:8.2f} MiB  {what}", flush=True)
    rows.append(row)
  print(f"\nPer-step collectives of the data-parallel train step ({args.devices} devices, "
        f"jax {jax.__version__}, {jax.devices()[0].platform})\n")
  print(table(rows))


if __name__ == "__main__":
  main()
