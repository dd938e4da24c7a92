"""Forward+backward time of jaxrecon.ops.grid_sample vs torch.nn.functional.grid_sample on this CPU.

UMR's two sampling calls (NVlabs/UMR nnutils/cub_mesh.py TexturePredictorUV and
nnutils/geom_utils.py sample_textures), bilinear, align_corners=True, zeros padding:

* flow:  the texture-flow image (16, 128, 256, 2) sampled at the UV sampler (16, 656, 36, 2);
* image: the input image (16, 256, 256, 3) sampled at the texture flow (16, 1280, 36, 2).

Each case is timed twice: with gradients w.r.t. both image and grid ("both"), and with the one
gradient UMR needs ("umr": the flow image for 'flow', the grid for 'image'; the other input is
data). Both libraries run in this process, interleaved round by round, on the same threads; the
table gives medians (and minima) over the rounds. Peak memory is the transient growth of the RSS
of a fresh subprocess running one implementation only (sampled by a thread while it runs, above
its resting RSS after a warm-up step), plus XLA's own accounting of the compiled program's
temporaries.

  python benchmarks/sampler.py [--rounds 15] [--append BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

CASES = {
    "flow": ((16, 128, 256, 2), (16, 656, 36, 2), "image"),
    "image": ((16, 256, 256, 3), (16, 1280, 36, 2), "grid"),
}
IMPLS = ("jax", "jax_adaptive", "jax_loss", "torch")


def _data(case):
  image_shape, grid_shape, _ = CASES[case]
  rng = np.random.default_rng(0)
  image = rng.uniform(0.05, 1.0, size=image_shape).astype(np.float32)
  grid = rng.uniform(-1.0, 1.0, size=grid_shape).astype(np.float32)
  cotangent = rng.normal(size=grid_shape[:-1] + image_shape[-1:]).astype(np.float32)
  variance = rng.uniform(0.5, 2.0, size=image_shape[:-1] + (1,)).astype(np.float32)
  return image, grid, cotangent, variance


def _make_step(impl, case, wrt):
  """A zero-argument callable running forward+backward once and blocking until done."""
  image, grid, cotangent, variance = _data(case)
  if impl == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    image_t = torch.tensor(image.transpose(0, 3, 1, 2).copy(),
                           requires_grad=wrt in ("both", "image"))
    grid_t = torch.tensor(grid, requires_grad=wrt in ("both", "grid"))
    cotangent_t = torch.tensor(cotangent.transpose(0, 3, 1, 2).copy())

    def step():
      image_t.grad, grid_t.grad = None, None
      out = torch.nn.functional.grid_sample(image_t, grid_t, mode="bilinear", padding_mode="zeros",
                                            align_corners=True)
      out.backward(cotangent_t)
    return step, None

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxrecon.ops import grid_sample, variance_grid_sample

  if impl in ("jax", "jax_loss"):
    sample = lambda i, g, v: grid_sample(i, g, align_corners=True)
  else:
    sample = lambda i, g, v: variance_grid_sample(i, g, v, align_corners=True)
  argnums = {"both": (0, 1), "image": (0,), "grid": (1,)}[wrt]

  if impl == "jax_loss":
    # The sampled values summed straight into a loss: XLA fuses the loss into the op (see notes).
    def run(i, g, v, c):
      loss = lambda i, g: jnp.sum(sample(i, g, v) * c)
      return jax.value_and_grad(loss, argnums=argnums)(i, g)
  else:
    # Mirrors torch's ``out.backward(cotangent)``: the sampled values and the input cotangents.
    def run(i, g, v, c):
      inputs = (i, g)
      def partial_sample(*diff):
        full = list(inputs)
        for k, x in zip(argnums, diff):
          full[k] = x
        return sample(full[0], full[1], v)
      out, vjp = jax.vjp(partial_sample, *(inputs[k] for k in argnums))
      return out, vjp(c)
  args = [jnp.asarray(x) for x in (image, grid, variance, cotangent)]
  compiled = jax.jit(run).lower(*args).compile()
  temp = compiled.memory_analysis()
  temp_bytes = getattr(temp, "temp_size_in_bytes", None) if temp is not None else None
  return (lambda: jax.block_until_ready(compiled(*args))), temp_bytes


def _time_all(rounds):
  """Median/min seconds per (case, wrt, impl), timed round-robin so load changes hit all alike."""
  results = {}
  for case, (_, _, umr_wrt) in CASES.items():
    for wrt in ("both", umr_wrt):
      label = "both" if wrt == "both" else "umr"
      steps = {impl: _make_step(impl, case, wrt) for impl in IMPLS}
      for step, _ in steps.values():
        step()
        step()
      times = {impl: [] for impl in IMPLS}
      for _ in range(rounds):
        for impl, (step, _) in steps.items():
          start = time.perf_counter()
          step()
          times[impl].append(time.perf_counter() - start)
      for impl in IMPLS:
        results[(case, label, impl)] = (float(np.median(times[impl])), float(np.min(times[impl])),
                                        steps[impl][1])
  return results


def _rss_bytes():
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _transient_rss(step, repeats=3):
  """Peak RSS above the resting RSS while ``step`` runs (sampled every ~0.2 ms by a thread)."""
  import threading  # pylint: disable=import-outside-toplevel
  step()  # warm-up: compile, allocator pools
  rest, peak, done = _rss_bytes(), [0], threading.Event()

  def poll():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_bytes())
      time.sleep(0.0002)
  thread = threading.Thread(target=poll)
  thread.start()
  for _ in range(repeats):
    step()
  done.set()
  thread.join()
  return max(peak[0] - rest, 0)


def _peak_rss_growth(impl, case, wrt):
  """Transient RSS growth (bytes) of a fresh process running one implementation only."""
  code = ("import sys, json; sys.path.insert(0, %r); import sampler as s; "
          "step, _ = s._make_step(%r, %r, %r); print(json.dumps(s._transient_rss(step)))"
          ) % (os.path.dirname(os.path.abspath(__file__)), impl, case, wrt)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return int(json.loads(out.stdout.strip().splitlines()[-1]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--append", default=None, help="append the Markdown table to this file")
  parser.add_argument("--no-memory", action="store_true", help="skip the subprocess RSS probes")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  results = _time_all(args.rounds)
  lines = [
      f"## Bilinear sampler vs torch grid_sample (benchmarks/sampler.py, "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
      "",
      f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with "
      f"other jobs: expect noise), jax {jax.__version__}, torch {torch.__version__} "
      f"({torch.get_num_threads()} threads). Forward+backward, float32, bilinear, "
      f"align_corners=True, zeros padding; median (min) of {args.rounds} interleaved rounds. "
      "'both': cotangents for image and grid; 'umr': only the one UMR uses (flow image for 'flow', "
      "grid for 'image'). jax = `jax.vjp` of grid_sample applied to a cotangent (what torch's "
      "`out.backward(cotangent)` does); jax adaptive = the same for "
      "variance_grid_sample(mode='adaptive') with a 1-channel variance; jax loss = "
      "`value_and_grad(sum(grid_sample(...) * cotangent))`, the sum fused into the op by XLA. "
      "Peak RSS: transient RSS growth of a fresh process during fwd+bwd (sampled after a warm-up "
      "step; allocator caching can hide reused buffers). XLA temp: the compiled program's scratch.",
      "",
      "| case | grads | torch ms | jax ms | jax/torch | jax adaptive ms | adaptive/torch "
      "| jax loss ms | peak RSS torch / jax MB | XLA temp MB |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for case, (_, _, umr_wrt) in CASES.items():
    for label, wrt in (("both", "both"), ("umr", umr_wrt)):
      t_med, t_min, _ = results[(case, label, "torch")]
      j_med, j_min, temp = results[(case, label, "jax")]
      a_med, a_min, _ = results[(case, label, "jax_adaptive")]
      l_med, l_min, _ = results[(case, label, "jax_loss")]
      if args.no_memory:
        memory = "-"
      else:
        memory = "%.0f / %.0f" % (_peak_rss_growth("torch", case, wrt) / 2**20,
                                  _peak_rss_growth("jax", case, wrt) / 2**20)
      temp_mb = "-" if temp is None else "%.0f" % (temp / 2**20)
      lines.append(
          f"| {case} | {label} | {t_med * 1e3:.1f} ({t_min * 1e3:.1f}) | {j_med * 1e3:.1f} "
          f"({j_min * 1e3:.1f}) | {j_med / t_med:.2f}x | {a_med * 1e3:.1f} ({a_min * 1e3:.1f}) | "
          f"{a_med / t_med:.2f}x | {l_med * 1e3:.1f} ({l_min * 1e3:.1f}) | {memory} | {temp_mb} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.append:
    with open(args.append, "a", encoding="utf-8") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  main()
