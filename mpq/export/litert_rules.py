"""LiteRT's integer rounding rules, one int64 NumPy function per rule (no runtime imports).

Each function transcribes the kernel named in its docstring (LiteRT 2.3.0 / TFLite sources under
`tflite/kernels/`, and XNNPACK where the default delegate takes the op) and was checked against the
real runtime with 0 mismatches (`benchmarks/litert_rules.py`, `tests/test_litert_rules.py`). Which
rule a kernel family applies to which op is `RULES` below; under `litert-auto` it depends on
whether XNNPACK takes the op (`DELEGATED`).

Notation: `q` stored integers (int8 / uint8), `z` zero points, `s` scales as written in the file
(float32), `M0, e = quantize_multiplier(m)` TFLite's `QuantizeMultiplier` of a double `m` (`M0` in
[2^30, 2^31), `m ~= M0 2^(e-31)`). All arithmetic is exact int64 unless a step says float32.
"""

from __future__ import annotations

import numpy as np

from mpq.fixedpoint import quantize_multiplier

I8 = (-128, 127)
U8 = (0, 255)
_INT32_MIN = -(2 ** 31)


def f32(x):
  """Round to float32 (and keep it float32)."""
  return np.float32(x)


def multiplier_from_scales(s_num, s_den) -> tuple[int, int]:
  """`QuantizeMultiplier(double(f32 s_num) / double(f32 s_den))`: how every TFLite kernel derives a
  rescale from the scales in the file (quantize.cc, reduce.cc `Prepare`)."""
  return quantize_multiplier(float(f32(s_num)) / float(f32(s_den)))


# -- fixed-point primitives (tflite/kernels/internal/common.h) ---------------------------------------
def srdhm(a, b):
  """gemmlowp `SaturatingRoundingDoublingHighMul(a, b)` on int32-range int64 arrays: `a b / 2^31`
  to nearest, ties toward +inf (nudge 2^30, or 1 - 2^30 for a negative product, then division
  truncating toward zero); the same as ARM's `vqrdmulhq_s32`, which NEON_2_SSE emulates on x86."""
  a = np.asarray(a, np.int64)
  b = np.asarray(b, np.int64)
  ab = a * b
  r = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
  q = np.where(r >= 0, r >> 31, -((-r) >> 31))
  return np.where((a == _INT32_MIN) & (b == _INT32_MIN), 2 ** 31 - 1, q)


def rounding_divide_by_pot(x, e):
  """gemmlowp `RoundingDivideByPOT(x, e)`: `x / 2^e` rounded half away from zero."""
  x = np.asarray(x, np.int64)
  mask = (1 << np.int64(e)) - 1
  threshold = (mask >> 1) + (x < 0)
  return (x >> np.int64(e)) + ((x & mask) > threshold)


def mbqm(x, m0, shift):
  """TFLite's `MultiplyByQuantizedMultiplier(int32 x, M0, shift)` (double rounding, the default
  build): `RoundingDivideByPOT(SRDHM(x 2^max(shift,0), M0), max(-shift,0))`."""
  x = np.asarray(x, np.int64)
  left, right = max(int(shift), 0), max(-int(shift), 0)
  return rounding_divide_by_pot(srdhm(x << left, m0), right)


def mbqm_single(x, m0, shift):
  """The single-rounding form (`TFLITE_SINGLE_ROUNDING`): `(x M0 + 2^(30-shift)) >> (31-shift)`,
  ties toward +inf."""
  total = 31 - int(shift)
  return (np.asarray(x, np.int64) * np.int64(m0) + (np.int64(1) << (total - 1))) >> total


def mbqm_up(x, m0, shift):
  """The vectorized form (`MultiplyByQuantizedMultiplier4Rows`: `vqrdmulhq_s32` then the rounding
  shift `vrshlq_s32`, NEON code that LiteRT's x86 build runs through NEON_2_SSE): SRDHM as in
  `mbqm`, then a last shift rounding ties toward +inf, `(h + 2^(r-1)) >> r`, `r = max(-shift, 0)`.
  (ruy's own requantization in CONV_2D / FULLY_CONNECTED rounds the same way.)"""
  x = np.asarray(x, np.int64)
  left, right = max(int(shift), 0), max(-int(shift), 0)
  h = srdhm(x << left, m0)
  return (h + ((1 << right) >> 1)) >> right


