r"""What mask IoU is reachable on the synthetic benchmark? Scores of oracle predictions.

  python benchmarks/ceiling.py [--config configs/synthetic.py] [--split test] [--data_dir DIR] [--no-append]

Renders, through the evaluation's own rasterizer and metric (`components.make_rasterizer(config,
for_evaluation=True)`, `metrics.image.mask_iou`: soft silhouette at `config.eval.sigma`), oracle
predictions for every image of the split:

* the true shape from the true camera — the ceiling any prediction can reach under the protocol
  (the gap to 1 is the soft edge and the generator's own anti-aliasing);
* the split's mean true shape (vertex correspondence with the template sphere) from each true
  camera — what a network that predicts one average bird, with a perfect camera, would score;
* the template sphere, scaled to the true shapes' RMS radius, from each true camera.

Prints a Markdown table and appends it, with the command and the date, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxrecon import components  # pylint: disable=g-import-not-at-top
from jaxrecon.metrics import image as image_metrics  # pylint: disable=g-import-not-at-top


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def oracle_scores(config, split: str) -> dict:
  """{oracle name: (mean IoU, number of images)} over `split` of the synthetic data."""
  sphere = components.sphere_for(config)
  rasterize = jax.jit(components.make_rasterizer(config, for_evaluation=True))
  screen_faces = components.make_screen_faces(config, sphere.faces)
  batches = list(components.make_data(config, split, shuffle=False, num_epochs=1, drop_remainder=False))
  vertices = np.concatenate([b["vertices"] for b in batches])
  mean_shape = vertices.mean(0)
  template = np.asarray(sphere.vertices, np.float32)
  template = template * np.sqrt((vertices**2).sum(-1).mean()) / np.sqrt((template**2).sum(-1).mean())
  scores = {"true shape, true camera": [], "mean true shape, true camera": [],
            "sphere (true RMS radius), true camera": []}
  for b in batches:
    cams, mask = jnp.asarray(b["camera"]), jnp.asarray(b["mask"])[..., 0]
    for name, shapes in zip(scores, (b["vertices"], np.broadcast_to(mean_shape, b["vertices"].shape),
                                     np.broadcast_to(template, b["vertices"].shape))):
      alpha = rasterize(screen_faces(jnp.asarray(shapes), cams))[..., 3]
      scores[name].append(np.asarray(image_metrics.mask_iou(alpha, mask)))
  return {k: (float(np.concatenate(v).mean()), int(sum(len(x) for x in v))) for k, v in scores.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--split", default="test", choices=["train", "validation", "test"])
  p.add_argument("--data_dir", default=None)
  p.add_argument("--no-append", action="store_true", help="print only, do not touch BENCHMARKS.md")
  args = p.parse_args()
  config = load_config(args.config)
  if config.data.dataset != "synthetic":
    p.error("--config: the oracles need the synthetic data's true shapes and cameras")
  if args.data_dir:
    config.data.data_dir = args.data_dir
  config.batch_size = 50
  scores = oracle_scores(config, args.split)
  lines = [f"Oracle mask IoU, `{args.config}` (synthetic_birds/{config.data.synthetic_config} {args.split}, "
           f"eval sigma {config.eval.get('sigma', config.render.sigma)})", "",
           "| prediction | mask IoU | images |", "|---|---|---|"]
  lines += [f"| {name} | {iou:.3f} | {n} |" for name, (iou, n) in scores.items()]
  table = "\n".join(lines) + "\n"
  print(table)
  if not args.no_append:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
    with open(path, "a") as f:
      f.write(f"\n## Reachable mask IoU ({datetime.date.today().isoformat()})\n\n"
              f"`python benchmarks/ceiling.py {' '.join(sys.argv[1:])}`\n\n{table}")


if __name__ == "__main__":
  main()
