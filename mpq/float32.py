"""Exact IEEE float32 arithmetic in NumPy, for transcribing runtimes that requantize in float32
(ONNX Runtime's QLinear ops, XNNPACK): each function rounds exactly where the runtime's kernel
rounds, so a NumPy model of a kernel built from them matches it bit for bit. No JAX, no runtime
imports: the executor's kernels use them on the host to tabulate float rules exactly (see
`mpq.ops.add.AddGridIR`)."""

from __future__ import annotations

import numpy as np


def f32(x):
  """Round to float32 (and keep it float32)."""
  return np.float32(x) if np.ndim(x) == 0 else np.asarray(x, np.float32)


def rint_f32(v):
  """float32 round half to even (x86 `cvtps2dq` in the default MXCSR mode, `nearbyintf`), as int64."""
  return np.rint(np.asarray(v, np.float32)).astype(np.int64)


def fma_f32(a, b, c):
  """float32 `a * b + c` with one rounding (`vfmadd` of the AVX2 kernels), exactly: the product of
  two float32 values is exact in float64, the float64 sum's rounding error is recovered (TwoSum)
  and the sum rounded to odd before the final rounding to float32, which then rounds correctly
  (53 > 2 * 24 + 2 bits)."""
  p = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
  c = np.asarray(c, np.float32).astype(np.float64)
  s = p + c
  bp = s - c
  err = (p - bp) + (c - (s - bp))
  bits = s.view(np.int64) if isinstance(s, np.ndarray) else np.float64(s).view(np.int64)
  inexact = (err != 0) & ((bits & 1) == 0)
  away = np.sign(err) == np.sign(s)  # the exact sum lies farther from zero than s
  bits = np.where(inexact, np.where(away, bits + 1, bits - 1), bits)
  return np.asarray(bits, np.int64).view(np.float64).astype(np.float32)
