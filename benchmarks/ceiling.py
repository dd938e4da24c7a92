r"""What can a prediction reach on the synthetic benchmark? Every metric of the evaluation, for oracles.

  python benchmarks/ceiling.py [--config configs/synthetic.py] [--split test] [--workdir DIR]
                               [--data_dir DIR] [--kp_pairs 10000] [--no-append]

Scores oracle predictions through `jaxrecon.evaluation.evaluate` itself (the same renderer, metrics,
camera-frame fit and keypoint transfer as a trained model), so each row is directly comparable with
a model's metrics.json:

* the template sphere (scaled to the true shapes' RMS radius), the split's mean true shape (vertex
  correspondence with the template sphere) and the true shape, each from the true camera;
* the true shape from the mirror twin of the true camera (`geometry.camera.mirror_twin`): the same
  silhouette, the shape seen from the other side — what a silhouette-only model cannot rule out.

Oracles have no texture flow: each texel takes the input's colour where the oracle's camera projects
it (for the true shape and camera, the true colour of every visible texel), and that projection is
their per-face flow for keypoint transfer.

With ``--workdir`` (a trained run on this data) the table adds the model's own row and the two
half-oracles that say what limits it:

* its shape from the true camera, expressed in the model's frame (R_gt G⁻¹, G the change of frame
  fitted by the evaluation; the model's own scale and translation), with its own texture;
* the true shape from the model's camera after that change of frame (R_p G, the true scale and
  translation), textured by projection.

Prints a Markdown table and appends it, with the command and the date, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxrecon import components, evaluation, ops  # pylint: disable=g-import-not-at-top
from jaxrecon.geometry import camera as camera_lib  # pylint: disable=g-import-not-at-top
from jaxrecon.geometry import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from jaxrecon.metrics import shape as shape_metrics  # pylint: disable=g-import-not-at-top

COLUMNS = ("mask_iou", "ssim", "chamfer_3d", "f_score", "pck_0.1", "camera_error_deg", "camera_error_twin_deg",
           "novel_view_l1", "novel_view_ssim")


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("config_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def projected_flow(vertices, cam, faces, texels_per_edge: int):
  """Where `cam` projects each texel centre of the shape: (B, V, 3), (B, 7) -> (B, F, T², 2) image
  coordinates (an oracle's per-face flow: its texture is the input sampled there)."""
  bary = jnp.asarray(mesh_lib.texel_barycentrics(texels_per_edge), jnp.float32)      # (T², 3)
  corners = mesh_lib.face_vertices(vertices, faces)                                   # (B, F, 3, 3)
  points = jnp.einsum("tk,bfkd->bftd", bary, corners)
  b, f, t, _ = points.shape
  xy, _ = camera_lib.project(points.reshape(b, f * t, 3), cam)
  return xy.reshape(b, f, t, 2)


class Scorers:
  """The jitted pieces every row shares, compiled once per run: the evaluation's scorer, the
  projected texture of an oracle, and the model's eval step."""

  def __init__(self, config, sphere, model=None):
    faces = jnp.asarray(sphere.faces)
    t = config.mesh.texels_per_edge

    def projected_texture(vertices, cam, image):
      flow = projected_flow(vertices, cam, faces, t)
      return flow, ops.grid_sample(image, flow, align_corners=False)     # the rasterizer's pixel centres

    self.score = jax.jit(evaluation.make_scorer(config, sphere))
    self.projected_texture = jax.jit(projected_texture)
    self.model_step = None if model is None else jax.jit(evaluation.make_eval_step(config, model, sphere))

  def oracle_step(self, choose):
    """An eval step (`evaluation.make_eval_step`'s signature and outputs) scoring the prediction
    ``choose(batch, model_outputs) -> (vertices (B, V, 3), cam (B, 7))`` textured by projection;
    `model_outputs` are the model's eval-step outputs (None without a model)."""

    def step(params, batch_stats, batch, key=None):
      key = jax.random.key(0) if key is None else key
      out = None if self.model_step is None else self.model_step(params, batch_stats, batch, key)[1]
      vertices, cam = choose(batch, out)
      flow, colours = self.projected_texture(vertices, cam, batch["image"])
      metrics, rgba, random_view = self.score(batch, vertices, cam, colours, key)
      return metrics, {"render": rgba, "cam": cam, "colours": colours, "flow": flow, "image": batch["image"],
                       "random_view": random_view}

    return step

  def model_shape_true_camera_step(self, frame):
    """The model's shape and texture, from the true camera expressed in the model's frame (R_gt G⁻¹)."""
    frame_inverse = camera_lib.quat_conjugate(jnp.asarray(frame))

    def step(params, batch_stats, batch, key=None):
      key = jax.random.key(0) if key is None else key
      _, out = self.model_step(params, batch_stats, batch, key)
      cam = out["cam"].at[:, 3:].set(camera_lib.quat_multiply(batch["camera"][:, 3:], frame_inverse))
      metrics, rgba, random_view = self.score(batch, out["pred"].vertices, cam, out["colours"], key)
      return metrics, {**out, "render": rgba, "cam": cam, "random_view": random_view}

    return step


def _row(results: dict, split: str) -> dict:
  return {k: results.get(f"eval/{split}/{k}") for k in COLUMNS}


def oracle_rows(config, split: str, workdir: str | None = None, kp_pairs: int = 10000) -> dict:
  """{row name: {metric: value}} over `split` (see the module docstring)."""
  sphere = components.sphere_for(config)
  batches = list(components.make_data(config, split, shuffle=False, num_epochs=1, drop_remainder=False))
  true_vertices = np.concatenate([b["vertices"] for b in batches])
  mean_shape = jnp.asarray(true_vertices.mean(0))
  template = np.asarray(sphere.vertices, np.float32)
  template = jnp.asarray(template * np.sqrt((true_vertices**2).sum(-1).mean() / (template**2).sum(-1).mean()))
  twin = lambda cam: cam.at[:, 3:].set(camera_lib.mirror_twin(cam[:, 3:]))
  broadcast = lambda shape, batch: jnp.broadcast_to(shape, batch["vertices"].shape)
  choices = {
      "sphere (true RMS radius), true camera": lambda b, _: (broadcast(template, b), b["camera"]),
      "mean true shape, true camera": lambda b, _: (broadcast(mean_shape, b), b["camera"]),
      "true shape, true camera": lambda b, _: (b["vertices"], b["camera"]),
      "true shape, mirror-twin camera": lambda b, _: (b["vertices"], twin(b["camera"])),
  }
  no_state = types.SimpleNamespace(params=None, batch_stats=None, step=0)
  run = lambda state, step: evaluation.evaluate(config, None, sphere, state, split=split, eval_step=step,
                                                kp_pairs=kp_pairs)
  model, state = None, no_state
  if workdir:
    _, model, state = evaluation.restore_model(workdir, config)
  scorers = Scorers(config, sphere, model)
  rows = {name: _row(run(state, scorers.oracle_step(choose)), split) for name, choose in choices.items()}
  if workdir:
    results = run(state, scorers.model_step)
    rows[f"the model (step {state.step})"] = _row(results, split)
    info = results[f"eval_frame/{split}"]
    frame = frame_quaternion(info["turn_deg"], info["flip"])
    rows["half-oracle: the model's shape and texture, true camera"] = _row(
        run(state, scorers.model_shape_true_camera_step(frame)), split)
    aligned = lambda b, out: (b["vertices"], b["camera"].at[:, 3:].set(
        camera_lib.quat_multiply(out["cam"][:, 3:], jnp.asarray(frame))))
    rows["half-oracle: the true shape, the model's aligned camera"] = _row(run(state, scorers.oracle_step(aligned)),
                                                                          split)
  return rows


def frame_quaternion(turn_deg: float, flip: bool):
  """The change of frame `metrics.shape.fit_camera_frame` reports, as a quaternion (4,)."""
  frames = shape_metrics.plane_preserving_frames(720)
  return np.asarray(frames[int(round(turn_deg * 2)) % 720 + (720 if flip else 0)])


def markdown(rows: dict) -> str:
  lines = ["| prediction | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
  for name, row in rows.items():
    cells = ["–" if row[k] is None else f"{row[k]:.3f}" if abs(row[k]) < 10 else f"{row[k]:.1f}" for k in COLUMNS]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/synthetic.py")
  p.add_argument("--split", default="test", choices=["train", "validation", "test"])
  p.add_argument("--workdir", default=None, help="a trained run: adds its row and its two half-oracles")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--kp_pairs", type=int, default=10000)
  p.add_argument("--no-append", action="store_true", help="print only, do not touch BENCHMARKS.md")
  args = p.parse_args()
  if args.workdir:
    config = evaluation.load_config(args.workdir)
  else:
    config = load_config(args.config)
  if config.data.dataset != "synthetic":
    p.error("--config: the oracles need the synthetic data's true shapes and cameras")
  if args.data_dir:
    config.data.data_dir = args.data_dir
  config.eval.max_batches = 0
  rows = oracle_rows(config, args.split, args.workdir, args.kp_pairs)
  table = (f"Oracles on synthetic_birds/{config.data.synthetic_config} {args.split} (`jaxrecon.evaluation`, default "
           f"protocol; camera errors are medians after the fitted change of frame)\n\n" + markdown(rows))
  print(table)
  if not args.no_append:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
    with open(path, "a") as f:
      f.write(f"\n## Oracles and half-oracles ({datetime.date.today().isoformat()})\n\n"
              f"`python benchmarks/ceiling.py {' '.join(sys.argv[1:])}`\n\n{table}")


if __name__ == "__main__":
  main()
