"""The deploy extra's packages (ai-edge-litert, flatbuffers, onnx, onnxruntime), imported on first
use: training, allocation, the mpq format and its executor never import them, and a missing one is
a one-line `UserError` that names the extra to install."""

from __future__ import annotations

import importlib

from mpq.errors import UserError

INSTALL_HINT = "install the deploy extra: pip install -e '.[deploy]'"


def require(*modules: str, what: str):
  """Imports `modules` and returns the first; `what` says what needs them (e.g. "running .tflite
  models needs ai-edge-litert") in the error when one is missing."""
  try:
    loaded = [importlib.import_module(m) for m in modules]
  except ImportError as e:
    raise UserError(f"{what}; {INSTALL_HINT}") from e
  return loaded[0]
