"""gemmlowp/TFLite fixed-point requantization with 32-bit integers only (Jacob et al. 2017).

A real multiplier `M > 0` is stored as `M0 * 2^shift` with `M0` an int32 in Q0.31 (TFLite's
`QuantizeMultiplier`). Applying it to an int32 accumulator `x` (TFLite's default, double-rounding
`MultiplyByQuantizedMultiplier`):

    left  = max(shift, 0), right = max(-shift, 0)
    RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^left, M0), right)

SaturatingRoundingDoublingHighMul(a, b): INT32_MAX if a == b == INT32_MIN, else
`(a*b + nudge) / 2^31` truncated toward zero, nudge = 2^30 if a*b >= 0 else 1 - 2^30.
RoundingDivideByPOT(x, e): `(x >> e) + (remainder > threshold)`, remainder `x & (2^e - 1)`,
threshold `(2^e - 1) >> 1` plus 1 for negative x (round half away from zero).

The 64-bit product is formed from 16-bit halves in uint32 arithmetic, so everything runs with JAX's
default 32-bit types (no `jax_enable_x64`) and is bit-exact with the int64 C reference (tested).
`x * 2^left` wraps modulo 2^32 on overflow, as the C code does in practice.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def quantize_multiplier(m: float) -> tuple[int, int]:
  """(M0, shift) with `m ~= M0 * 2^(shift - 31)`, TFLite's `QuantizeMultiplier` for `m >= 0`.

  `q, shift = frexp(m)`; `M0 = round_half_away(q * 2^31)`; if `M0 == 2^31`: `M0 /= 2, shift += 1`;
  if `shift < -31`: `(0, 0)`; if `shift > 30`: `(2^31 - 1, 30)` (saturated, as TFLite).
  """
  m = float(m)
  if not math.isfinite(m) or m < 0:
    raise ValueError(f"quantize_multiplier needs a finite multiplier >= 0, got {m}")
  if m == 0.0:
    return 0, 0
  q, shift = math.frexp(m)
  q_fixed = int(math.floor(abs(q) * 2 ** 31 + 0.5))  # round half away from zero (q > 0)
  if q_fixed == 2 ** 31:
    q_fixed //= 2
    shift += 1
  if shift < -31:
    return 0, 0
  if shift > 30:
    return INT32_MAX, 30
  return q_fixed, shift


def _u32(x):
  return jnp.asarray(x).astype(jnp.uint32)


def _wide_mul(ua, ub):
  """The 64-bit product of two uint32 arrays as (high, low) uint32 words, from 16-bit halves."""
  lo16 = jnp.uint32(0xFFFF)
  a0, a1 = ua & lo16, ua >> 16
  b0, b1 = ub & lo16, ub >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & lo16) + (p10 & lo16)
  lo = (p00 & lo16) | (mid << 16)
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return hi, lo


def saturating_rounding_doubling_high_mul(a, b):
  """gemmlowp's SaturatingRoundingDoublingHighMul on int32 arrays (broadcasting)."""
  a = jnp.asarray(a, jnp.int32)
  b = jnp.asarray(b, jnp.int32)
  neg = (a < 0) != (b < 0)
  # |a|, |b| as uint32 (|INT32_MIN| = 2^31 fits); the int32 -> uint32 cast wraps, so negate there.
  ua = jnp.where(a < 0, jnp.uint32(0) - _u32(a), _u32(a))
  ub = jnp.where(b < 0, jnp.uint32(0) - _u32(b), _u32(b))
  hi, lo = _wide_mul(ua, ub)
  # M = |a*b| = hi:lo; result = sign * floor((M + c) / 2^31), c = 2^30 (a*b >= 0) or 2^30 - 1
  nonzero = (ua != 0) & (ub != 0)
  c = jnp.where(neg & nonzero, jnp.uint32(2 ** 30 - 1), jnp.uint32(2 ** 30))
  lo2 = lo + c
  hi2 = hi + (lo2 < lo).astype(jnp.uint32)
  mag = (hi2 << 1) | (lo2 >> 31)  # < 2^31 except the saturating case
  out = jnp.where(neg & nonzero, -(mag.astype(jnp.int32)), mag.astype(jnp.int32))
  saturate = (a == INT32_MIN) & (b == INT32_MIN)
  return jnp.where(saturate, jnp.int32(INT32_MAX), out)


