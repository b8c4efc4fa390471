"""Shared plumbing of `train.py` and `eval.py`: one-line errors and flag parsing.

Bad input (a `UserError`, or a flag/config override that does not parse) prints `error: ...` on one
line and exits with status 2; `--verbose` shows the traceback instead.
"""

from __future__ import annotations

import logging as pylogging
import os
import signal
import sys

from absl import flags, logging

from mpq.errors import Interrupted, UserError

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
  """Wraps `main(argv)`: a UserError becomes a one-line message and exit status 2, and so does an
  OSError (`error: PATH: reason`: a path that the up-front checks could not foresee, e.g. a disk
  that filled up); an interrupt (`Interrupted`, or a KeyboardInterrupt outside the training loop)
  prints one line and exits with 128 + the signal number."""

  def wrapped(argv):
    if not flags.FLAGS.verbose:
      logging.set_verbosity(logging.ERROR)  # orbax and absl are chatty at INFO/WARNING
      pylogging.getLogger().setLevel(pylogging.ERROR)  # orbax also logs through `logging`
    try:
      return main(argv)
    except Interrupted as e:  # not an error: the run stopped where it was asked to
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(128 + e.signum)
    except KeyboardInterrupt:  # before the training loop, or a second Ctrl-C inside it
      fail("interrupted; nothing was saved by this interrupt; re-run the same command to resume "
           "from the last checkpoint (if any)", 128 + signal.SIGINT)
    except UserError as e:
      if flags.FLAGS.verbose:
        raise
      fail(str(e))
    except OSError as e:
      if flags.FLAGS.verbose:
        raise
      fail(f"{e.filename}: {e.strerror or e}" if e.filename else f"{e.strerror or e}")

  return wrapped


def quiet_jax_logs() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
