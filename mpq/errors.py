"""User-facing errors.

A `UserError` is bad input that the user can fix (a wrong flag, a missing dataset, an empty workdir).
The command-line programs print its message as one line and exit non-zero, without a traceback
unless `--verbose` is given. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input; the message says what is wrong and how to fix it, in one line."""


class DataError(UserError):
  """A dataset file is missing, truncated or not what it claims to be."""


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or does not fit the model."""


class NonFiniteLossError(UserError):
  """Training produced a NaN or infinite loss."""


class Interrupted(Exception):
  """Training stopped on SIGINT/SIGTERM after saving a checkpoint at `step` (None: the signal came
  before training started and nothing was saved). The command-line programs print one line and
  exit with 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

  def __init__(self, signum: int, step: int | None):
    self.signum, self.step = signum, step
    if step is None:
      text = "interrupted before training started; nothing was saved"
    else:
      text = (f"interrupted at step {step}; checkpoint saved; re-run the same command to resume")
    super().__init__(text)