def srdhm_nonneg(a, b):
  """`saturating_rounding_doubling_high_mul(a, b)` for multipliers `0 <= b <= INT32_MAX` (every
  `M0` that `quantize_multiplier` writes), in fewer operations: the product's sign is `a`'s; the
  saturating case (`a == b == INT32_MIN`) cannot occur; and a zero product needs no special case,
  since `floor((0 + 2^30 - 1) / 2^31) == 0` either way. Bit-exact with the general form (tested)."""
  a = jnp.asarray(a, jnp.int32)
  ub = _u32(jnp.asarray(b, jnp.int32))
  neg = a < 0
  ua = jnp.where(neg, jnp.uint32(0) - _u32(a), _u32(a))
  hi, lo = _wide_mul(ua, ub)
  lo2 = lo + jnp.where(neg, jnp.uint32(2 ** 30 - 1), jnp.uint32(2 ** 30))
  hi2 = hi + (lo2 < lo).astype(jnp.uint32)
  mag = ((hi2 << 1) | (lo2 >> 31)).astype(jnp.int32)
  return jnp.where(neg, -mag, mag)


def rounding_divide_by_pot(x, exponent):
  """gemmlowp's RoundingDivideByPOT: `x / 2^exponent` rounded half away from zero, 0 <= e <= 31."""
  x = jnp.asarray(x, jnp.int32)
  e = jnp.asarray(exponent, jnp.int32)
  mask = jnp.left_shift(jnp.int32(1), e) - 1  # wraps to INT32_MAX at e = 31, as intended
  remainder = x & mask
  threshold = jnp.right_shift(mask, 1) + (x < 0).astype(jnp.int32)
  return jnp.right_shift(x, e) + (remainder > threshold).astype(jnp.int32)


def multiply_by_quantized_multiplier(x, multiplier, shift, nonneg: bool = False):
  """TFLite's `MultiplyByQuantizedMultiplier(x, M0, shift)` on int32 arrays.

  `multiplier` (int32 M0) and `shift` (in [-31, 30]) are scalars or arrays broadcasting against `x`
  (e.g. per output channel on the last axis). `nonneg=True` promises `M0 >= 0` (the caller checks
  its constants) and takes `srdhm_nonneg`.
  """
  x = jnp.asarray(x, jnp.int32)
  shift = jnp.asarray(shift, jnp.int32)
  left = jnp.maximum(shift, 0)
  right = jnp.maximum(-shift, 0)
  high_mul = srdhm_nonneg if nonneg else saturating_rounding_doubling_high_mul
  return rounding_divide_by_pot(high_mul(jnp.left_shift(x, left), multiplier), right)


def rounding_divide_by_pot_up(x, exponent):
  """`x / 2^exponent` rounded half toward +inf, 0 <= e <= 31: `(x >> e) + bit e-1 of x`, the
  rounding shift of ARM's `vrshlq_s32` (no overflow, unlike `(x + 2^(e-1)) >> e` in int32)."""
  x = jnp.asarray(x, jnp.int32)
  e = jnp.asarray(exponent, jnp.int32)
  half = jnp.right_shift(x, jnp.maximum(e - 1, 0)) & 1
  return jnp.right_shift(x, e) + jnp.where(e > 0, half, 0)


def multiply_by_quantized_multiplier_up(x, multiplier, shift):
  """The vectorized form of LiteRT's optimized kernels (`MultiplyByQuantizedMultiplier4Rows`:
  `vqrdmulhq_s32`, then the rounding shift `vrshlq_s32`): SaturatingRoundingDoublingHighMul as in
  `multiply_by_quantized_multiplier`, then a last shift that rounds ties toward +inf. LiteRT's
  `litert-ruy` CONV_2D / FULLY_CONNECTED rule (`mpq.export.litert_rules.mbqm_up`)."""
  x = jnp.asarray(x, jnp.int32)
  shift = jnp.asarray(shift, jnp.int32)
  h = saturating_rounding_doubling_high_mul(jnp.left_shift(x, jnp.maximum(shift, 0)), multiplier)
  return rounding_divide_by_pot_up(h, jnp.maximum(-shift, 0))


def multiply_by_quantized_multiplier_single_away(x, multiplier, shift):
  """One rounding, ties away from zero: `sign(x) floor((|x| M0 + 2^(30-shift)) / 2^(31-shift))`
  for `M0 >= 0` and `shift` in [-31, 30] (LiteRT's reference FULLY_CONNECTED, `litert-ref`;
  `mpq.export.litert_rules`). The 64-bit product `|x| M0` is formed from 16-bit halves, so this
  runs in 32-bit types; a result beyond int32 wraps as the C code's cast does."""
  return _single_rounding(x, multiplier, shift, ties_up=False)


def multiply_by_quantized_multiplier_exact(x, multiplier, shift):
  """One rounding, ties toward +inf: `floor(x M0 / 2^(31-shift) + 1/2)` exactly, for `M0 >= 0`
  and `shift` in [-31, 30] (mpq's own requantization, rule `exact`: the half-up rounding of the
  fake-quant model, of the exact product, with no second rounding). Computed as
  `multiply_by_quantized_multiplier_single_away` does (a 64-bit product from 16-bit halves), with
  `2^(30-shift) - 1` added to the magnitude of a negative product instead of `2^(30-shift)`."""
  return _single_rounding(x, multiplier, shift, ties_up=True)


