"""What the command lines (`jaxrecon.main`, `.evaluate`, `.predict`) share: one-line usage errors
with exit status 2, and quiet logs.

`parse_flags` is their `app.run(..., flags_parser=...)`: a bad flag, a config override of a field
the config does not have (with the nearest names), a value of the wrong type or a config file that
cannot be loaded print ``error: ...`` and exit with status 2 instead of a traceback.

`quiet_third_party_logs` hides the INFO lines of other libraries (Orbax writes hundreds per run:
handler registries, device-to-host transfers, background save threads) while keeping jaxrecon's
own INFO lines (the progress line with rate and ETA) and everyone's warnings and errors. Passing
``--verbosity`` (absl's flag, any value: ``--verbosity=0`` is INFO) shows everything again.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import NoReturn

from absl import flags
from absl import logging

from jaxrecon import config_checks

USAGE_ERROR = 2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def usage_error(message: str) -> NoReturn:
  """Print ``error: <message>`` (one line) to stderr and exit with status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


def _config_flag_names(flag_values) -> list[str]:
  return [name for name, flag in flag_values._flags().items()  # pylint: disable=protected-access
          if type(flag).__name__ == "_ConfigFlag"]


def _load_config(argv, name: str):
  """The config `--<name>=PATH` names in argv, loaded again (the flag's own parse failed); None if
  it cannot be."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  path = None
  for i, arg in enumerate(argv):
    match = re.match(rf"^--?{name}(=(.*))?$", arg)
    if match:
      path = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  if not path:
    return None
  try:
    config = config_flags.ConfigFileFlagParser(name=name, lock_config=False).parse(path)
    config.get("")        # a file that failed to load raises here
  except Exception:  # pylint: disable=broad-except
    return None
  return config


def _describe(argv, error: Exception, flag_values) -> str:
  """One line for a failed parse: an unknown config field gets the nearest known names."""
  for name in _config_flag_names(flag_values):
    config = None
    for arg in argv:
      match = re.match(rf"^--?(?:no)?{name}\.([^=]+)", arg)
      if not match:
        continue
      config = config if config is not None else _load_config(argv, name)
      if config is not None and not config_checks.has_field(config, match.group(1)):
        return config_checks.unknown_field_message(config, match.group(1), name)
  text = str(error).strip()
  if isinstance(error, OSError) and "earlier failure to load" in text:
    # ml_collections' message spans lines: keep the file and the reason.
    reasons = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    return f"cannot load the config file: {' '.join(reasons)}"
  return " ".join(text.split()) or type(error).__name__


def parse_flags(argv, flag_values=flags.FLAGS):
  """`flag_values(argv)`, or a one-line usage error (exit 2); for ``app.run(flags_parser=...)``."""
  try:
    return flag_values(argv)
  except Exception as e:  # pylint: disable=broad-except
    # absl raises flags.Error for its own flags; config overrides raise AttributeError / KeyError
    # / OSError (a config file that does not load) from inside ml_collections.
    usage_error(_describe(argv, e, flag_values))


def check_config(config) -> None:
  """`config_checks.check` of a parsed `--config`, as a usage error (a config file that does not
  load is one too)."""
  try:
    config_checks.check(config)
  except config_checks.ConfigError as e:
    usage_error(str(e))
  except OSError as e:     # ml_collections defers a load failure to the first access
    usage_error(_describe([], e, flags.FlagValues()))


class _OwnInfoOnly(std_logging.Filter):
  """Warnings and errors from everyone, INFO (and below) from jaxrecon only."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return record.pathname.startswith(_PACKAGE_DIR) or record.name == "__main__"


_FILTER = _OwnInfoOnly()


def quiet_third_party_logs(flag_values=flags.FLAGS) -> bool:
  """Hide other libraries' INFO lines unless ``--verbosity`` was given; returns whether it did."""
  handler = logging.get_absl_handler()
  if "verbosity" in flag_values and flag_values["verbosity"].present:
    handler.removeFilter(_FILTER)
    return False
  handler.addFilter(_FILTER)
  return True
