"""Rounding rules, one function per rule, for NumPy and JAX arrays alike (a leaf module).

  half_up     `floor(v + 1/2)`: ties toward +inf. gemmlowp's fixed-point multiply rounds this way,
              and so does everything in mpq's own target (quantizers, biases, calibration), so that
              evaluation and the integer executor agree on exact ties (common with power-of-two
              scales).
  half_even   ties to the even integer (IEEE default; `np.round`, `jnp.round`, ONNX Runtime's
              QuantizeLinear).
  half_away   ties away from zero (C `round`, TFLite's `TfLiteRound` and `QuantizeMultiplier`).

Each is exact: the fractional part `v - floor(v)` is computed exactly in floating point, so no
value near a tie is pushed across it (`0.49999997 + 0.5 == 1.0` in float32, yet
`half_up(0.49999997) == 0`). `RULES` maps the names that targets use to the functions.
"""

from __future__ import annotations

import numpy as np


def _xp(v):
  """The array namespace of `v`: NumPy for NumPy arrays and Python numbers, else jax.numpy."""
  if isinstance(v, (np.ndarray, np.generic, float, int)):
    return np
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp


def half_up(v):
  """`floor(v + 1/2)`, as `floor(v) + (v - floor(v) >= 1/2)`."""
  xp = _xp(v)
  f = xp.floor(v)
  return f + (v - f >= 0.5).astype(f.dtype)


def half_even(v):
  """Round half to even."""
  return _xp(v).round(v)


def half_away(v):
  """Round half away from zero: `sign(v) floor(|v| + 1/2)`."""
  xp = _xp(v)
  return xp.sign(v) * half_up(xp.abs(v))


RULES = {"half_up": half_up, "half_even": half_even, "half_away": half_away}
