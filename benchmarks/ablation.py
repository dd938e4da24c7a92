r"""The paper's ablation (Table 1, §4) on a synthetic benchmark: which of its additions help?

  python benchmarks/ablation.py --root=workdir/ablation [--config=configs/synthetic.py] \
      [--seeds=0,1,2] [--variants=umr,variance_paper,variance_adaptive,fid,full] \
      [--inception=weights/fid_inception.npz] [--set num_train_steps=300 --set batch_size=16 ...] \
      [--results=RESULTS.md] [--figure=docs/ablation_synthetic.png]

Each (variant, seed) is one training run (`python -m jaxrecon.main`, workdir
<root>/<variant>/seed_<seed>) scored on the test split by `python -m jaxrecon.evaluate` (default
protocol). Both run as child processes so that every run starts from a clean interpreter, the way a
user would run them. Finished runs (their eval_test/metrics.json exists at the requested step) are
not repeated, so an interrupted ablation resumes where it stopped (a run interrupted during training
continues from its last checkpoint).

Variants (the config's own settings otherwise; `VARIANTS` below is the exact list of overrides):

* ``umr``: UMR's texture path: no variance branch, no lookahead, no FID;
* ``variance_paper``: the variance map of Eq. 11 (colours = GS(I·V)), trained by the texture loss;
* ``variance_adaptive``: the adaptive-gradient sampler of Eq. 16-17 with the lookahead of Eq. 31-32;
* ``fid``: UMR + the FID loss of Eq. 42-47 (needs ``--inception``: converted FID Inception weights);
* ``full``: the adaptive variance branch + the FID loss (needs ``--inception``).

A variant that needs weights that were not given is not run; the table says so. The seed sets the
network initialisation, the data order and the random views (the dataset itself is fixed), so the
seeds pair the variants: the second table gives each variant's paired difference to ``umr``.

Writes <root>/ablation.json (every run's metrics), a figure (the same test images reconstructed by
seed 0 of each variant: input, then per variant the render from its predicted camera and a view
turned by 180°) and replaces the block between `<!-- ablation:<tag> begin -->` and `<!-- ablation:<tag>
end -->` in --results (appended when absent; the text around it, e.g. the interpretation, is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# The metrics reported (evaluation.METRICS names), in table order, with the better direction.
METRICS = (("mask_iou", "higher"), ("ssim", "higher"), ("texture_l1", "lower"), ("fid", "lower"),
           ("chamfer_3d", "lower"), ("f_score", "higher"), ("novel_view_l1", "lower"),
           ("novel_view_ssim", "higher"), ("pck_0.1", "higher"))
# The paper's claims concern these two (Table 1).
HEADLINE = ("mask_iou", "ssim")


@dataclasses.dataclass(frozen=True)
class Variant:
  description: str
  overrides: dict
  needs_inception: bool = False


_NO_FID = {"loss_weights.fid": 0.0}
VARIANTS = {
    "umr": Variant("UMR: no variance branch, no FID",
                   {"variance.mode": "none", "loss_weights.variance_lookahead": 0.0, **_NO_FID}),
    "variance_paper": Variant("+ variance map, paper's Eq. 11 (GS(I·V))",
                              {"variance.mode": "paper", "loss_weights.variance_lookahead": 0.0, **_NO_FID}),
    "variance_adaptive": Variant("+ variance map, adaptive gradient (Eq. 16-17) + lookahead (Eq. 31-32)",
                                 {"variance.mode": "adaptive", **_NO_FID}),
    "fid": Variant("UMR + FID loss (Eq. 42-47)",
                   {"variance.mode": "none", "loss_weights.variance_lookahead": 0.0}, needs_inception=True),
    "full": Variant("adaptive variance + lookahead + FID loss", {"variance.mode": "adaptive"},
                    needs_inception=True),
}
BASELINE = "umr"


def variant_overrides(name: str, inception: str | None, fid_weight: float) -> dict:
  """The `--config.x=y` overrides of variant `name` ({dotted key: value})."""
  variant = VARIANTS[name]
  overrides = dict(variant.overrides)
  if variant.needs_inception:
    if not inception:
      raise ValueError(f"variant {name!r} needs --inception=<converted FID Inception .npz>")
    overrides.update({"weights.inception": os.path.abspath(inception), "loss_weights.fid": fid_weight})
  return overrides


def flag_args(overrides: dict) -> list[str]:
  """{key: value} -> ['--config.key=value', ...] in the form ml_collections parses."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def run_dir(root: str, variant: str, seed: int) -> str:
  return os.path.join(root, variant, f"seed_{seed}")


