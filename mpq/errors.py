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
