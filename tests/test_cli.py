"""jaxrecon.cli: flag and config-override errors are one line with exit status 2; other libraries'
INFO logs are hidden unless --verbosity is given."""

import logging
import os

from absl import flags
from absl import logging as absl_logging
import pytest
from ml_collections import config_flags

from jaxrecon import cli

_TEST_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "test.py")


def _parse(capsys, *args):
  """(exit status or None, stderr) of parsing `args` with a config flag, as jaxrecon.main does."""
  argv = ["prog", f"--config={_TEST_CONFIG}", *args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("steps", 1, "", flag_values=values)
  try:
    cli.parse_flags(argv, values)
  except SystemExit as e:
    return e.code, capsys.readouterr().err
  return None, capsys.readouterr().err


@pytest.mark.parametrize("arg, message", [
    ("--config.batchsize=3", "--config.batchsize: the config has no field 'batchsize'; did you mean "
                             "--config.batch_size?"),
    ("--config.model.feature_dims=3", "did you mean --config.model.feature_dim?"),
    ("--config.batch_size=abc", "flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    ("--steps=x", "flag --steps=x: invalid literal for int() with base 10: 'x'"),
    ("--no_such_flag", "Unknown command line flag 'no_such_flag'"),
])
def test_usage_errors_are_one_line_with_status_2(capsys, arg, message):
  status, err = _parse(capsys, arg)
  assert status == 2
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err


def test_good_overrides_parse(capsys):
  assert _parse(capsys, "--config.batch_size=16", "--steps=3") == (None, "")


def test_check_config_reports_values_and_unloadable_files(capsys, tmp_path):
  values = flags.FlagValues()
  argv = ["prog", f"--config={tmp_path}/missing.py"]
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  values(argv)                     # ml_collections defers the load failure to the first access
  with pytest.raises(SystemExit) as exit_info:
    cli.check_config(values.config)
  assert exit_info.value.code == 2
  assert "error: cannot load the config file:" in capsys.readouterr().err


def _record(path, level=logging.INFO):
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_quiet_logs_keep_ours_and_every_warning():
  values = flags.FlagValues()
  flags.DEFINE_integer("verbosity", 0, "", flag_values=values)
  values(["prog"])
  handler = absl_logging.get_absl_handler()
  try:
    assert cli.quiet_third_party_logs(values)
    ours = os.path.join(os.path.dirname(cli.__file__), "train.py")
    assert handler.filter(_record(ours))
    assert not handler.filter(_record("/site-packages/orbax/checkpoint/checkpoint_manager.py"))
    assert handler.filter(_record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.WARNING))
    values(["prog", "--verbosity=0"])           # given explicitly: everything again
    assert not cli.quiet_third_party_logs(values)
    assert handler.filter(_record("/site-packages/orbax/checkpoint/checkpoint_manager.py"))
  finally:
    handler.removeFilter(cli._FILTER)  # pylint: disable=protected-access
