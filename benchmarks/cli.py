"""Command-line helpers shared by the benchmark scripts."""

from __future__ import annotations

import sys


def select_rows(spec: str, allowed) -> list[str]:
  """The rows named in a comma-separated `--rows` value; exits with a one-line error naming any
  unknown row and the allowed ones."""
  allowed = list(allowed)
  names = [n for n in spec.split(",") if n]
  unknown = [n for n in names if n not in allowed]
  if unknown:
    sys.exit(f"error: unknown rows {unknown}; choose from {allowed}")
  return names