def read_metrics(workdir: str) -> dict | None:
  """The test report of a finished run (None when it has not been evaluated)."""
  path = os.path.join(workdir, "eval_test", "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_one(config: str, workdir: str, overrides: dict, seed: int, steps: int | None,
            data_dir: str | None, cache: str, log) -> dict:
  """Train then evaluate one run in child processes; returns the evaluation report.

  A run whose report exists at the requested step is read back instead of repeated.
  """
  report = read_metrics(workdir)
  if report is not None:
    if steps is not None and report["step"] != steps:
      raise ValueError(f"{workdir} holds a run of {report['step']} steps, not --steps={steps}: give this "
                       "ablation its own --root (a run's checkpoints would otherwise be continued or reused)")
    log(f"  {workdir}: done before (step {report['step']}), reusing its report")
    return report
  common = [f"--compilation_cache={cache}"]
  train_cmd = [sys.executable, "-m", "jaxrecon.main", f"--config={config}", f"--workdir={workdir}",
               f"--config.seed={seed}", *flag_args(overrides), *common]
  if steps is not None:
    train_cmd.append(f"--config.num_train_steps={steps}")
  if data_dir:
    train_cmd.append(f"--config.data.data_dir={data_dir}")
  eval_cmd = [sys.executable, "-m", "jaxrecon.evaluate", f"--workdir={workdir}", "--split=test", *common]
  if data_dir:
    eval_cmd.append(f"--data_dir={data_dir}")
  os.makedirs(workdir, exist_ok=True)
  for name, cmd in (("train", train_cmd), ("evaluate", eval_cmd)):
    start = time.time()
    with open(os.path.join(workdir, f"{name}.log"), "w") as out:
      code = subprocess.call(cmd, cwd=_REPO, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
      raise RuntimeError(f"{name} of {workdir} failed with exit code {code}; see {workdir}/{name}.log\n"
                         f"command: {' '.join(cmd)}")
    log(f"  {name}: {time.time() - start:.0f} s")
  return read_metrics(workdir)


def metric_values(report: dict) -> dict:
  """{metric: value} of a report's measured metrics (skipped ones left out)."""
  return {k: m["value"] for k, m in report["metrics"].items() if "value" in m}


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict) -> dict:
  """runs {variant: {seed: {metric: value}}} -> {variant: {metric: (mean, std, n)}} and the paired
  differences to the baseline: {variant: {metric: (mean, std, n)}} over the seeds both have."""
  table, paired = {}, {}
  for variant, by_seed in runs.items():
    table[variant] = {}
    for metric, _ in METRICS:
      values = [v[metric] for v in by_seed.values() if metric in v]
      if values:
        table[variant][metric] = (*mean_std(values), len(values))
    if variant != BASELINE and BASELINE in runs:
      paired[variant] = {}
      for metric in HEADLINE:
        diffs = [v[metric] - runs[BASELINE][s][metric] for s, v in by_seed.items()
                 if s in runs[BASELINE] and metric in v and metric in runs[BASELINE][s]]
        if diffs:
          paired[variant][metric] = (*mean_std(diffs), len(diffs))
  return {"table": table, "paired": paired}


