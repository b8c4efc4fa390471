"""LiteRT's rounding rule for each op the .tflite export uses, in each kernel family (issue 15 (a)).

For every op x family: single-op .tflite models (`mpq.export.tflite_builder`) with random and
tie-heavy quantization parameters run in the real runtime on random inputs, and every output is
compared with the int64 NumPy rule of `mpq.export.litert_rules` that the family should follow.
Also records which ops XNNPACK takes under `litert-auto`. Writes `results/litert_rules.json`.

    python benchmarks/litert_rules.py [--scale 1.0] [--out benchmarks/results/litert_rules.json]

Scale regimes: `random` (log-uniform scales, random zero points), `ties` (power-of-two scale
ratios and power-of-two reduction counts, so exact ties are common), `same` (equal input and
output scales, where an op has a shortcut for them). `tests/test_litert_rules.py` runs the same
cases smaller.
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

from mpq.export import litert_rules as R  # noqa: E402
from mpq.export import tflite_builder as tb  # noqa: E402

FAMILIES = tuple(tb.FAMILIES)


@dataclasses.dataclass
class Case:
  """One single-op model, its inputs, and per family the rule's name and its expected output."""
  op: str
  variant: str
  regime: str
  model: bytes
  inputs: list
  expected: dict  # family -> (rule name, int64 array)
  params: dict
  delegated: bool  # whether XNNPACK should take the op under litert-auto (R.xnnpack_takes)


# -- quantization parameters ----------------------------------------------------------------------------
def _log_uniform(rng, lo, hi):
  return float(np.float32(10 ** rng.uniform(np.log10(lo), np.log10(hi))))


def _scale_pair(rng, regime):
  """(s_in, s_out) as float32 values: random ratios in [1/8, 8], or power-of-two ratios."""
  s_in = _log_uniform(rng, 1e-3, 0.5)
  if regime == "ties":
    s_in = float(2.0 ** -rng.integers(2, 12))
    return s_in, float(s_in * 2.0 ** rng.integers(-3, 4))
  if regime == "same":
    return s_in, s_in
  return s_in, _log_uniform(rng, s_in / 8, s_in * 8)


def _int8(rng, shape, lo=-128, hi=127):
  return rng.integers(lo, hi + 1, shape).astype(np.int8)


def _single_op(op, inputs, output, consts=(), options=None, const_first=False):
  """A model with one operator. inputs/consts/output: (name, shape, dtype, kwargs)."""
  b = tb.TFLiteBuilder()
  ins = [b.add_tensor(n, s, d, **kw) for n, s, d, kw in inputs]
  cs = [b.add_tensor(n, s, d, **kw) for n, s, d, kw in consts]
  y = b.add_tensor(*output[:3], **output[3])
  opts = options(b) if callable(options) else options
  b.add_operator(op, (cs + ins) if const_first else (ins + cs), [y], opts)
  b.set_io(ins, [y])
  return b.finish()


def _all(rule_name, value):
  return {f: (rule_name, value) for f in FAMILIES}


# -- cases ------------------------------------------------------------------------------------------------
def case_quantize(rng, regime, n):
  """QUANTIZE uint8 -> int8 over n elements. `same`: equal scales and z_out = z_in - 128 (the pure
  shift); `random` / `ties`: a rescale."""
  s_in, s_out = _scale_pair(rng, regime)
  z_in = int(rng.integers(0, 256))
  z_out = z_in - 128 if regime == "same" else int(rng.integers(-128, 128))
  q = rng.integers(0, 256, (1, n)).astype(np.uint8)
  model = _single_op("QUANTIZE", [("x", [1, n], "uint8", dict(scale=s_in, zero_point=z_in))],
                     ("y", [1, n], "int8", dict(scale=s_out, zero_point=z_out)))
  ref = ("requantize", R.requantize(q, z_in, s_in, z_out, s_out))
  opt = ("requantize_optimized", R.requantize_optimized(q, z_in, s_in, z_out, s_out))
  return Case("QUANTIZE", "uint8->int8", regime, model, [q],
              {"litert-ref": ref, "litert-ruy": opt, "litert-auto": opt},
              dict(s_in=s_in, s_out=s_out, z_in=z_in, z_out=z_out),
              R.xnnpack_takes("QUANTIZE", in_dtype="uint8"))


