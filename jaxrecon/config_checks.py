"""Config checks that fail in one line, before anything slow starts.

`check(config)` looks at the values a config can get wrong (positive sizes, non-negative loss
weights, the mode strings the code understands, the types of those fields) and raises one
`ConfigError` naming every bad field; `check_devices` is the batch / device-count condition, known
only once the devices are. `jaxrecon.main` calls `check` before starting JAX, and
`train.train_and_evaluate` calls it too, so library users get the same messages.

`unknown_field_message` explains an override of a field the config does not have, with the nearest
known names (``--config.batchsize`` -> ``did you mean --config.batch_size?``); `jaxrecon.cli` uses it.
"""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Iterator

import ml_collections


class ConfigError(ValueError):
  """A config value the code cannot run with; the message is one line naming the field(s)."""


# The mode strings, with the module that reads each.
CHOICES = {
    "job": ("train", "preview", "pipeline"),                       # train.train_and_evaluate
    "stage": ("full", "template"),                                 # train: 'template' learns V_temp
    "reduction": ("xla", "ordered"),                               # components.REDUCTIONS
    "gan_input": ("rgba", "silhouette"),                           # train.discriminator_channels
    "data.dataset": ("synthetic", "cub"),                          # components.make_data
    "model.camera_init": ("identity", "azimuths"),                 # components
    "camera_selection": ("expected", "best"),                      # train.make_train_step
    "deform_reference": ("template", "batch_mean"),                # train.make_train_step
    "variance.mode": ("adaptive", "paper", "none"),                # ops.variance.MODES
    "variance.combine": ("replace", "add"),                        # ops.variance.COMBINES
    "template.labelling": ("vertex_projection", "uv_flow"),        # templating
    "weights.perceptual_net": ("alexnet", "vgg16"),                # models.perceptual
    "eval.split": ("train", "validation", "test"),
}

POSITIVE_INTS = (
    "batch_size", "num_train_steps", "log_every", "log_images_count", "checkpoint.every", "data.image_size",
    "mesh.texels_per_edge", "model.feature_dim", "model.encoder_conv_channels", "model.num_hypotheses",
    "model.camera_width", "model.flow_base_channels", "model.flow_stages", "model.variance_base_channels",
    "model.variance_stages", "model.disc_channels", "model.disc_layers", "template.update_every")
NON_NEGATIVE_INTS = ("seed", "log_images_every", "mesh.subdivisions", "eval.max_batches", "template.update_images",
                     "template.semantic_images")
POSITIVE_FLOATS = ("optim.learning_rate", "render.sigma", "render.gamma", "eval.sigma", "model.template_scale")
NON_NEGATIVE_FLOATS = ("optim.decay", "optim.gradient_penalty", "variance.lookahead_step_px", "render.dist_eps")


def _get(config, path: str, default=None):
  node = config
  for part in path.split("."):
    if not hasattr(node, "get") or part not in node:
      return default
    node = node[part]
  return node


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def problems(config) -> list[str]:
  """Every problem of one training config (one phrase each); fields it lacks are not checked."""
  found = []

  def bad(path, value, expected):
    found.append(f"config.{path}={value!r}: {expected}")

  for path, allowed in CHOICES.items():
    value = _get(config, path)
    if value is not None and value not in allowed:
      bad(path, value, f"must be one of {', '.join(allowed)}")
  for path in POSITIVE_INTS + NON_NEGATIVE_INTS:
    value = _get(config, path)
    minimum = 1 if path in POSITIVE_INTS else 0
    if value is not None and (not _is_int(value) or value < minimum):
      bad(path, value, "must be a positive integer" if minimum else "must be an integer >= 0")
  for path in POSITIVE_FLOATS + NON_NEGATIVE_FLOATS:
    value = _get(config, path)
    positive = path in POSITIVE_FLOATS
    if value is not None and (not _is_real(value) or value < 0 or (positive and value == 0)):
      bad(path, value, "must be a number > 0" if positive else "must be a number >= 0")
  widths = _get(config, "model.resnet_widths")
  if widths is not None and (not isinstance(widths, (tuple, list)) or not widths
                             or not all(_is_int(w) and w > 0 for w in widths)):
    bad("model.resnet_widths", widths, "must be a tuple of positive integers")
  axes = _get(config, "model.template_axes")
  if axes is not None and (not isinstance(axes, (tuple, list)) or len(axes) != 3
                           or not all(_is_real(a) and a > 0 for a in axes)):
    bad("model.template_axes", axes, "must be three numbers > 0 (forward, across, up)")
  keep = _get(config, "checkpoint.max_to_keep")
  if keep is not None and (not _is_int(keep) or keep < 1):
    bad("checkpoint.max_to_keep", keep, "must be None (keep all) or an integer >= 1")
  for group in ("loss_weights", "part_points"):
    for name, value in (_get(config, group) or {}).items():
      if not _is_real(value) or value < 0:
        bad(f"{group}.{name}", value, "must be a number >= 0")
  weights = _get(config, "loss_weights") or {}
  for name, window in (_get(config, "loss_steps") or {}).items():
    if name not in weights:
      bad(f"loss_steps.{name}", window, f"is not a loss term (terms: {', '.join(sorted(weights))})")
    elif (not isinstance(window, (tuple, list)) or len(window) != 2 or not _is_int(window[0])
          or not (window[1] is None or (_is_int(window[1]) and window[1] > window[0]))):
      bad(f"loss_steps.{name}", window, "must be (start, stop) steps with stop None or > start")
  for split in _get(config, "eval.splits") or ():
    if split not in CHOICES["eval.split"]:
      bad("eval.splits", tuple(_get(config, "eval.splits")), f"must hold splits of {', '.join(CHOICES['eval.split'])}")
      break
  return found