def _single_rounding(x, multiplier, shift, ties_up: bool):
  """`sign(x) floor((|x| M0 + c) / 2^(31-shift))`, `c = 2^(30-shift)`, less 1 for negative `x`
  when `ties_up` (then `-floor((A + c - 1) / 2^n) = floor((-A + c) / 2^n)`: ties toward +inf)."""
  x = jnp.asarray(x, jnp.int32)
  total = 31 - jnp.asarray(shift, jnp.int32)  # 1..62
  neg = x < 0
  ua = jnp.where(neg, jnp.uint32(0) - _u32(x), _u32(x))
  hi, lo = _wide_mul(ua, _u32(jnp.asarray(multiplier, jnp.int32)))
  # add 2^(total - 1) (less 1 for a negative x when ties_up) to hi:lo
  in_lo = total - 1 < 32
  add_lo = jnp.where(in_lo, jnp.left_shift(jnp.uint32(1), _u32(jnp.minimum(total - 1, 31))),
                     jnp.uint32(0))
  add_hi = jnp.where(in_lo, jnp.uint32(0),
                     jnp.left_shift(jnp.uint32(1), _u32(jnp.clip(total - 33, 0, 31))))
  if ties_up:  # the addend minus 1: a borrow from add_hi when add_lo is 0
    borrow = neg & (add_lo == 0)
    add_hi = add_hi - borrow.astype(jnp.uint32)
    add_lo = add_lo - neg.astype(jnp.uint32)
  lo2 = lo + add_lo
  hi2 = hi + add_hi + (lo2 < lo).astype(jnp.uint32)
  # (hi2:lo2) >> total, total in [1, 62]
  t_hi = _u32(jnp.clip(total - 32, 0, 31))
  t_lo = _u32(jnp.clip(total, 1, 31))
  mag = jnp.where(total >= 32, jnp.right_shift(hi2, t_hi),
                  jnp.left_shift(hi2, _u32(32) - t_lo) | jnp.right_shift(lo2, t_lo))
  mag = mag.astype(jnp.int32)
  return jnp.where(neg, -mag, mag)


def multiply_by_float32_even(x, scale):
  """XNNPACK's requantization (`litert-auto` for the ops it takes; ONNX Runtime's QLinear ops):
  `rint_half_even(f32(x) * scale)` with `scale` the float32 `f32(f32(s_in s_w) / s_out)`."""
  y = jnp.asarray(x, jnp.int32).astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
  return jnp.round(y).astype(jnp.int32)


def requant_multiplier(m: float, out_max: float) -> tuple[int, int]:
  """(M0, shift) for `multiply_by_quantized_multiplier` that round `x * m` most faithfully, for
  accumulators with `|x * m| <= out_max`.

  TFLite's normalised form (`quantize_multiplier`, `M0` in [2^30, 2^31)) with `shift = -r < 0`
  rounds twice: `SaturatingRoundingDoublingHighMul` rounds `x m` to a multiple of `2^-r`, then
  `RoundingDivideByPOT` rounds that to an integer, so values within `2^-(r+1)` of a half-integer can
  round the wrong way (e.g. `x m = 2.49976` with `r = 10` gives 3). With `shift = 0` and
  `M0 = round(m 2^31)` (valid for `m < 1/2`), the high multiply does the only rounding,
  `floor(x M0 / 2^31 + 1/2)`, but `M0` then carries fewer significant bits: `|x (M0 2^-31 - m)| <=
  out_max 2^-32 / m`. This picks whichever error bound is smaller; both are exact TFLite semantics
  for the executor, which never assumes a normalised `M0`.
  """
  m0, shift = quantize_multiplier(m)
  if shift >= 0 or m == 0.0:
    return m0, shift
  double = 2.0 ** (shift - 1) + out_max * 2.0 ** (shift - 32) / m
  single = out_max * 2.0 ** -32 / m
  single_m0 = int(math.floor(m * 2 ** 31 + 0.5))
  if single < double and 0 < single_m0 < 2 ** 31:
    return single_m0, 0
  return m0, shift


def quantize_multipliers(ms, out_max: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`quantize_multiplier` over an array, or `requant_multiplier(m, out_max)` when `out_max` is
  given: (M0 int32 array, shift int32 array)."""
  pairs = [quantize_multiplier(m) if out_max is None else requant_multiplier(m, out_max)
           for m in np.ravel(ms)]
  shape = np.shape(ms)
  return (np.asarray([p[0] for p in pairs], np.int32).reshape(shape),
          np.asarray([p[1] for p in pairs], np.int32).reshape(shape))
