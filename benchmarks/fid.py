r"""FID benchmark: the float64 eigen route vs scipy's sqrtm, and the FID loss through InceptionV3.

  python benchmarks/fid.py [--dim 2048] [--samples 3000] [--batches 16,32] [--repeats 3] [--no-append]

Prints a markdown table and appends it (with this command and the date) to BENCHMARKS.md.
Times are medians of `--repeats` runs; the Inception rows are measured after compilation, with
random weights (timing does not depend on the weight values).
"""

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
import scipy.linalg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxrecon.metrics import fid  # pylint: disable=g-import-not-at-top
from jaxrecon.models import inception  # pylint: disable=g-import-not-at-top


def median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def sqrtm_frechet(mu1, s1, mu2, s2):
  """pytorch-fid's formula (scipy sqrtm, real part), the reference route."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--samples", type=int, default=3000)
  parser.add_argument("--batches", default="16,32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-append", action="store_true")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  mix = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
  a = np.maximum(rng.normal(size=(args.samples, args.dim)) @ mix, 0)
  b = np.maximum(rng.normal(size=(args.samples, args.dim)) @ mix + 0.1, 0)
  stats = fid.feature_statistics(a) + fid.feature_statistics(b)
  value_eig = fid.frechet_distance(*stats)
  value_sqrtm = sqrtm_frechet(*stats)
  t_eig = median_time(lambda: fid.frechet_distance(*stats), args.repeats)
  t_sqrtm = median_time(lambda: sqrtm_frechet(*stats), args.repeats)
  rows = [
      "| what | shape | median time (s) | ratio | result / rel. difference |",
      "|---|---|---|---|---|",
      f"| FID statistic, scipy `sqrtm` (pytorch-fid's route) | d={args.dim}, n={args.samples} | {t_sqrtm:.3f} | 1.0x | {value_sqrtm:.6f} |",
      f"| FID statistic, eigen route (`jaxrecon.metrics.fid.frechet_distance`) | d={args.dim}, n={args.samples} | {t_eig:.3f} | **{t_sqrtm / t_eig:.1f}x faster** | {abs(value_eig - value_sqrtm) / abs(value_sqrtm):.1e} |",
  ]

  model = inception.FIDInceptionV3()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))

  def loss_fn(images, real_features):
    return fid.fid_loss(real_features, model.apply(variables, images))

  step = jax.jit(jax.value_and_grad(loss_fn))
  for batch in [int(x) for x in args.batches.split(",")]:
    images = jax.random.uniform(jax.random.key(1), (batch, 299, 299, 3))
    real = jax.random.normal(jax.random.key(2), (batch, 2048))
    compiled = step.lower(images, real).compile()
    memory = compiled.memory_analysis()
    temp_mib = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else float("nan")
    jax.block_until_ready(compiled(images, real))
    t = median_time(lambda: jax.block_until_ready(compiled(images, real)), args.repeats)
    rows.append(f"| `fid_loss` + Inception fwd+bwd (value_and_grad wrt images) | B={batch}, 299² | {t:.3f} | "
                f"{batch / t:.1f} img/s | XLA temp {temp_mib:.0f} MiB |")
  rows.append(f"\nPeak RSS of the benchmark process: {peak_rss_mib():.0f} MiB.")

  header = (f"## FID ({datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"jax {jax.__version__}, {jax.devices()[0].platform})\n\n"
            f"`python benchmarks/fid.py {' '.join(sys.argv[1:])}`\n\n")
  table = header + "\n".join(rows) + "\n"
  print(table)
  if not args.no_append:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md"), "a") as f:
      f.write("\n" + table)


if __name__ == "__main__":
  main()