def check(config) -> None:
  """Raise one `ConfigError` naming every bad field of `config` (both stages of a pipeline)."""
  if config.get("job") == "pipeline":
    found = [p.replace("config.", f"config.{stage}.", 1)
             for stage in ("stage1", "stage2") for p in problems(config[stage])]
  else:
    found = problems(config)
  if found:
    raise ConfigError("; ".join(found))


def check_devices(batch_size: int, device_count: int, process_count: int = 1) -> None:
  """The global batch is split evenly over the devices."""
  if batch_size % device_count:
    multiple = -(-batch_size // device_count) * device_count
    raise ConfigError(f"config.batch_size={batch_size} must be divisible by the {device_count} devices "
                      f"({process_count} process(es)): e.g. --config.batch_size={multiple}")


def field_paths(config, prefix: str = "") -> Iterator[str]:
  """Every field of a ConfigDict as a dotted path (sub-dicts and their fields both)."""
  for key, value in config.items():
    path = f"{prefix}{key}"
    yield path
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from field_paths(value, path + ".")


def has_field(config, path: str) -> bool:
  node: Any = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def nearest_fields(config, path: str, n: int = 3) -> list[str]:
  """The known field paths closest to `path`: a close name under the same parent, else a close
  name anywhere (a field given at the wrong level: ``feature_dim`` -> ``model.feature_dim``), else
  a close whole path (``modle.feature_dim``)."""
  parent, _, leaf = path.rpartition(".")
  paths = [p for p in field_paths(config) if not path.startswith(p + ".")]
  siblings = [p for p in paths if p.rpartition(".")[0] == parent]
  by_leaf = lambda pool, cutoff: [p for name in difflib.get_close_matches(leaf, {p.rpartition(".")[2] for p in pool},
                                                                          n=n, cutoff=cutoff)
                                  for p in pool if p.rpartition(".")[2] == name]
  for found in (lambda: by_leaf(siblings, 0.6), lambda: by_leaf(paths, 0.8),
                lambda: difflib.get_close_matches(path, paths, n=n, cutoff=0.75)):
    near = found()
    if near:
      return near[:n]
  return []


def unknown_field_message(config, path: str, flag: str = "config") -> str:
  """One line for an override of a field `config` does not have."""
  near = nearest_fields(config, path)
  if near:
    hint = "did you mean " + " or ".join(f"--{flag}.{p}" for p in near) + "?"
  else:
    parent = path.rpartition(".")[0]
    while parent and not has_field(config, parent):   # the deepest part of the path that exists
      parent = parent.rpartition(".")[0]
    node = _get(config, parent) if parent else config
    names = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
    hint = f"the fields of --{flag}{'.' + parent if parent else ''} are: {', '.join(names)}"
  return f"--{flag}.{path}: the config has no field '{path}'; {hint}"