def mbqm_single_away(x, m0, shift):
  """One rounding, ties away from zero: `sign(x) ((|x| M0 + 2^(30-shift)) >> (31-shift))`."""
  x = np.asarray(x, np.int64)
  total = 31 - int(shift)
  return np.sign(x) * ((np.abs(x) * np.int64(m0) + (np.int64(1) << (total - 1))) >> total)


def rint_f32(v):
  """float32 round half to even (x86 `cvtps2dq` / `nearbyintf`), as int64."""
  return np.rint(np.asarray(v, np.float32)).astype(np.int64)


# -- QUANTIZE (requantize int8/uint8 -> int8/uint8) ------------------------------------------------------
def requantize(q, z_in, s_in, z_out, s_out, out_range=I8):
  """QUANTIZE between integer types, reference_ops::Requantize (reference/requantize.h;
  `litert-ref`): `clamp(mbqm(q - z_in, M0, e) + z_out)` with `M0, e` from `s_in / s_out`. With
  equal scales `M0, e = 2^30, 1` and this is exactly `q - z_in + z_out` (the kernel's `^ 0x80`
  fast path for a zero-point difference of 128 gives the same bytes)."""
  m0, e = multiplier_from_scales(s_in, s_out)
  out = mbqm(np.asarray(q, np.int64) - z_in, m0, e) + z_out
  return np.clip(out, *out_range)


def _vector_tail(x, m0, e, n_vec, axis=-1):
  """`mbqm_up` on the first `n_vec` entries along `axis` (the 16-wide vector loop), `mbqm` on the
  rest (the kernel's scalar tail loop)."""
  x = np.asarray(x, np.int64)
  head = np.take(x, np.arange(n_vec), axis=axis)
  tail = np.take(x, np.arange(n_vec, x.shape[axis]), axis=axis)
  return np.concatenate([mbqm_up(head, m0, e), mbqm(tail, m0, e)], axis=axis)


