"""Shared plumbing of `train.py` and `eval.py`: one-line errors and flag parsing.

Bad input (a `UserError`, or a flag/config override that does not parse) prints `error: ...` on one
line and exits with status 2; `--verbose` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from mpq.errors import UserError

flags.DEFINE_bool("verbose", False, "Show tracebacks for errors.")


def _verbose(argv) -> bool:
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _flag_error_message(e: Exception) -> str:
  text = " ".join(str(e).split())
  if isinstance(e, (KeyError, AttributeError)):
    # ml_collections raises AttributeError("'key'") for an override of a key the config lacks.
    key = str(e).strip("\"'")
    return f"unknown config key {key!r}; the fields are listed in mpq/config.py and the config file"
  if isinstance(e, OSError):
    return f"cannot load the config file: {text}"
  if isinstance(e, flags.Error):
    return text
  return f"bad --config: {text}"  # TypeError/ValueError/SyntaxError: wrong types, broken files


def parse_flags(argv):
  """absl flag parsing with one-line errors (config files and overrides are parsed here too)."""
  try:
    parsed = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
      flags.FLAGS.config.to_dict()  # config_flags defers a load failure to the first access
    return parsed
  except (KeyError, AttributeError, OSError, flags.Error, TypeError, ValueError, SyntaxError) as e:
    if _verbose(argv):
      raise
    fail(_flag_error_message(e))


def guarded(main):
  """Wraps `main(argv)` so that a UserError becomes a one-line message and exit status 2."""

  def wrapped(argv):
    if not flags.FLAGS.verbose:
      logging.set_verbosity(logging.ERROR)  # orbax and absl are chatty at INFO/WARNING
    try:
      return main(argv)
    except UserError as e:
      if flags.FLAGS.verbose:
        raise
      fail(str(e))

  return wrapped


def quiet_jax_logs() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
