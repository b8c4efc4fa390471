"""ONNX Runtime's integer rule for each op the onnx export will use (issue 15 (a), the ORT half).

For every op: small ONNX models (`mpq.export.onnx_builder`) with random and tie-heavy quantization
parameters run in the real runtime (CPU execution provider) at optimization levels ORT_DISABLE_ALL
and ORT_ENABLE_ALL with 1 and 2 intra-op threads, and every output is compared with the NumPy rule
of `mpq.export.ort_rules`. The QDQ forms (DequantizeLinear -> Conv -> QuantizeLinear) are also run
at every level, recording which kernels ORT ran after optimization (whether it fused them into
QLinearConv) and how far the unfused float path is from the integer rule. Writes
`results/ort_rules.json`.

    python benchmarks/ort_rules.py [--configs 12] [--outputs 50000] [--out benchmarks/results/ort_rules.json]

Scale regimes: `random` (log-uniform scales, random zero points) and `ties` (power-of-two scales and
scale ratios, power-of-two reduction counts and inputs on exact half steps, so that exact ties are
common). `tests/test_ort_rules.py` runs the same cases smaller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.export import onnx_builder as ob  # noqa: E402
from mpq.export import ort_rules as R  # noqa: E402

LEVELS = ("disable", "all")  # where every rule is compared
THREADS = (1, 2)
FUSION_LEVELS = tuple(ob.LEVELS)  # where the QDQ forms' kernels are listed


@dataclasses.dataclass
class Case:
  """One model, its inputs, the rule's name and expected output; `exact_at`: the levels where the
  runtime must match the rule (all of `ob.LEVELS` for QLinear ops; the fused levels for QDQ forms;
  none where ORT runs a float path)."""
  op: str
  variant: str
  regime: str
  model: bytes
  inputs: list
  rule: str
  expected: np.ndarray
  params: dict
  exact_at: tuple = tuple(ob.LEVELS)
  qdq: bool = False  # a QDQ form: list the kernels at every level
  alternatives: dict = dataclasses.field(default_factory=dict)  # rejected rule -> its output


# -- rejected candidate rules (each differs from the runtime somewhere; counted in the JSON) -------
def _alt_quantize_reciprocal(x, s, z, out_range):
  """QuantizeLinear as `rint(x * f32(1 / s)) + z` (a multiply by the reciprocal)."""
  v = R.f32(R.f32(x) * R.f32(np.float32(1) / np.float32(s)))
  return np.clip(R.rint_f32(v) + z, *out_range)


def _alt_add_reference(a, z_a, s_a, b, z_b, s_b, s_c, z_c):
  """QLinearAdd as its documented formula in float32 (MLAS's scalar fallback):
  `rint(f32(f32(s_a (a - z_a)) + f32(s_b (b - z_b))) / s_c) + z_c`."""
  va = R.f32(np.float32(s_a) * R.f32(np.asarray(a, np.int64) - z_a))
  vb = R.f32(np.float32(s_b) * R.f32(np.asarray(b, np.int64) - z_b))
  return np.clip(R.rint_f32(R.f32(R.f32(va + vb) / np.float32(s_c))) + z_c, *R.U8)


def _alt_add_sse2(a, z_a, s_a, b, z_b, s_b, s_c, z_c):
  """QLinearAdd as MLAS's SSE2 kernel (no FMA): `rint(f32(f32(k + f32(a r_a)) + f32(b r_b)))`."""
  r_a, r_b = R.f32(np.float32(s_a) / np.float32(s_c)), R.f32(np.float32(s_b) / np.float32(s_c))
  k = R.f32(np.float32(z_c) - R.f32(R.f32(r_a * np.float32(z_a)) + R.f32(r_b * np.float32(z_b))))
  v = R.f32(R.f32(k + R.f32(R.f32(a) * r_a)) + R.f32(R.f32(b) * r_b))
  return np.clip(R.rint_f32(v), *R.U8)


def _alt_add_constant(a, z_a, s_a, b, z_b, s_b, s_c, z_c, contract="none"):
  """QLinearAdd as `qlinear_add` but with the constant `k` not contracted to an FMA
  (`f32(z_c - f32(f32(r_a z_a) + f32(r_b z_b)))`), or with the second product fused (`"b"`)."""
  r_a, r_b = R.f32(np.float32(s_a) / np.float32(s_c)), R.f32(np.float32(s_b) / np.float32(s_c))
  pa, pb = R.f32(r_a * np.float32(z_a)), R.f32(r_b * np.float32(z_b))
  fixed = R.fma_f32(r_b, np.float32(z_b), pa) if contract == "b" else R.f32(pa + pb)
  k = R.f32(np.float32(z_c) - fixed)
  v = R.fma_f32(R.f32(a), r_a, R.fma_f32(R.f32(b), r_b, k))
  return np.clip(R.rint_f32(v), *R.U8)


def _alt_gap_scale_order(q, z_x, s_x, s_y, z_y, channels_last):
  """QLinearGlobalAveragePool with the older MLAS scale `f32(f32(s_x / n) / s_y)`."""
  q = np.asarray(q, np.int64)
  axes = (1, 2) if channels_last else (2, 3)
  n = int(np.prod([q.shape[a] for a in axes]))
  scale = R.f32(R.f32(np.float32(s_x) / np.float32(n)) / np.float32(s_y))
  return R.requantize(q.sum(axis=axes, keepdims=True) - z_x * n, scale, z_y)


def _alt_scale_double(s_x, s_w, s_y):
  """The rescale as TFLite derives it: `f32(double(s_x) double(s_w) / double(s_y))`."""
  return (np.float64(np.float32(s_x)) * np.asarray(s_w, np.float32).astype(np.float64)
          / np.float64(np.float32(s_y))).astype(np.float32)


# -- quantization parameters ------------------------------------------------------------------------
def _log_uniform(rng, lo, hi):
  return float(np.float32(10 ** rng.uniform(np.log10(lo), np.log10(hi))))


def _pow2(rng, lo, hi):
  return float(2.0 ** -int(rng.integers(lo, hi + 1)))


def _u8(rng, shape):
  return rng.integers(0, 256, shape).astype(np.uint8)


def _zp(rng):
  return int(rng.integers(0, 256))


def _out_scale(rng, regime, acc, s_acc):
  """An output scale that spreads `acc * s_acc` over about +-100 steps (ties: a power of two)."""
  spread = float(np.std(acc * s_acc)) + 1e-12
  if regime == "ties":
    return float(2.0 ** np.round(np.log2(spread / 40)))
  return float(np.float32(spread / 40 * 10 ** rng.uniform(-0.2, 0.2)))


def _c(b, v, dtype="float32"):
  return b.const(None, v, dtype)


# -- cases --------------------------------------------------------------------------------------------
def case_quantize(rng, regime, n, out_dtype="uint8"):
  """QuantizeLinear float32 -> uint8 (int8), per tensor, n elements including out-of-range values.
  `ties`: half of the models a power-of-two scale with inputs on exact half steps, half a random
  scale with inputs the float32 products (k + 1/2) s (near ties, where dividing and multiplying
  by 1/s differ)."""
  lo, hi = R.U8 if out_dtype == "uint8" else R.I8
  z = _zp(rng) if out_dtype == "uint8" else int(rng.integers(-128, 128))
  if regime == "ties":
    s = _pow2(rng, 2, 12) if rng.random() < 0.5 else _log_uniform(rng, 1e-3, 1.0)
    x = f32mul(rng.integers(-300, 300, n) + 0.5, s)
  else:
    s = _log_uniform(rng, 1e-3, 1.0)
    x = (rng.standard_normal(n) * s * 90).astype(np.float32)
  b = ob.OnnxBuilder()
  xin = b.input("x", [n], "float32")
  b.output(b.node("QuantizeLinear", [xin, _c(b, s), _c(b, z, out_dtype)], ["y"]), out_dtype, [n])
  return Case("QuantizeLinear", f"float32->{out_dtype}", regime, b.finish(), [x],
              "quantize_linear", R.quantize_linear(x, s, z, (lo, hi)), dict(s=s, z=z),
              alternatives={"multiply by f32(1/s)": _alt_quantize_reciprocal(x, s, z, (lo, hi))})


def f32mul(k, s):
  return (np.asarray(k, np.float32) * np.float32(s)).astype(np.float32)


def case_dequantize(rng, regime, n):
  """DequantizeLinear uint8 -> float32 (the logits), per tensor; compared bit for bit."""
  s = _pow2(rng, 2, 12) if regime == "ties" else _log_uniform(rng, 1e-4, 1.0)
  z = _zp(rng)
  q = _u8(rng, (n,))
  b = ob.OnnxBuilder()
  x = b.input("x", [n], "uint8")
  b.output(b.node("DequantizeLinear", [x, _c(b, s), _c(b, z, "uint8")], ["y"]), "float32", [n])
  return Case("DequantizeLinear", "uint8->float32", regime, b.finish(), [q], "dequantize_linear",
              R.dequantize_linear(q, s, z), dict(s=s, z=z))


def case_dequantize_int4(rng, regime, n):
  """Opset-21 DequantizeLinear of an INT4 initializer [O, K], per-axis scales (axis 0), added to a
  float32 zero input (INT4 cannot be a graph input); compared bit for bit."""
  o = int(rng.integers(2, 64))
  k = max(1, n // o)
  w = rng.integers(-8, 8, (o, k))
  s = np.array([_pow2(rng, 2, 12) if regime == "ties" else _log_uniform(rng, 1e-4, 1.0)
                for _ in range(o)], np.float32)
  b = ob.OnnxBuilder()
  zero = b.input("zero", [o, k], "float32")
  dq = b.node("DequantizeLinear", [b.const("w", w, "int4"), _c(b, s)], axis=0)
  b.output(b.node("Add", [dq, zero], ["y"]), "float32", [o, k])
  return Case("DequantizeLinear", "int4 initializer, per-axis", regime, b.finish(),
              [np.zeros((o, k), np.float32)], "dequantize_linear",
              R.dequantize_linear(w, s, 0, axis=0) + np.float32(0), dict(o=o, k=k))


def _conv_shape(rng, kind, n_out):
  """(N, C, H, W), O, group, kernel, strides, pads for a conv of `kind` with about n_out outputs."""
  c = int(rng.integers(1, 48))
  k = int(rng.choice([1, 3, 5])) if kind != "depthwise" else int(rng.choice([3, 5]))
  if kind == "depthwise":
    o, group = c, c
  elif kind == "grouped":
    group = int(rng.choice([2, 4]))
    c = group * int(rng.integers(1, 12))
    o, group = group * int(rng.integers(1, 12)), group
  else:
    o, group = int(rng.integers(1, 48)), 1
  h, w = [int(rng.integers(max(k, 3), 16)) for _ in range(2)]
  st = [int(rng.integers(1, 3))] * 2
  p = k // 2 if rng.random() < 0.7 else 0
  pads = [p, p, p, p]
  oh = (h + 2 * p - k) // st[0] + 1
  ow = (w + 2 * p - k) // st[1] + 1
  nb = max(1, n_out // (o * oh * ow))
  return (nb, c, h, w), o, group, k, st, pads


def _weight_scales(rng, regime, o):
  if regime == "ties":
    return (2.0 ** -rng.integers(4, 10, o)).astype(np.float32)
  return (10 ** rng.uniform(-3, -1, o)).astype(np.float32)


def _weights(b, w, wdtype, n):
  """The weight constant and its `n` per-channel zero points as the file stores them: `uint8`
  `w + 128` with zero point 128 (how the onnx target writes weights: exact on every CPU), or `int8`
  `w` with zero point 0 (MLAS's uint8 x int8 kernels saturate int16 pair sums on x86 without VNNI)."""
  if wdtype == "uint8":
    return (b.const("w", np.asarray(w) + 128, "uint8"),
            _c(b, np.full(n, 128, np.int64), "uint8"))
  return b.const("w", w, wdtype), _c(b, np.zeros(n, np.int64), wdtype)


def case_qlinear_conv(rng, regime, n_out, kind="dense", wdtype="uint8"):
  """QLinearConv uint8 x per-output-channel weights (symmetric; stored as `wdtype`, `_weights`),
  int32 bias; `kind`: dense, depthwise (group = C) or grouped."""
  xshape, o, group, k, st, pads = _conv_shape(rng, kind, n_out)
  c = xshape[1]
  w = rng.integers(-127, 128, (o, c // group, k, k))
  s_x = _pow2(rng, 3, 8) if regime == "ties" else _log_uniform(rng, 1e-3, 0.1)
  s_w = _weight_scales(rng, regime, o)
  z_x, z_y = _zp(rng), _zp(rng)
  bias = rng.integers(-20000, 20000, o)
  q = _u8(rng, xshape)
  conv = dict(strides=st, pads=pads, group=group)
  acc = R.conv_accumulator(q, z_x, w, bias, **conv)
  s_y = _out_scale(rng, regime, acc, np.float32(s_x) * s_w.reshape(1, -1, 1, 1))
  exp = R.qlinear_conv(q, z_x, s_x, w, s_w, s_y, z_y, bias, **conv)
  b = ob.OnnxBuilder()
  x = b.input("x", list(xshape), "uint8")
  wc, wz = _weights(b, w, wdtype, o)
  y = b.node("QLinearConv", [x, _c(b, s_x), _c(b, z_x, "uint8"), wc, _c(b, s_w), wz, _c(b, s_y),
                             _c(b, z_y, "uint8"), _c(b, bias, "int32")], ["y"],
             kernel_shape=[k, k], **conv)
  b.output(y, "uint8", list(exp.shape))
  alt = R.requantize(acc, _alt_scale_double(s_x, s_w, s_y).reshape(1, -1, 1, 1), z_y)
  return Case("QLinearConv", f"{kind}, {wdtype} w", regime, b.finish(), [q], "qlinear_conv", exp,
              dict(xshape=list(xshape), o=o, group=group, k=k, s_x=s_x, s_y=s_y, z_x=z_x, z_y=z_y),
              alternatives={"scale in double (TFLite's)": alt})


def _matmul_params(rng, regime, n_out, bias=True):
  kdim = int(rng.integers(8, 300))
  n = int(rng.integers(4, 100))
  m = max(1, n_out // n)
  w = rng.integers(-127, 128, (kdim, n))
  s_a = _pow2(rng, 3, 8) if regime == "ties" else _log_uniform(rng, 1e-3, 0.1)
  s_w = _weight_scales(rng, regime, n)
  z_a, z_y = _zp(rng), _zp(rng)
  c = rng.integers(-20000, 20000, n) if bias else None
  q = _u8(rng, (m, kdim))
  acc = R.matmul_accumulator(q, z_a, w, 0, c)
  s_y = _out_scale(rng, regime, acc, np.float32(s_a) * s_w)
  return q, w, s_a, s_w, z_a, z_y, c, s_y


def case_qlinear_matmul(rng, regime, n_out, wdtype="uint8"):
  """QLinearMatMul uint8 [M, K] x [K, N] weights (`_weights`) with per-column scales (no bias)."""
  q, w, s_a, s_w, z_a, z_y, _, s_y = _matmul_params(rng, regime, n_out, bias=False)
  exp = R.qlinear_matmul(q, z_a, s_a, w, s_w, s_y, z_y)
  b = ob.OnnxBuilder()
  x = b.input("x", list(q.shape), "uint8")
  wc, wz = _weights(b, w, wdtype, len(s_w))
  y = b.node("QLinearMatMul", [x, _c(b, s_a), _c(b, z_a, "uint8"), wc, _c(b, s_w), wz, _c(b, s_y),
                               _c(b, z_y, "uint8")], ["y"])
  b.output(y, "uint8", list(exp.shape))
  return Case("QLinearMatMul", f"per-column, {wdtype} w", regime, b.finish(), [q], "qlinear_matmul", exp,
              dict(shape=[*q.shape, w.shape[1]], s_a=s_a, s_y=s_y))


def case_qgemm(rng, regime, n_out, wdtype="uint8"):
  """com.microsoft QGemm uint8 [M, K] x [K, N] weights (`_weights`), per-column scales, int32 bias
  C [N] (the dense head with its bias)."""
  q, w, s_a, s_w, z_a, z_y, c, s_y = _matmul_params(rng, regime, n_out)
  exp = R.qlinear_matmul(q, z_a, s_a, w, s_w, s_y, z_y, bias=c)
  b = ob.OnnxBuilder()
  x = b.input("x", list(q.shape), "uint8")
  wc, wz = _weights(b, w, wdtype, len(s_w))
  y = b.node("QGemm", [x, _c(b, s_a), _c(b, z_a, "uint8"), wc, _c(b, s_w), wz, _c(b, c, "int32"),
                       _c(b, s_y), _c(b, z_y, "uint8")], ["y"])
  b.output(y, "uint8", list(exp.shape))
  return Case("com.microsoft.QGemm", f"per-column+bias, {wdtype} w", regime, b.finish(), [q], "qlinear_matmul",
              exp, dict(shape=[*q.shape, w.shape[1]], s_a=s_a, s_y=s_y))


def case_qlinear_add(rng, regime, n_out):
  """com.microsoft QLinearAdd of two uint8 tensors of one shape (the residual add)."""
  if regime == "ties":
    s_c = _pow2(rng, 2, 10)
    s_a, s_b = [s_c * 2.0 ** int(rng.integers(-2, 3)) for _ in range(2)]
  else:
    s_a, s_b, s_c = [_log_uniform(rng, 1e-3, 0.1) for _ in range(3)]
  z_a, z_b, z_c = _zp(rng), _zp(rng), _zp(rng)
  c = int(rng.integers(1, 64))
  h, w = [int(rng.integers(1, 16)) for _ in range(2)]
  shape = [max(1, n_out // (c * h * w)), c, h, w]
  qa, qb = _u8(rng, shape), _u8(rng, shape)
  exp = R.qlinear_add(qa, z_a, s_a, qb, z_b, s_b, s_c, z_c)
  b = ob.OnnxBuilder()
  a, bb = b.input("a", shape, "uint8"), b.input("b", shape, "uint8")
  y = b.node("QLinearAdd", [a, _c(b, s_a), _c(b, z_a, "uint8"), bb, _c(b, s_b), _c(b, z_b, "uint8"),
                            _c(b, s_c), _c(b, z_c, "uint8")], ["y"])
  b.output(y, "uint8", shape)
  args = (qa, z_a, s_a, qb, z_b, s_b, s_c, z_c)
  return Case("com.microsoft.QLinearAdd", "same-shape", regime, b.finish(), [qa, qb], "qlinear_add",
              exp, dict(shape=shape, s=[s_a, s_b, s_c], z=[z_a, z_b, z_c]),
              alternatives={"documented formula (float32)": _alt_add_reference(*args),
                            "SSE2 kernel (no FMA)": _alt_add_sse2(*args),
                            "constant not contracted": _alt_add_constant(*args),
                            "constant, second product fused": _alt_add_constant(*args, "b")})


def case_gap(rng, regime, n_out, channels_last=False):
  """com.microsoft QLinearGlobalAveragePool uint8, NCHW or NHWC (`channels_last`)."""
  if regime == "ties":
    h, w = [int(2 ** rng.integers(0, 4)) for _ in range(2)]
    s_x = _pow2(rng, 3, 8)
    s_y = s_x * 2.0 ** int(rng.integers(-2, 3))
  else:
    h, w = [int(rng.integers(1, 15)) for _ in range(2)]
    s_x = _log_uniform(rng, 1e-3, 0.1)
    s_y = _log_uniform(rng, s_x / 6, s_x * 6)
  c = int(rng.integers(1, 80))
  nb = max(1, n_out // c)
  shape = [nb, h, w, c] if channels_last else [nb, c, h, w]
  z_x, z_y = _zp(rng), _zp(rng)
  q = _u8(rng, shape)
  exp = R.qlinear_global_average_pool(q, z_x, s_x, s_y, z_y, channels_last)
  b = ob.OnnxBuilder()
  x = b.input("x", shape, "uint8")
  y = b.node("QLinearGlobalAveragePool", [x, _c(b, s_x), _c(b, z_x, "uint8"), _c(b, s_y),
                                          _c(b, z_y, "uint8")], ["y"], channels_last=int(channels_last))
  b.output(y, "uint8", list(exp.shape))
  return Case("com.microsoft.QLinearGlobalAveragePool", "NHWC" if channels_last else "NCHW", regime,
              b.finish(), [q], "qlinear_global_average_pool", exp,
              dict(shape=shape, n=h * w, s_x=s_x, s_y=s_y, z_x=z_x, z_y=z_y),
              alternatives={"scale f32(f32(s_x / n) / s_y)":
                            _alt_gap_scale_order(q, z_x, s_x, s_y, z_y, channels_last)})


def case_max_pool(rng, regime, n_out):
  """MaxPool on uint8 NCHW: 2x2 or 3x3 windows, strides 1-2, with or without padding."""
  k = int(rng.integers(2, 4))
  st = [int(rng.integers(1, 3))] * 2
  p = int(rng.integers(0, 2)) if k == 3 else 0
  c = int(rng.integers(1, 32))
  h, w = [int(rng.integers(k, 20)) for _ in range(2)]
  probe = R.max_pool(np.zeros((1, 1, h, w), np.uint8), (k, k), st, [p] * 4)
  shape = [max(1, n_out // (c * probe.size)), c, h, w]
  q = _u8(rng, shape)
  exp = R.max_pool(q, (k, k), st, [p] * 4)
  b = ob.OnnxBuilder()
  x = b.input("x", shape, "uint8")
  b.output(b.node("MaxPool", [x], ["y"], kernel_shape=[k, k], strides=st, pads=[p] * 4), "uint8",
           list(exp.shape))
  return Case("MaxPool", f"{k}x{k}", regime, b.finish(), [q], "max_pool", exp,
              dict(k=k, strides=st, pad=p))


def case_clip(rng, regime, n_out):
  """Clip uint8 with uint8 bounds: a 4-bit or 2-bit grid placed anywhere in [0, 255]."""
  bits = int(rng.choice([2, 4]))
  lo = int(rng.integers(0, 256 - 2 ** bits + 1))
  hi = lo + 2 ** bits - 1
  q = _u8(rng, (max(1, n_out // 64), 64))
  b = ob.OnnxBuilder()
  x = b.input("x", list(q.shape), "uint8")
  b.output(b.node("Clip", [x, _c(b, lo, "uint8"), _c(b, hi, "uint8")], ["y"]), "uint8",
           list(q.shape))
  return Case("Clip", f"{bits}-bit grid", regime, b.finish(), [q], "clip", R.clip(q, lo, hi),
              dict(lo=lo, hi=hi))


def case_reshape(rng, regime, n_out, op="Reshape"):
  """Reshape (to [N, C H W]) or Flatten (axis 1) of uint8 NCHW: the flatten before the dense head."""
  c, h, w = [int(rng.integers(1, 9)) for _ in range(3)]
  nb = max(1, n_out // (c * h * w))
  q = _u8(rng, (nb, c, h, w))
  b = ob.OnnxBuilder()
  x = b.input("x", list(q.shape), "uint8")
  if op == "Reshape":
    y = b.node("Reshape", [x, _c(b, np.array([nb, c * h * w]), "int64")], ["y"])
  else:
    y = b.node("Flatten", [x], ["y"], axis=1)
  b.output(y, "uint8", [nb, c * h * w])
  return Case(op, "NCHW->NK", regime, b.finish(), [q], "reshape",
              R.reshape(q, (nb, c * h * w)).astype(np.int64), dict(shape=list(q.shape)))


def case_qdq_conv(rng, regime, n_out, act="uint8", wdtype="uint8"):
  """The QDQ form DequantizeLinear(x) -> Conv(DequantizeLinear(w, per-channel), DequantizeLinear(bias
  int32, scale s_x s_w)) -> QuantizeLinear, with `act` activations (uint8: zero point + 128 for
  mpq's signed grid; int8: mpq's grid as is) and `wdtype` weights (uint8 or int8 as `_weights`
  stores them, or opset-21 int4). The
  rule is QLinearConv's; ORT matches it only where it fuses the pattern."""
  xshape, o, group, k, st, pads = _conv_shape(rng, "dense" if rng.random() < 0.7 else "depthwise",
                                              n_out)
  c = xshape[1]
  wlim = 7 if wdtype == "int4" else 127
  w = rng.integers(-wlim, wlim + 1, (o, c // group, k, k))
  s_x = _pow2(rng, 3, 8) if regime == "ties" else _log_uniform(rng, 1e-3, 0.1)
  s_w = _weight_scales(rng, regime, o)
  if act == "uint8":
    z_x, z_y, rng_out = _zp(rng), _zp(rng), R.U8
    q = _u8(rng, xshape)
  else:
    z_x, z_y, rng_out = int(rng.integers(-128, 128)), int(rng.integers(-128, 128)), R.I8
    q = rng.integers(-128, 128, xshape).astype(np.int8)
  bias = rng.integers(-20000, 20000, o)
  conv = dict(strides=st, pads=pads, group=group)
  acc = R.conv_accumulator(q, z_x, w, bias, **conv)
  s_y = _out_scale(rng, regime, acc, np.float32(s_x) * s_w.reshape(1, -1, 1, 1))
  exp = R.qlinear_conv(q, z_x, s_x, w, s_w, s_y, z_y, bias, out_range=rng_out, **conv)
  b = ob.OnnxBuilder()
  x = b.input("x", list(xshape), act)
  xf = b.node("DequantizeLinear", [x, _c(b, s_x), _c(b, z_x, act)])
  wc, wz = _weights(b, w, wdtype, o)
  wf = b.node("DequantizeLinear", [wc, _c(b, s_w), wz], axis=0)
  bf = b.node("DequantizeLinear", [b.const("bias", bias, "int32"),
                                   _c(b, R.f32(np.float32(s_x) * s_w)),
                                   _c(b, np.zeros(o, np.int64), "int32")], axis=0)
  yf = b.node("Conv", [xf, wf, bf], kernel_shape=[k, k], **conv)
  y = b.node("QuantizeLinear", [yf, _c(b, s_y), _c(b, z_y, act)], ["y"])
  b.output(y, act, list(exp.shape))
  fused = ("extended", "layout", "all") if act == "uint8" and wdtype != "int4" else ()
  return Case("QDQ Conv", f"{act} act, {wdtype} w", regime, b.finish(), [q], "qlinear_conv", exp,
              dict(xshape=list(xshape), o=o, group=group, k=k, s_x=s_x, s_y=s_y), exact_at=fused,
              qdq=True)


def _cpu_dependent(case: Case) -> Case:
  """`case` recorded, not required to match: its result depends on the CPU's kernels."""
  return dataclasses.replace(case, exact_at=())


def case_qdq_matmul_int4(rng, regime, n_out):
  """DequantizeLinear(x uint8) -> MatMul(DequantizeLinear(w INT4, per column)) -> QuantizeLinear:
  the dense head with 4-bit weights in QDQ form (compared with QLinearMatMul's rule)."""
  kdim, n = int(rng.integers(8, 200)), int(rng.integers(4, 64))
  m = max(1, n_out // n)
  w = rng.integers(-7, 8, (kdim, n))
  s_a = _pow2(rng, 3, 8) if regime == "ties" else _log_uniform(rng, 1e-3, 0.1)
  s_w = _weight_scales(rng, regime, n)
  z_a, z_y = _zp(rng), _zp(rng)
  q = _u8(rng, (m, kdim))
  acc = R.matmul_accumulator(q, z_a, w)
  s_y = _out_scale(rng, regime, acc, np.float32(s_a) * s_w)
  exp = R.qlinear_matmul(q, z_a, s_a, w, s_w, s_y, z_y)
  b = ob.OnnxBuilder()
  x = b.input("x", [m, kdim], "uint8")
  xf = b.node("DequantizeLinear", [x, _c(b, s_a), _c(b, z_a, "uint8")])
  wf = b.node("DequantizeLinear", [b.const("w", w, "int4"), _c(b, s_w),
                                   _c(b, np.zeros(n, np.int64), "int4")], axis=1)
  y = b.node("QuantizeLinear", [b.node("MatMul", [xf, wf]), _c(b, s_y), _c(b, z_y, "uint8")], ["y"])
  b.output(y, "uint8", [m, n])
  return Case("QDQ MatMul", "uint8 act, int4 w", regime, b.finish(), [q], "qlinear_matmul", exp,
              dict(shape=[m, kdim, n], s_a=s_a, s_y=s_y), exact_at=(), qdq=True)


CASES: dict[str, Callable] = {
    "QuantizeLinear/u8": case_quantize,
    "QuantizeLinear/i8": lambda rng, regime, n: case_quantize(rng, regime, n, "int8"),
    "DequantizeLinear/u8": case_dequantize,
    "DequantizeLinear/int4": case_dequantize_int4,
    "QLinearConv/dense": case_qlinear_conv,
    "QLinearConv/depthwise": lambda rng, regime, n: case_qlinear_conv(rng, regime, n, "depthwise"),
    "QLinearConv/grouped": lambda rng, regime, n: case_qlinear_conv(rng, regime, n, "grouped"),
    "QLinearMatMul": case_qlinear_matmul,
    "QGemm": case_qgemm,
    # int8 weights: exact only on CPUs whose kernels cannot saturate (VNNI, AMX); not must-match
    "QLinearConv/dense-s8w": lambda rng, regime, n: _cpu_dependent(
        case_qlinear_conv(rng, regime, n, wdtype="int8")),
    "QGemm/s8w": lambda rng, regime, n: _cpu_dependent(case_qgemm(rng, regime, n, "int8")),
    "QLinearAdd": case_qlinear_add,
    "QLinearGlobalAveragePool/NCHW": case_gap,
    "QLinearGlobalAveragePool/NHWC": lambda rng, regime, n: case_gap(rng, regime, n, True),
    "MaxPool": case_max_pool,
    "Clip": case_clip,
    "Reshape": case_reshape,
    "Flatten": lambda rng, regime, n: case_reshape(rng, regime, n, "Flatten"),
    "QDQConv/u8": case_qdq_conv,
    "QDQConv/i8": lambda rng, regime, n: case_qdq_conv(rng, regime, n, act="int8", wdtype="int8"),
    "QDQConv/u8-int4w": lambda rng, regime, n: case_qdq_conv(rng, regime, n, wdtype="int4"),
    "QDQMatMul/u8-int4w": case_qdq_matmul_int4,
}
REGIMES = ("random", "ties")


def compare(got, exp) -> tuple[int, int]:
  """(mismatches, max |difference|): integers compared as int64, floats bit for bit."""
  got = np.asarray(got).reshape(exp.shape)
  if np.issubdtype(exp.dtype, np.floating):
    g, e = got.astype(np.float32), exp.astype(np.float32)
    bad = g.view(np.int32) != e.view(np.int32)
    return int(bad.sum()), float(np.max(np.abs(g - e))) if g.size else 0.0
  d = got.astype(np.int64) - exp.astype(np.int64)
  return int(np.count_nonzero(d)), int(np.max(np.abs(d))) if d.size else 0


def measure(case: Case, level: str, threads: int) -> dict:
  """Runs `case` at `level` with `threads` intra-op threads: outputs compared, mismatches."""
  (got,) = ob.run(case.model, case.inputs, level, threads)
  mism, maxd = compare(got, case.expected)
  alts = {name: compare(got, exp)[0] for name, exp in case.alternatives.items()}
  return dict(rule=case.rule, outputs=int(case.expected.size), mismatches=mism, max_abs_diff=maxd,
              must_match=level in case.exact_at, alternatives=alts)


def run_all(configs: int, outputs_per_config: int, seed: int = 0, names=None, log=print) -> dict:
  """Aggregates `measure` over `configs` random cases per (case, regime), per level x threads."""
  rng = np.random.default_rng(seed)
  table: dict[str, dict] = {}
  for name in names or CASES:
    for regime in REGIMES:
      for i in range(configs):
        case = CASES[name](rng, regime, outputs_per_config)
        levels = FUSION_LEVELS if case.qdq else LEVELS
        for level in levels:
          row = table.setdefault(f"{name}|{level}", dict(
              case=name, op=case.op, level=level, rule=case.rule, variants=set(),
              must_match=level in case.exact_at, outputs=0, mismatches=0, max_abs_diff=0,
              threads={}, regimes={}, kernels=set()))
          row["variants"].add(case.variant)
          if i == 0:  # the kernels ORT runs after optimization (one model per regime)
            row["kernels"].add(" ".join(ob.kernels(case.model, level)))
          for threads in THREADS:
            r = measure(case, level, threads)
            row["outputs"] += r["outputs"]
            row["mismatches"] += r["mismatches"]
            row["max_abs_diff"] = max(row["max_abs_diff"], r["max_abs_diff"])
            for alt, m in r["alternatives"].items():
              row.setdefault("rejected_rules", {}).setdefault(alt, 0)
              row["rejected_rules"][alt] += m
            t = row["threads"].setdefault(str(threads), dict(outputs=0, mismatches=0))
            t["outputs"] += r["outputs"]
            t["mismatches"] += r["mismatches"]
            reg = row["regimes"].setdefault(regime, dict(outputs=0, mismatches=0, configs=0))
            reg["outputs"] += r["outputs"]
            reg["mismatches"] += r["mismatches"]
            reg["configs"] += threads == THREADS[0]
      if log:
        for key, row in table.items():
          if row["case"] == name:
            log(f"{name:30s} {regime:6s} {row['level']:8s} {row['rule']:28s} "
                f"outputs={row['outputs']:>10,} mismatches={row['mismatches']:>8,} "
                f"must_match={row['must_match']} kernels={sorted(row['kernels'])}"
                + (f" rejected={row['rejected_rules']}" if row.get("rejected_rules") else ""))
  for row in table.values():
    row["variants"] = sorted(row["variants"])
    row["kernels"] = sorted(row["kernels"])
  return table


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", type=int, default=12, help="random models per case and regime")
  p.add_argument("--outputs", type=int, default=50_000, help="outputs per model")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ort_rules.json"))
  a = p.parse_args(argv)
  t0 = time.time()
  table = run_all(a.configs, a.outputs, a.seed)
  rows = list(table.values())
  result = dict(
      command=" ".join(["python", "benchmarks/ort_rules.py"] + (argv or sys.argv[1:])),
      runtime=dict(onnxruntime=ob.ort_version(), onnx=ob.onnx_version(),
                   python=platform.python_version(), machine=platform.machine(),
                   processor=platform.processor() or None, cpu_flags=cpu_flags()),
      levels=list(LEVELS), threads=list(THREADS), configs_per_regime=a.configs,
      outputs_per_config=a.outputs, seconds=round(time.time() - t0, 1),
      total_outputs_compared=sum(r["outputs"] for r in rows),
      rows=rows)
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
  bad = [r for r in rows if r["must_match"] and r["mismatches"]]
  print(f"wrote {a.out}: {len(rows)} case x level rows, {len(bad)} rule rows with mismatches, "
        f"{result['total_outputs_compared']:,} outputs, {result['seconds']} s")
  return 1 if bad else 0


def cpu_flags() -> list[str] | None:
  """The x86 SIMD features that select MLAS kernels (AVX2, AVX-512, VNNI, AMX), where readable."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return None
  flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                if ln.startswith("flags")), [])
  keep = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
  return [f for f in keep if f in flags]


if __name__ == "__main__":
  sys.exit(main())