def requantize_optimized(q, z_in, s_in, z_out, s_out, out_range=I8):
  """QUANTIZE between integer types, optimized_ops::Requantize (`litert-ruy`, and `litert-auto`:
  XNNPACK does not take uint8 -> int8). Over the flattened tensor, elements in whole blocks of 16
  from the start take the vector rule `mbqm_up`, the last `size % 16` the scalar `mbqm` (as
  `requantize`). Equal scales: exactly `q - z_in + z_out`, as `requantize`."""
  q = np.asarray(q, np.int64)
  m0, e = multiplier_from_scales(s_in, s_out)
  flat = q.reshape(-1) - z_in
  out = _vector_tail(flat, m0, e, 16 * (flat.size // 16)) + z_out
  return np.clip(out, *out_range).reshape(q.shape)


# -- MEAN ---------------------------------------------------------------------------------------------
def mean_reference(q, axes, z_in, s_in, z_out, s_out, out_range=I8):
  """MEAN, reference_ops::QuantizedMeanOrSum (reference/reduce.h; `litert-ref`, and `litert-ruy`
  whenever the optimized 4-D path below does not apply, e.g. keep_dims=False).

  `M0, e` from `s_in / s_out`; `n` elements reduced; `k = min(floor(log2 n), 32, 31 + e)`;
  `M0' = (M0 << k) // n`, `e' = e - k`; out = `clamp(mbqm(sum(q) - z_in n, M0', e') + z_out)`.
  Keeps the reduced axes (shape of keep_dims=True)."""
  q = np.asarray(q, np.int64)
  axes = tuple(int(a) for a in axes)
  n = int(np.prod([q.shape[a] for a in axes]))
  m0, e = multiplier_from_scales(s_in, s_out)
  k = min(n.bit_length() - 1, 32, 31 + e)
  m0p = (m0 << k) // n
  total = q.sum(axis=axes, keepdims=True) - z_in * n
  return np.clip(mbqm(total, m0p, e - k) + z_out, *out_range)


def mean_optimized_hw(q, z_in, s_in, z_out, s_out, out_range=I8, threads=1):
  """MEAN over axes (1, 2) of a 4-D int8 tensor with keep_dims=True, optimized_integer_ops::Mean
  (optimized/integer_ops/mean.h; `litert-ruy`). The zero points enter through a float32 bias:

    t = f32(f32(z_in * s_in) / s_out);  bias = z_out - trunc(t +/- 0.5f)   (half away from zero)
    M0, e = QuantizeMultiplier(double(f32(s_in / f32(f32(n) * s_out))))
    out = clamp(R(sum(q), M0, e) + bias)               (sum of the raw stored values)

  The channels are split into `min(max(C // 8, 1), threads)` contiguous ranges (`threads`: the
  interpreter's thread count), the k-th of `T` starting where the previous ended and spanning
  `(C - start) // (T - k)`; within a range, channels in whole blocks of 16 from its start take the
  vector rule `mbqm_up`, the rest (its tail) the scalar `mbqm`.
  """
  q = np.asarray(q, np.int64)
  n = q.shape[1] * q.shape[2]
  c = q.shape[3]
  t = f32(f32(f32(z_in) * f32(s_in)) / f32(s_out))
  t = f32(t + f32(0.5)) if t > 0 else f32(t - f32(0.5))
  bias = int(z_out) - int(np.trunc(t))
  real = f32(f32(s_in) / f32(f32(n) * f32(s_out)))
  m0, e = quantize_multiplier(float(real))
  total = q.sum(axis=(1, 2), keepdims=True)
  parts = min(max(c // 8, 1), int(threads))
  out, start = [], 0
  for k in range(parts):
    end = start + (c - start) // (parts - k)
    out.append(_vector_tail(total[..., start:end], m0, e, 16 * ((end - start) // 16)))
    start = end
  return np.clip(np.concatenate(out, axis=-1) + bias, *out_range)


def mean_xnnpack(q, axes, z_in, s_in, z_out, s_out, out_range=I8):
  """MEAN as XNNPACK's qs8 mean computes it (`litert-auto`, which hands int8 MEAN to XNNPACK):
  float32 throughout, the raw sum scaled and the zero points folded into one float32 bias:

    scale = f32(f32(s_in / s_out) * f32(1 / n))
    bias  = f32(z_out - f32(f32(n z_in) * scale))
    out   = clamp(rint(f32(f32(sum(q)) * scale) + bias))        (rint: half to even)

  (a fused multiply-add, or the bias as `z_out - z_in (n scale)`, each give wrong results on
  about 0.05% of outputs; this order gave none)."""
  q = np.asarray(q, np.int64)
  axes = tuple(int(a) for a in axes)
  n = int(np.prod([q.shape[a] for a in axes]))
  scale = f32(f32(f32(s_in) / f32(s_out)) * f32(f32(1.0) / f32(n)))
  bias = f32(f32(z_out) - f32(f32(n * z_in) * scale))
  total = q.sum(axis=axes, keepdims=True).astype(np.float32)
  return np.clip(rint_f32(f32(total * scale) + bias), *out_range)


# -- AVERAGE_POOL_2D ------------------------------------------------------------------------------------
def _pool_windows(shape, filt, stride, padding):
  """Per output position (y, x): the clipped window bounds, TFLite's `ComputePaddingHeightWidth`."""
  _, h, w, _ = shape
  fh, fw = filt
  sh, sw = stride
  if padding == "VALID":
    oh, ow = (h - fh + sh) // sh, (w - fw + sw) // sw
    ph = pw = 0
  else:
    oh, ow = -(-h // sh), -(-w // sw)
    ph = max((oh - 1) * sh + fh - h, 0) // 2
    pw = max((ow - 1) * sw + fw - w, 0) // 2
  ys = [(max(0, oy * sh - ph), min(h, oy * sh - ph + fh)) for oy in range(oh)]
  xs = [(max(0, ox * sw - pw), min(w, ox * sw - pw + fw)) for ox in range(ow)]
  return ys, xs


def average_pool(q, filt, stride, padding="VALID", act_range=I8):
  """AVERAGE_POOL_2D int8, reference_integer_ops::AveragePool and optimized_integer_ops::AveragePool
  (identical rule; XNNPACK does not take int8 average pooling): over the window's in-bounds
  elements (padding is not counted), the raw stored values are summed and divided rounding half
  away from zero: `s > 0 ? (s + n/2) / n : (s - n/2) / n` (C division), then clamped to the fused
  activation's range (from the output's zero point: RELU gives [z_out, 127]). Scales and zero
  points are otherwise not used: an output quantization unlike the input's is silently ignored
  (the kernel assumes they match; only debug builds check)."""
  q = np.asarray(q, np.int64)
  ys, xs = _pool_windows(q.shape, filt, stride, padding)
  out = np.empty((q.shape[0], len(ys), len(xs), q.shape[3]), np.int64)
  for i, (y0, y1) in enumerate(ys):
    for j, (x0, x1) in enumerate(xs):
      s = q[:, y0:y1, x0:x1, :].sum(axis=(1, 2))
      n = (y1 - y0) * (x1 - x0)
      a = np.abs(s) + n // 2
      out[:, i, j, :] = np.where(s > 0, a // n, -(a // n))
  return np.clip(out, *act_range)


# -- MAXIMUM / MINIMUM / RESHAPE ----------------------------------------------------------------------
def maximum(a, b):
  """MAXIMUM: the larger raw stored value, with broadcasting (maximum_minimum.cc; every family).
  Quantization parameters are ignored, including the output's."""
  return np.maximum(np.asarray(a, np.int64), np.asarray(b, np.int64))


def minimum(a, b):
  """MINIMUM: the smaller raw stored value, with broadcasting (as `maximum`)."""
  return np.minimum(np.asarray(a, np.int64), np.asarray(b, np.int64))


def reshape(q, shape):
  """RESHAPE: the same bytes in row-major order under the new shape (quantization untouched)."""
  return np.asarray(q).reshape(shape)


# -- FULLY_CONNECTED (int8 activations, int8/int4/int2 weights) --------------------------------------
def fc_accumulator(q, w, z_in, bias):
  """int32 accumulator `sum_k (q - z_in) w[c, k] + bias[c]` for int8 activations `q [B, K]` and
  weights `w [C, K]` (symmetric)."""
  return (np.asarray(q, np.int64) - z_in) @ np.asarray(w, np.int64).T + np.asarray(bias, np.int64)


def fc_reference(acc, s_in, s_w, s_out, z_out, act_range=I8):
  """FULLY_CONNECTED, reference kernel (`litert-ref`): per channel `M0, e` from
  `double(f32 s_in) * double(f32 s_w) / double(f32 s_out)`, one rounding, ties away from zero
  (`mbqm_single_away`). shared/DEPLOY.md's `(acc M0 + 2^(30-e)) >> (31-e)` (ties up) is wrong on
  negative exact ties (measured: 0.4% of outputs with power-of-two scales)."""
  return _fc_per_channel(mbqm_single_away, acc, s_in, s_w, s_out, z_out, act_range)


def fc_ruy(acc, s_in, s_w, s_out, z_out, act_range=I8):
  """FULLY_CONNECTED, optimized kernels (`litert-ruy`, and `litert-auto` where XNNPACK does not
  take the op): `mbqm_up` per channel (shared/DEPLOY.md)."""
  return _fc_per_channel(mbqm_up, acc, s_in, s_w, s_out, z_out, act_range)


def _fc_per_channel(rule, acc, s_in, s_w, s_out, z_out, act_range):
  """`rule(acc_c, M0_c, e_c) + z_out`, clamped, per output channel, with `M0_c, e_c` from
  `double(f32 s_in) * double(f32 s_w[c]) / double(f32 s_out)` (FULLY_CONNECTED's Prepare)."""
  out = np.empty(acc.shape, np.int64)
  for c in range(acc.shape[-1]):
    m0, e = quantize_multiplier(float(f32(s_in)) * float(f32(s_w[c])) / float(f32(s_out)))
    out[..., c] = rule(acc[..., c], m0, e)
  return np.clip(out + z_out, *act_range)


def fc_xnnpack(acc, s_in, s_w, s_out, z_out, act_range=I8):
  """FULLY_CONNECTED taken by XNNPACK (`litert-auto`, see `xnnpack_takes`): `rint(f32(acc) *
  f32(f32(s_in s_w) / s_out))`, half to even (shared/DEPLOY.md; measured here for int8, INT4 and
  INT2 weights)."""
  scale = f32(f32(f32(s_in) * np.asarray(s_w, np.float32)) / f32(s_out))
  return np.clip(rint_f32(np.asarray(acc, np.float32) * scale) + z_out, *act_range)


# -- which rule each family applies --------------------------------------------------------------------
def xnnpack_takes(op: str, *, weights: str = "int8", k: int | None = None,
                  in_dtype: str = "int8", out_dtype: str = "int8", ratios=()) -> bool:
  """Whether LiteRT 2.3.0's `AUTO` resolver hands a single int8 `op` to XNNPACK (measured with
  `mpq.export.tflite_builder.delegation`). FULLY_CONNECTED with INT4 / INT2 weights is taken only
  when each weight row starts on a byte: `k` (input features) even for INT4, a multiple of 4 for
  INT2; CONV_2D / DEPTHWISE_CONV_2D with INT4 weights are never taken (INT2 they reject). QUANTIZE
  int8 -> int8 is taken when the scale ratio `f32(s_in / s_out)` (`ratios`) lies in [2^-8, 2^7],
  ADD when both `f32(s_i / s_out)` lie in [2^-10, 2^8) (XNNPACK's qs8 convert and add limits;
  measured at the bounds, tests/test_requant_rules.py)."""
  if op == "QUANTIZE":
    if in_dtype != out_dtype:
      return False  # uint8 -> int8 is not taken
    return all(2.0 ** -8 <= r <= 2.0 ** 7 for r in ratios)
  if op == "ADD":
    return all(2.0 ** -10 <= abs(r) < 2.0 ** 8 for r in ratios)
  if op in ("MEAN", "RESHAPE", "MAX_POOL_2D"):
    return True
  if op in ("AVERAGE_POOL_2D", "MAXIMUM", "MINIMUM"):
    return False
  if op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
    return weights == "int8"
  if op == "FULLY_CONNECTED":
    return {"int8": True, "int4": k is not None and k % 2 == 0,
            "int2": k is not None and k % 4 == 0}[weights]
  raise ValueError(f"no delegation fact recorded for {op}")


# -- 16x8 mode (int16 activations, int8 weights, int64 bias; every family runs builtin kernels) -----------
I16 = (-32768, 32767)


def _wide_single(x, m0, shift):
  """One rounding of the exact product `x M0 / 2^(31-shift)`, ties toward +inf, in exact integer
  arithmetic (the product exceeds int64 for |x| > 2^32)."""
  total = 31 - int(shift)
  flat = [(int(v) * int(m0) + (1 << (total - 1))) >> total for v in np.ravel(x)]
  return np.asarray(flat, np.int64).reshape(np.shape(x))


def round_double(x, m: float):
  """FULLY_CONNECTED 16x8's requantization of its int64 accumulator (measured, LiteRT 2.3.0):
  `std::round(double(x) * m)` with the double `m = double(f32 s_in) double(f32 s_w,c) /
  double(f32 s_out)`: the product rounded to double, then to an integer, ties away from zero.
  Not TFLite's 31-bit fixed point: `mbqm_single_away` with `QuantizeMultiplier(m)` differs on
  about 1 output in 1.3M (within 1e-5 of a tie), all of them where the double product is the
  nearer."""
  v = np.asarray(x, np.float64) * np.float64(m)
  t = np.trunc(v)
  return (t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0.0)).astype(np.int64)


def mbqm64_reduced(x, m0, shift):
  """CONV_2D / DEPTHWISE_CONV_2D 16x8's (int64 `MultiplyByQuantizedMultiplier`): a 16-bit
  multiplier `r = (M0 + 2^15) >> 16` (0x7FFF from M0 >= 0x7FFF0000), then `(x r + 2^(14-shift))
  >> (15-shift)`: one rounding, ties toward +inf."""
  r = (int(m0) + (1 << 15)) >> 16 if m0 < 0x7FFF0000 else 0x7FFF
  return _wide_single(x, r << 16, shift)


def linear_16x8(acc, s_in, s_w, s_out, reduced: bool, act_range=I16):
  """FULLY_CONNECTED (`reduced=False`: `round_double`) or CONV_2D / DEPTHWISE_CONV_2D
  (`reduced=True`: `mbqm64_reduced`) 16x8: the int64 accumulator `acc` [..., C] (zero points 0),
  per channel `m = s_in s_w,c / s_out` in double (`M0, e` of it)."""
  out = np.empty_like(np.asarray(acc, np.int64))
  for c in range(out.shape[-1]):
    m = float(f32(s_in)) * float(f32(s_w[c])) / float(f32(s_out))
    out[..., c] = (mbqm64_reduced(acc[..., c], *quantize_multiplier(m)) if reduced else
                   round_double(acc[..., c], m))
  return np.clip(out, *act_range)


def add_16x8(a, b, s_a, s_b, s_out, vector: bool, out_range=I16):
  """ADD of int16 tensors (zero points 0) whose scales are not all powers of two (add.cc's general
  int16 path): left shift 15, `M_i, e_i` of `s_i / 2 max(s_a, s_b)`, each input `mbqm((q << 15),
  M_i, e_i)`, the sum `mbqm(., M_o, e_o)` with `M_o, e_o` of `2 max / (2^15 s_out)`
  (`litert-ref`). `vector` (optimized_ops, `litert-ruy` / `litert-auto`): over the flattened
  tensor, whole blocks of 16 from the start rescale the inputs by `mbqm_single` instead."""
  twice = 2 * max(float(f32(s_a)), float(f32(s_b)))
  m_a, e_a = quantize_multiplier(float(f32(s_a)) / twice)
  m_b, e_b = quantize_multiplier(float(f32(s_b)) / twice)
  m_o, e_o = quantize_multiplier(twice / ((1 << 15) * float(f32(s_out))))
  a = np.asarray(a, np.int64).reshape(-1) << 15
  b = np.asarray(b, np.int64).reshape(-1) << 15
  x = mbqm(a, m_a, e_a) + mbqm(b, m_b, e_b)
  if vector:
    body = np.arange(a.size) < 16 * (a.size // 16)
    x = np.where(body, mbqm_single(a, m_a, e_a) + mbqm_single(b, m_b, e_b), x)
  return np.clip(mbqm(x, m_o, e_o), *out_range)


# (op, family) -> the rule function's name. MEAN on `litert-ruy` is `mean_optimized_hw` only for a
# 4-D int8 input reduced over axes (1, 2) with keep_dims=True, else `mean_reference`.
RULES = {
    ("QUANTIZE", "litert-ref"): "requantize",
    ("QUANTIZE", "litert-ruy"): "requantize_optimized",
    ("QUANTIZE", "litert-auto"): "requantize_optimized",
    ("MEAN", "litert-ref"): "mean_reference",
    ("MEAN", "litert-ruy"): "mean_optimized_hw",
    ("MEAN", "litert-auto"): "mean_xnnpack",
    ("AVERAGE_POOL_2D", "litert-ref"): "average_pool",
    ("AVERAGE_POOL_2D", "litert-ruy"): "average_pool",
    ("AVERAGE_POOL_2D", "litert-auto"): "average_pool",
    ("MAXIMUM", "litert-ref"): "maximum",
    ("MAXIMUM", "litert-ruy"): "maximum",
    ("MAXIMUM", "litert-auto"): "maximum",
    ("MINIMUM", "litert-ref"): "minimum",
    ("MINIMUM", "litert-ruy"): "minimum",
    ("MINIMUM", "litert-auto"): "minimum",
    ("RESHAPE", "litert-ref"): "reshape",
    ("RESHAPE", "litert-ruy"): "reshape",
    ("RESHAPE", "litert-auto"): "reshape",
    ("FULLY_CONNECTED", "litert-ref"): "fc_reference",
    ("FULLY_CONNECTED", "litert-ruy"): "fc_ruy",
    ("FULLY_CONNECTED", "litert-auto"): "fc_xnnpack",  # fc_ruy where xnnpack_takes is False
    # 16x8 mode: no op delegated; QUANTIZE with an int16 side and MEAN int16 take the reference
    # kernels' rules (`requantize`, `mean_reference`) in every family
    **{(op, f): rule for f in ("litert-ref", "litert-ruy", "litert-auto")
       for op, rule in (("CONV_2D/16x8", "linear_16x8"), ("DEPTHWISE_CONV_2D/16x8", "linear_16x8"),
                        ("FULLY_CONNECTED/16x8", "linear_16x8"),
                        ("QUANTIZE/16x8", "requantize"), ("MEAN/16x8", "mean_reference"))},
    ("ADD/16x8", "litert-ref"): "add_16x8",
    ("ADD/16x8", "litert-ruy"): "add_16x8 (vector)",
    ("ADD/16x8", "litert-auto"): "add_16x8 (vector)",
}