def case_mean(rng, regime, n_out, keep_dims=True):
  """MEAN over axes [1, 2] of [B, H, W, C] int8, about n_out outputs."""
  if regime == "ties":
    h, w = [int(2 ** rng.integers(0, 4)) for _ in range(2)]
  else:
    h, w = [int(rng.integers(1, 15)) for _ in range(2)]
  c = int(rng.integers(1, 70))
  bsz = max(1, n_out // c)
  s_in, s_out = _scale_pair(rng, regime)
  z_in = int(rng.integers(-128, 128))
  z_out = z_in if regime == "same" and rng.random() < 0.5 else int(rng.integers(-128, 128))
  q = _int8(rng, (bsz, h, w, c))
  out_shape = [bsz, 1, 1, c] if keep_dims else [bsz, c]
  model = _single_op(
      "MEAN", [("x", [bsz, h, w, c], "int8", dict(scale=s_in, zero_point=z_in))],
      ("y", out_shape, "int8", dict(scale=s_out, zero_point=z_out)),
      consts=[("axes", [2], "int32", dict(data=np.array([1, 2])))],
      options=lambda b: b.options("ReducerOptions", keepDims=keep_dims))
  ref = R.mean_reference(q, (1, 2), z_in, s_in, z_out, s_out).reshape(out_shape)
  opt = R.mean_optimized_hw(q, z_in, s_in, z_out, s_out).reshape(out_shape) if keep_dims else ref
  xnn = R.mean_xnnpack(q, (1, 2), z_in, s_in, z_out, s_out).reshape(out_shape)
  exp = {"litert-ref": ("mean_reference", ref),
         "litert-ruy": ("mean_optimized_hw" if keep_dims else "mean_reference", opt),
         "litert-auto": ("mean_xnnpack", xnn)}
  return Case("MEAN", f"axes12_keep{int(keep_dims)}", regime, model, [q], exp,
              dict(s_in=s_in, s_out=s_out, z_in=z_in, z_out=z_out, hw=[h, w], n=h * w),
              R.xnnpack_takes("MEAN"))


def case_average_pool(rng, regime, n_out):
  """AVERAGE_POOL_2D int8: VALID or SAME windows (SAME: partial windows at the borders), or a
  global window; fused NONE or RELU. `ties`: even window counts."""
  kind = ["valid", "same", "global"][int(rng.integers(0, 3))]
  if regime == "ties":
    f = [int(2 ** rng.integers(1, 3)) for _ in range(2)]
  else:
    f = [int(rng.integers(1, 6)) for _ in range(2)]
  st = [int(rng.integers(1, 3)) for _ in range(2)] if kind != "global" else [1, 1]
  h, w = [int(f[i] + rng.integers(0, 8)) for i in range(2)]
  if kind == "global":
    f = [h, w]
  pad = "SAME" if kind == "same" else "VALID"
  c = int(rng.integers(1, 40))
  probe_out = R.average_pool(np.zeros((1, h, w, 1), np.int64), f, st, pad)
  bsz = max(1, n_out // (probe_out.size * c))
  s, _ = _scale_pair(rng, "random")
  z = int(rng.integers(-128, 128))
  act = ["NONE", "RELU"][int(rng.integers(0, 2))]
  # random: a third of the models write an output scale and zero point unlike the input's, which
  # the kernel ignores except for the fused activation's clamp
  s_out, z_out = (s, z)
  if regime == "random" and rng.random() < 1 / 3:
    s_out, z_out = _log_uniform(rng, s / 4, s * 4), int(rng.integers(-128, 128))
  q = _int8(rng, (bsz, h, w, c))
  exp = R.average_pool(q, f, st, pad, act_range=(max(-128, z_out), 127) if act == "RELU" else R.I8)
  model = _single_op(
      "AVERAGE_POOL_2D", [("x", [bsz, h, w, c], "int8", dict(scale=s, zero_point=z))],
      ("y", list(exp.shape), "int8", dict(scale=s_out, zero_point=z_out)),
      options=lambda b: b.options("Pool2DOptions", padding=pad, strideH=st[0], strideW=st[1],
                                  filterHeight=f[0], filterWidth=f[1],
                                  fusedActivationFunction=act))
  return Case("AVERAGE_POOL_2D", kind, regime, model, [q], _all("average_pool", exp),
              dict(filter=f, stride=st, padding=pad, activation=act, hw=[h, w], z=z, z_out=z_out),
              R.xnnpack_takes("AVERAGE_POOL_2D"))


def case_max_min(rng, regime, n, op="MAXIMUM"):
  """MAXIMUM / MINIMUM of int8 tensors: two inputs, or an input and a broadcast constant (the
  signed-grid clamp); the output's quantization differs from the inputs' in `random`."""
  fn = R.maximum if op == "MAXIMUM" else R.minimum
  s_in, s_out = _scale_pair(rng, "random" if regime == "random" else "same")
  z = int(rng.integers(-128, 128))
  z_out = int(rng.integers(-128, 128)) if regime == "random" else z
  qin = dict(scale=s_in, zero_point=z)
  qout = dict(scale=s_out, zero_point=z_out)
  c = 16
  a = _int8(rng, (max(1, n // c), c))
  if rng.random() < 0.5:
    bb = _int8(rng, a.shape)
    model = _single_op(op, [("a", list(a.shape), "int8", qin), ("b", list(a.shape), "int8", qin)],
                       ("y", list(a.shape), "int8", qout))
    return Case(op, "two_inputs", regime, model, [a, bb], _all(op.lower(), fn(a, bb)),
                dict(s_in=s_in, s_out=s_out, z_in=z, z_out=z_out), R.xnnpack_takes(op))
  k = _int8(rng, (1,))
  model = _single_op(op, [("a", list(a.shape), "int8", qin)], ("y", list(a.shape), "int8", qout),
                     consts=[("k", [1], "int8", dict(data=k, **qin))])
  return Case(op, "const_scalar", regime, model, [a], _all(op.lower(), fn(a, k)),
              dict(s_in=s_in, s_out=s_out, z_in=z, z_out=z_out, k=int(k[0])), R.xnnpack_takes(op))


def case_reshape(rng, regime, n):
  """RESHAPE int8 [B, H, W, C] -> [B, H W C] (the flatten before a dense layer)."""
  h, w, c = [int(rng.integers(1, 9)) for _ in range(3)]
  bsz = max(1, n // (h * w * c))
  s, _ = _scale_pair(rng, "random")
  z = int(rng.integers(-128, 128))
  q = _int8(rng, (bsz, h, w, c))
  model = _single_op("RESHAPE", [("x", [bsz, h, w, c], "int8", dict(scale=s, zero_point=z))],
                     ("y", [bsz, h * w * c], "int8", dict(scale=s, zero_point=z)),
                     consts=[("shape", [2], "int32", dict(data=np.array([bsz, h * w * c])))])
  return Case("RESHAPE", "flatten", regime, model, [q],
              _all("reshape", R.reshape(q, (bsz, h * w * c)).astype(np.int64)), dict(hwc=[h, w, c]),
              R.xnnpack_takes("RESHAPE"))


_WLIM = {"int8": 127, "int4": 7, "int2": 1}
_WRANGE = {"int8": (-127, 127), "int4": (-8, 7), "int2": (-2, 1)}


def _weight_scales(rng, regime, s_in, cout):
  if regime == "ties":
    return (2.0 ** -rng.integers(4, 10, cout)).astype(np.float32)
  return np.array([_log_uniform(rng, 1e-3, 0.1) for _ in range(cout)], np.float32)


def case_fully_connected(rng, regime, n_out, wdtype="int4"):
  """FULLY_CONNECTED int8 x {int8, int4, int2} weights (per-channel scales), int32 bias."""
  k = int(rng.integers(8, 200)) if rng.random() < 0.5 else int(4 * rng.integers(2, 50))
  cout = int(rng.integers(4, 64))
  bsz = max(1, n_out // cout)
  s_in, _ = _scale_pair(rng, regime)
  s_w = _weight_scales(rng, regime, s_in, cout)
  z_in = int(rng.integers(-128, 128))
  z_out = int(rng.integers(-128, 128))
  lo, hi = _WRANGE[wdtype]
  w = rng.integers(lo, hi + 1, (cout, k))
  bias = rng.integers(-3000, 3000, cout)
  q = _int8(rng, (bsz, k))
  acc = R.fc_accumulator(q, w, z_in, bias)
  # the output scale puts the accumulator's spread over about +-100 (ties: a power of two)
  spread = float(np.std(acc * (s_in * s_w))) + 1e-12
  s_out = float(np.float32(spread / 40 if regime != "ties" else 2.0 ** np.round(np.log2(spread / 40))))
  model = _single_op(
      "FULLY_CONNECTED", [("x", [bsz, k], "int8", dict(scale=s_in, zero_point=z_in))],
      ("y", [bsz, cout], "int8", dict(scale=s_out, zero_point=z_out)),
      consts=[("w", [cout, k], wdtype, dict(data=w, scale=s_w, zero_point=0)),
              ("b", [cout], "int32", dict(data=bias, scale=np.float32(s_in) * s_w, zero_point=0))],
      options=lambda b: b.options("FullyConnectedOptions"))
  taken = R.xnnpack_takes("FULLY_CONNECTED", weights=wdtype, k=k)
  ruy = ("fc_ruy", R.fc_ruy(acc, s_in, s_w, s_out, z_out))
  exp = {"litert-ref": ("fc_reference", R.fc_reference(acc, s_in, s_w, s_out, z_out)),
         "litert-ruy": ruy,
         "litert-auto": ("fc_xnnpack", R.fc_xnnpack(acc, s_in, s_w, s_out, z_out)) if taken else ruy}
  return Case("FULLY_CONNECTED", f"weights_{wdtype}", regime, model, [q], exp,
              dict(k=k, cout=cout, s_in=s_in, s_out=s_out), taken)


# -- 16x8 mode: int16 activations (zero point 0), int8 weights, int64 bias ----------------------------
def _int16(rng, shape, r=32767):
  return rng.integers(-r, r + 1, shape).astype(np.int16)


def case_linear_16x8(rng, regime, n_out, op="FULLY_CONNECTED"):
  """FULLY_CONNECTED, CONV_2D (3x3 SAME) or DEPTHWISE_CONV_2D (3x3 SAME) with int16 input and
  output, per-channel int8 weights and an int64 bias; fused NONE or RELU."""
  act = str(rng.choice(["NONE", "RELU"]))
  s_in = float(2.0 ** -rng.integers(8, 14)) if regime == "ties" else _log_uniform(rng, 1e-4, 1e-2)
  if op == "FULLY_CONNECTED":
    k, cout = int(rng.integers(8, 400)), int(rng.integers(4, 40))
    bsz = max(1, n_out // cout)
    x = _int16(rng, (bsz, k))
    w = rng.integers(-127, 128, (cout, k))
    acc_fn = lambda b: x.astype(np.int64) @ w.T + b  # noqa: E731
    shapes, wshape, qdim = ([bsz, k], [bsz, cout]), [cout, k], 0
    opts = lambda b: b.options("FullyConnectedOptions", fusedActivationFunction=act)  # noqa: E731
  else:
    depthwise = op == "DEPTHWISE_CONV_2D"
    h, wd, cin = int(rng.integers(3, 12)), int(rng.integers(3, 12)), int(rng.integers(1, 24))
    cout = cin if depthwise else int(rng.integers(1, 24))
    bsz = max(1, n_out // (h * wd * cout))
    x = _int16(rng, (bsz, h, wd, cin))
    wshape = [1, 3, 3, cout] if depthwise else [cout, 3, 3, cin]
    w = rng.integers(-127, 128, wshape)
    qdim = 3 if depthwise else 0

    def acc_fn(b):
      xp = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
      acc = np.zeros((bsz, h, wd, cout), np.int64)
      for i in range(3):
        for j in range(3):
          patch = xp[:, i:i + h, j:j + wd, :]
          acc += patch * w[0, i, j, :] if depthwise else patch @ w[:, i, j, :].T
      return acc + b
    shapes = ([bsz, h, wd, cin], [bsz, h, wd, cout])
    opts = (lambda b: b.options("DepthwiseConv2DOptions", padding="SAME", strideW=1, strideH=1,  # noqa: E731
                                depthMultiplier=1, fusedActivationFunction=act)) if depthwise else \
           (lambda b: b.options("Conv2DOptions", padding="SAME", strideW=1, strideH=1,  # noqa: E731
                                fusedActivationFunction=act))
  s_w = _weight_scales(rng, regime, s_in, cout)
  bias = rng.integers(-10 ** 6, 10 ** 6, cout)
  acc = acc_fn(bias)
  spread = float(np.std(acc * (s_in * s_w.astype(np.float64)))) + 1e-12
  s_out = float(np.float32(spread / 8000 if regime != "ties" else 2.0 ** np.round(np.log2(spread / 8000))))
  model = _single_op(op, [("x", shapes[0], "int16", dict(scale=s_in, zero_point=0))],
                     ("y", shapes[1], "int16", dict(scale=s_out, zero_point=0)),
                     consts=[("w", wshape, "int8", dict(data=w, scale=s_w, zero_point=0,
                                                        quantized_dimension=qdim)),
                             ("b", [cout], "int64", dict(data=bias, scale=np.float32(s_in) * s_w,
                                                         zero_point=0))],
                     options=opts)
  exp = R.linear_16x8(acc, s_in, s_w, s_out, reduced=op != "FULLY_CONNECTED",
                      act_range=(0, 32767) if act == "RELU" else R.I16)
  return Case(f"{op}/16x8", act, regime, model, [x], _all("linear_16x8", exp),
              dict(s_in=s_in, s_out=s_out, cout=cout), False)


def case_quantize_16(rng, regime, n):
  """QUANTIZE int8 -> int16, int16 -> int8 or int16 -> int16 (int16 zero points 0): a rescale, or
  (`same`) equal scales, the exact conversions of the 16x8 exports."""
  src, dst = [("int8", "int16"), ("int16", "int8"), ("int16", "int16")][int(rng.integers(0, 3))]
  s_in, s_out = _scale_pair(rng, regime)
  z_in = int(rng.integers(-128, 128)) if src == "int8" else 0
  z_out = int(rng.integers(-128, 128)) if dst == "int8" else 0
  q = _int8(rng, (1, n)) if src == "int8" else _int16(rng, (1, n), 300 if dst == "int8" else 32767)
  model = _single_op("QUANTIZE", [("x", [1, n], src, dict(scale=s_in, zero_point=z_in))],
                     ("y", [1, n], dst, dict(scale=s_out, zero_point=z_out)))
  exp = R.requantize(q, z_in, s_in, z_out, s_out, R.I8 if dst == "int8" else R.I16)
  return Case("QUANTIZE/16x8", f"{src}->{dst}", regime, model, [q], _all("requantize", exp),
              dict(s_in=s_in, s_out=s_out, z_in=z_in, z_out=z_out), False)


def case_mean_16(rng, regime, n_out):
  """MEAN over axes [1, 2] (keep_dims) of an int16 tensor on one grid."""
  h, w = ([int(2 ** rng.integers(0, 4)) for _ in range(2)] if regime == "ties" else
          [int(rng.integers(1, 15)) for _ in range(2)])
  c = int(rng.integers(1, 70))
  bsz = max(1, n_out // c)
  s = _log_uniform(rng, 1e-4, 1e-1)
  q = _int16(rng, (bsz, h, w, c))
  model = _single_op("MEAN", [("x", [bsz, h, w, c], "int16", dict(scale=s, zero_point=0))],
                     ("y", [bsz, 1, 1, c], "int16", dict(scale=s, zero_point=0)),
                     consts=[("axes", [2], "int32", dict(data=np.array([1, 2])))],
                     options=lambda b: b.options("ReducerOptions", keepDims=True))
  exp = R.mean_reference(q, (1, 2), 0, s, 0, s, R.I16).reshape(bsz, 1, 1, c)
  return Case("MEAN/16x8", "axes12_keep1", regime, model, [q], _all("mean_reference", exp),
              dict(s=s, hw=[h, w]), False)


def case_add_16(rng, regime, n):
  """ADD of two int16 tensors (zero points 0) whose scales are not all powers of two (`ties`:
  power-of-two input scales, an output scale of 3 2^-k)."""
  if regime == "ties":
    s_a, s_b = (float(2.0 ** -rng.integers(6, 14)) for _ in range(2))
    s_out = float(3 * 2.0 ** -rng.integers(5, 12))
  else:
    s_a, s_b = (_log_uniform(rng, 1e-4, 1e-1) for _ in range(2))
    s_out = float(np.float32((s_a + s_b) * 10 ** rng.uniform(-0.3, 0.5)))
  r = int(rng.choice([100, 1000, 32767]))
  a, b = _int16(rng, (1, n), r), _int16(rng, (1, n), r)
  model = _single_op("ADD", [("a", [1, n], "int16", dict(scale=s_a, zero_point=0)),
                             ("b", [1, n], "int16", dict(scale=s_b, zero_point=0))],
                     ("y", [1, n], "int16", dict(scale=s_out, zero_point=0)),
                     options=lambda bb: bb.options("AddOptions", fusedActivationFunction="NONE"))
  ref = R.add_16x8(a, b, s_a, s_b, s_out, vector=False).reshape(1, n)
  vec = ("add_16x8 (vector)", R.add_16x8(a, b, s_a, s_b, s_out, vector=True).reshape(1, n))
  return Case("ADD/16x8", "general", regime, model, [a, b],
              {"litert-ref": ("add_16x8", ref), "litert-ruy": vec, "litert-auto": vec},
              dict(s_a=s_a, s_b=s_b, s_out=s_out), False)


CASES: dict[str, Callable] = {
    "QUANTIZE": case_quantize,
    "MEAN/keep": lambda rng, regime, n: case_mean(rng, regime, n, keep_dims=True),
    "MEAN/nokeep": lambda rng, regime, n: case_mean(rng, regime, n, keep_dims=False),
    "AVERAGE_POOL_2D": case_average_pool,
    "MAXIMUM": lambda rng, regime, n: case_max_min(rng, regime, n, "MAXIMUM"),
    "MINIMUM": lambda rng, regime, n: case_max_min(rng, regime, n, "MINIMUM"),
    "RESHAPE": case_reshape,
    "FC/int8": lambda rng, regime, n: case_fully_connected(rng, regime, n, "int8"),
    "FC/int4": lambda rng, regime, n: case_fully_connected(rng, regime, n, "int4"),
    "FC/int2": lambda rng, regime, n: case_fully_connected(rng, regime, n, "int2"),
    "FC/16x8": lambda rng, regime, n: case_linear_16x8(rng, regime, n, "FULLY_CONNECTED"),
    "CONV_2D/16x8": lambda rng, regime, n: case_linear_16x8(rng, regime, n, "CONV_2D"),
    "DEPTHWISE_CONV_2D/16x8": lambda rng, regime, n: case_linear_16x8(rng, regime, n,
                                                                       "DEPTHWISE_CONV_2D"),
    "QUANTIZE/16x8": case_quantize_16,
    "MEAN/16x8": case_mean_16,
    "ADD/16x8": case_add_16,
}
REGIMES = {"QUANTIZE": ("random", "ties", "same"), "QUANTIZE/16x8": ("random", "ties", "same"),
           "MEAN/keep": ("random", "ties", "same"),
           "MEAN/nokeep": ("random", "ties", "same")}
DEFAULT_REGIMES = ("random", "ties")


def measure(case: Case, family: str) -> dict:
  """Runs `case` in `family`; outputs compared, mismatches, and whether XNNPACK took the op."""
  interp = tb.interpreter(case.model, family)
  (got,) = tb.invoke(interp, case.inputs)
  rule, exp = case.expected[family]
  delegated = any(d for _, d in tb.delegation(interp))
  got = got.astype(np.int64).reshape(exp.shape)
  return dict(rule=rule, outputs=int(exp.size), mismatches=int(np.sum(got != exp)),
              max_abs_diff=int(np.max(np.abs(got - exp))) if exp.size else 0, delegated=delegated,
              delegation_as_expected=delegated == (case.delegated and family == "litert-auto"))


def run_all(configs: int, outputs_per_config: int, seed: int = 0, names=None, log=print) -> dict:
  """Aggregates `measure` over `configs` random cases per (op, regime), for every family."""
  rng = np.random.default_rng(seed)
  table = {}
  for name in names or CASES:
    for regime in REGIMES.get(name, DEFAULT_REGIMES):
      for _ in range(configs):
        case = CASES[name](rng, regime, outputs_per_config)
        for family in FAMILIES:
          r = measure(case, family)
          key = f"{name}|{family}" + ("|" + r["rule"] if name.startswith("FC/") else "")
          row = table.setdefault(key, dict(op=case.op, variants=set(), family=family,
                                           rule=r["rule"], outputs=0, mismatches=0,
                                           max_abs_diff=0, delegated=set(), regimes={}))
          row["variants"].add(case.variant)
          assert row["rule"] == r["rule"], (key, row["rule"], r["rule"])
          row["outputs"] += r["outputs"]
          row["mismatches"] += r["mismatches"]
          row["max_abs_diff"] = max(row["max_abs_diff"], r["max_abs_diff"])
          row["delegated"].add(r["delegated"])
          row["delegation_unexpected"] = row.get("delegation_unexpected", 0) + \
              (not r["delegation_as_expected"])
          reg = row["regimes"].setdefault(regime, dict(outputs=0, mismatches=0, configs=0))
          reg["outputs"] += r["outputs"]
          reg["mismatches"] += r["mismatches"]
          reg["configs"] += 1
      if log:
        for key, row in table.items():
          if key.split("|")[0] == name:
            log(f"{name:16s} {regime:7s} {row['family']:12s} {row['rule']:20s} "
                f"outputs={row['outputs']:>10,} mismatches={row['mismatches']} "
                f"delegated={sorted(row['delegated'])} unexpected={row['delegation_unexpected']}")
  for row in table.values():
    d = sorted(row["delegated"])
    row["delegated"] = d[0] if len(d) == 1 else "mixed"
    row["variants"] = sorted(row["variants"])
  return table


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", type=int, default=24, help="random cases per op and regime")
  p.add_argument("--outputs", type=int, default=60_000, help="outputs per case")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(Path(__file__).parent / "results" / "litert_rules.json"))
  a = p.parse_args(argv)
  t0 = time.time()
  table = run_all(a.configs, a.outputs, a.seed)
  result = dict(
      command=" ".join(["python", "benchmarks/litert_rules.py"] + (argv or sys.argv[1:])),
      runtime=dict(ai_edge_litert=tb.litert_version(), python=platform.python_version(),
                   machine=platform.machine(), processor=platform.processor() or None),
      num_threads=1, configs_per_regime=a.configs, outputs_per_config=a.outputs, seconds=round(time.time() - t0, 1),
      rows=list(table.values()))
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
  bad = [r for r in table.values() if r["mismatches"] or r["delegation_unexpected"]]
  print(f"wrote {a.out}: {len(table)} op x family rows, {len(bad)} with mismatches, "
        f"{result['seconds']} s")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