def markdown(summary: dict, skipped: dict, header: str) -> str:
  """The results block: the header, the mean ± std table, the paired-difference table, the skips."""
  table, paired = summary["table"], summary["paired"]
  shown = [(m, d) for m, d in METRICS if any(m in t for t in table.values())]
  lines = [header, "", "| variant | seeds | " + " | ".join(f"{m} ({'↑' if d == 'higher' else '↓'})" for m, d in shown)
           + " |", "|---|---|" + "---|" * len(shown)]
  for variant, t in table.items():
    n = max((x[2] for x in t.values()), default=0)
    cells = [f"{t[m][0]:.4f} ± {t[m][1]:.4f}" if m in t else "–" for m, _ in shown]
    lines.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
  if paired:
    lines += ["", f"Paired difference to `{BASELINE}` (same seed: same initialisation of the shared "
              "networks and the same data order), mean ± std over seeds:", "",
              "| variant | " + " | ".join(f"Δ {m}" for m in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for variant, p in paired.items():
      lines.append(f"| {variant} | " + " | ".join(
          f"{p[m][0]:+.4f} ± {p[m][1]:.4f} (n={p[m][2]})" if m in p else "–" for m in HEADLINE) + " |")
  for variant, reason in skipped.items():
    lines.append(f"\n`{variant}` was not run: {reason}.")
  return "\n".join(lines) + "\n"


def replace_block(text: str, tag: str, block: str) -> str:
  """`text` with the block between the ablation markers of `tag` replaced (appended when absent)."""
  begin, end = f"<!-- ablation:{tag} begin -->", f"<!-- ablation:{tag} end -->"
  new = f"{begin}\n{block}{end}"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    return head + new + rest.split(end, 1)[1]
  return text.rstrip("\n") + ("\n\n" if text.strip() else "") + new + "\n"


def write_figure(path: str, root: str, variants: list[str], seed: int, num_images: int, data_dir: str | None):
  """One row per test image: input, then per variant its render from its predicted camera and the
  view turned by 180° (seed `seed` of each variant). Writes a PNG; returns its path."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, _REPO)
  from jaxrecon import components, evaluation  # pylint: disable=g-import-not-at-top
  columns, inputs, size = [], None, None
  for variant in variants:
    workdir = run_dir(root, variant, seed)
    config = evaluation.load_config(workdir)
    if data_dir:
      config.data.data_dir = data_dir
    config.batch_size = num_images
    batch = next(iter(components.make_data(config, "test", shuffle=False, num_epochs=1, drop_remainder=False)))
    sphere, model, state = evaluation.restore_model(workdir, config)
    visualise = evaluation.make_visualise(config, model, sphere, num_novel=1)   # the one novel view: +180°
    grid = np.asarray(jax.device_get(visualise(state.params, state.batch_stats, batch["image"], batch["mask"])))
    size = config.data.image_size
    inputs = grid[:, :size]
    columns.append(grid[:, size:2 * size])             # render from the predicted camera
    columns.append(grid[:, 3 * size:4 * size])         # the novel view
  label_height = 14
  body = np.concatenate([inputs, *columns], axis=1)
  canvas = Image.new("RGB", (body.shape[1], body.shape[0] + label_height), "white")
  canvas.paste(Image.fromarray((np.clip(body, 0, 1) * 255).astype(np.uint8)), (0, label_height))
  draw = ImageDraw.Draw(canvas)
  draw.text((2, 1), "input", fill="black")
  for i, variant in enumerate(variants):
    draw.text((size * (1 + 2 * i) + 2, 1), variant, fill="black")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True, help="folder of the runs: <root>/<variant>/seed_<seed>")
  p.add_argument("--config", default="configs/synthetic.py", help="base config file (relative to the repo)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the issue asks for >= 3)")
  p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
  p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="extra config override for every run, e.g. --set batch_size=8 (repeatable)")
  p.add_argument("--inception", default=None, help="converted FID Inception weights (.npz); the fid/full "
                 "variants need them, and evaluation then reports FID")
  p.add_argument("--fid_weight", type=float, default=1e-3, help="loss_weights.fid of the FID variants")
  p.add_argument("--data_dir", default=None, help="config.data.data_dir for every run")
  p.add_argument("--compilation_cache", default=os.path.join("~", ".cache", "jaxrecon", "xla"))
  p.add_argument("--results", default=os.path.join(_REPO, "RESULTS.md"), help="Markdown file to update")
  p.add_argument("--tag", default="synthetic", help="names the block in --results (one block per tag)")
  p.add_argument("--figure", default=None, help="PNG path of the figure (default docs/ablation_<tag>.png)")
  p.add_argument("--figure_images", type=int, default=6)
  args = p.parse_args(argv)

  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
  extra = {}
  for item in args.set:
    if "=" not in item:
      p.error(f"--set {item!r}: expected KEY=VALUE")
    key, value = item.split("=", 1)
    extra[key] = value
  inception = args.inception
  if inception and not os.path.exists(inception):
    p.error(f"--inception={inception} not found (python -m jaxrecon.tools.convert_weights --model fid_inception)")

  def log(msg):
    print(msg, flush=True)

  runs, skipped, started = {}, {}, time.time()
  for variant in variants:
    if VARIANTS[variant].needs_inception and not inception:
      skipped[variant] = ("it needs converted FID Inception weights (--inception); none were given, and on "
                          "CPU the 299-px Inception forward/backward of Eq. 42-47 costs ~6 s per 16 images "
                          "(BENCHMARKS.md), several times the rest of the step")
      log(f"{variant}: skipped ({skipped[variant]})")
      continue
    overrides = {**variant_overrides(variant, inception, args.fid_weight), **extra}
    for seed in seeds:
      workdir = run_dir(args.root, variant, seed)
      log(f"{variant} seed {seed}: {workdir}")
      report = run_one(args.config, workdir, overrides, seed, args.steps, args.data_dir, args.compilation_cache,
                       log)
      runs.setdefault(variant, {})[seed] = metric_values(report)
  elapsed = time.time() - started

  summary = summarise(runs)
  os.makedirs(args.root, exist_ok=True)
  with open(os.path.join(args.root, "ablation.json"), "w") as f:
    json.dump({"runs": runs, "skipped": skipped, "summary": summary, "config": args.config, "seeds": seeds,
               "steps": args.steps, "overrides": extra}, f, indent=1)
  figure = None
  ran = [v for v in variants if v in runs and seeds[0] in runs[v]]
  if ran and args.figure_images > 0:
    figure = write_figure(args.figure or os.path.join(_REPO, "docs", f"ablation_{args.tag}.png"), args.root, ran,
                          seeds[0], args.figure_images, args.data_dir)
  command = "python benchmarks/ablation.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
  settings = ", ".join([f"{args.steps or 'config'} steps"] + [f"{k}={v}" for k, v in extra.items()])
  header = (f"### Ablation on `{args.config}` ({settings}; seeds {seeds}; test split)\n\n"
            f"{datetime.date.today().isoformat()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{elapsed / 60:.0f} min for the runs not reused. Command: `{command}`. Mean ± sample std over "
            "seeds; metrics defined in each run's eval_test/metrics.json (`python -m jaxrecon.evaluate`).")
  if figure:
    rel = os.path.relpath(figure, os.path.dirname(os.path.abspath(args.results)))
    header += (f"\n\n![the same test images reconstructed by seed {seeds[0]} of each variant]({rel})  \n"
               "Input, then per variant: the render from its predicted camera, and the view turned by 180°.")
  block = markdown(summary, skipped, header)
  print(block)
  text = open(args.results).read() if os.path.exists(args.results) else "# Results\n"
  with open(args.results, "w") as f:
    f.write(replace_block(text, args.tag, block))
  print(f"Updated {args.results}" + (f" and wrote {figure}" if figure else ""))


if __name__ == "__main__":
  main()
