"""jaxrecon.config_checks: every shipped config passes; bad values, unknown fields and the
batch/device condition are one-line errors naming the field."""

import importlib
import os

import ml_collections
import pytest

from configs import test as test_config
from jaxrecon import config_checks

_CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
                  if f.endswith(".py") and f != "__init__.py")


@pytest.mark.parametrize("name", _CONFIGS)
def test_shipped_configs_pass(name):
  config_checks.check(importlib.import_module(f"configs.{name}").get_config())


def test_bad_values_are_named_in_one_line():
  config = test_config.get_config()
  config.variance.mode = "fancy"
  config.reduction = "fast"
  config.batch_size = 0
  config.data.image_size = -64
  config.loss_weights.mask = -1.0
  config.optim.learning_rate = 0.0
  config.model.resnet_widths = (4, 0, 8, 8)
  config.model.template_axes = (1.0, 0.0, 1.0)
  config.checkpoint.max_to_keep = 0
  config.loss_steps = {"no_term": (0, None), "mask": (10, 5)}
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check(config)
  message = str(error.value)
  assert "\n" not in message
  for expected in ("config.variance.mode='fancy': must be one of adaptive, paper, none",
                   "config.reduction='fast': must be one of xla, ordered",
                   "config.batch_size=0: must be a positive integer",
                   "config.data.image_size=-64: must be a positive integer",
                   "config.loss_weights.mask=-1.0: must be a number >= 0",
                   "config.optim.learning_rate=0.0: must be a number > 0",
                   "config.model.resnet_widths=(4, 0, 8, 8)",
                   "config.model.template_axes=(1.0, 0.0, 1.0): must be three numbers > 0",
                   "config.checkpoint.max_to_keep=0",
                   "config.loss_steps.no_term=(0, None): is not a loss term",
                   "config.loss_steps.mask=(10, 5): must be (start, stop)"):
    assert expected in message, expected


def test_wrong_types_and_every_mode_string():
  # ConfigDict keeps a field's type; a hand-edited config.json or a plain dict does not.
  config = ml_collections.ConfigDict(test_config.get_config().to_dict(), type_safe=False)
  config.batch_size = "16"
  config.log_every = True
  for path in ("stage", "gan_input", "model.camera_init", "template.labelling", "weights.perceptual_net",
               "data.dataset", "variance.combine", "deform_reference"):
    parent, _, leaf = path.rpartition(".")
    (config[parent] if parent else config)[leaf] = "nope"
  message = "; ".join(config_checks.problems(config))
  assert "config.batch_size='16': must be a positive integer" in message
  assert "config.log_every=True: must be a positive integer" in message
  for path in ("stage", "gan_input", "model.camera_init", "template.labelling", "weights.perceptual_net",
               "data.dataset", "variance.combine", "deform_reference"):
    assert f"config.{path}='nope': must be one of" in message, path


def test_pipeline_names_the_stage():
  config = importlib.import_module("configs.synthetic_pipeline").get_config()
  config.stage2.loss_weights.part_chamfer = -1.0
  with pytest.raises(config_checks.ConfigError, match=r"^config.stage2.loss_weights.part_chamfer=-1.0: "):
    config_checks.check(config)


def test_batch_must_split_over_the_devices():
  config_checks.check_devices(16, 8)
  with pytest.raises(config_checks.ConfigError,
                     match=r"config.batch_size=12 must be divisible by the 8 devices \(1 process\(es\)\): "
                           r"e.g. --config.batch_size=16"):
    config_checks.check_devices(12, 8, 1)


@pytest.mark.parametrize("given, suggested", [
    ("batchsize", "did you mean --config.batch_size?"),
    ("feature_dim", "did you mean --config.model.feature_dim?"),          # at the wrong level
    ("model.feature_dims", "did you mean --config.model.feature_dim?"),
    ("modle.feature_dim", "did you mean --config.model.feature_dim?"),
    ("optim.lr", "the fields of --config.optim are: decay, gradient_penalty, learning_rate"),
    ("no_such_key", "the fields of --config are: batch_size, camera_selection, checkpoint,"),
])
def test_unknown_field_names_the_nearest(given, suggested):
  config = test_config.get_config()
  assert not config_checks.has_field(config, given)
  message = config_checks.unknown_field_message(config, given)
  assert message.startswith(f"--config.{given}: the config has no field '{given}'; ")
  assert suggested in message
