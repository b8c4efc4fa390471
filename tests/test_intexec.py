"""Fixed-point requantization: bit-exact against an int64 NumPy transcription of gemmlowp/TFLite."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq import intexec

I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


def ref_srdhm(a, b):
  a, b = np.int64(a), np.int64(b)
  if a == b == I32_MIN:
    return I32_MAX
  ab = a * b
  nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
  v = ab + nudge
  q = abs(v) // (1 << 31)  # C division truncates toward zero
  return int(q if v >= 0 else -q)


def ref_rdbpot(x, e):
  mask = (1 << e) - 1
  rem = x & mask
  thr = (mask >> 1) + (1 if x < 0 else 0)
  return (x >> e) + (1 if rem > thr else 0)


def wrap32(v):
  return int(np.asarray(v, np.int64).astype(np.int32))


def ref_mbqm(x, m0, shift):
  left, right = max(shift, 0), max(-shift, 0)
  return ref_rdbpot(ref_srdhm(wrap32(int(x) << left), m0), right)


EDGE = [0, 1, -1, 2, -2, 3, -3, 7, -7, 1 << 15, -(1 << 15), (1 << 16) + 1, -(1 << 16) - 1,
        1 << 30, -(1 << 30), (1 << 30) - 1, I32_MAX, I32_MIN, I32_MIN + 1, I32_MAX - 1, 123456789,
        -987654321]


def test_srdhm_exact_on_edges_and_random():
  rs = np.random.RandomState(0)
  a = np.asarray(EDGE + list(rs.randint(I32_MIN, I32_MAX, 3000, dtype=np.int64)), np.int64)
  b = np.asarray(EDGE[::-1] + list(rs.randint(I32_MIN, I32_MAX, 3000, dtype=np.int64)), np.int64)
  aa, bb = np.meshgrid(np.asarray(EDGE), np.asarray(EDGE))
  a = np.concatenate([a, aa.ravel()])
  b = np.concatenate([b, bb.ravel()])
  got = np.asarray(jax.jit(intexec.saturating_rounding_doubling_high_mul)(
      a.astype(np.int32), b.astype(np.int32)))
  ref = np.asarray([ref_srdhm(x, y) for x, y in zip(a, b)], np.int64)
  np.testing.assert_array_equal(got.astype(np.int64), ref)


def test_srdhm_nonneg_exact_on_edges_and_random():
  """The fast form for multipliers >= 0 against the int64 reference (zero products included)."""
  rs = np.random.RandomState(3)
  edge_b = [b for b in EDGE if b >= 0]
  a = np.asarray(EDGE + list(rs.randint(I32_MIN, I32_MAX, 3000, dtype=np.int64)), np.int64)
  b = np.asarray(edge_b + list(rs.randint(0, I32_MAX, 3000 + len(EDGE) - len(edge_b),
                                          dtype=np.int64)), np.int64)
  aa, bb = np.meshgrid(np.asarray(EDGE), np.asarray(edge_b))
  a = np.concatenate([a, aa.ravel()])
  b = np.concatenate([b, bb.ravel()])
  got = np.asarray(jax.jit(intexec.srdhm_nonneg)(a.astype(np.int32), b.astype(np.int32)))
  ref = np.asarray([ref_srdhm(x, y) for x, y in zip(a, b)], np.int64)
  np.testing.assert_array_equal(got.astype(np.int64), ref)
  xs = rs.randint(-(1 << 24), 1 << 24, 300).astype(np.int32)
  for shift in (-20, -1, 0, 3):
    np.testing.assert_array_equal(
        intexec.multiply_by_quantized_multiplier(xs, 1518500250, shift, nonneg=True),
        [ref_mbqm(int(x), 1518500250, shift) for x in xs])


@pytest.mark.parametrize("e", list(range(0, 32)))
def test_rounding_divide_by_pot_exact(e):
  rs = np.random.RandomState(e)
  x = np.asarray(EDGE + list(rs.randint(I32_MIN, I32_MAX, 500, dtype=np.int64)), np.int64)
  # exact ties: multiples of 2^(e-1) with odd quotient
  if e > 0:
    x = np.concatenate([x, np.asarray([(2 * k + 1) << (e - 1) for k in range(-3, 3)
                                       if I32_MIN <= (2 * k + 1) << (e - 1) <= I32_MAX])])
  got = np.asarray(intexec.rounding_divide_by_pot(x.astype(np.int32), e))
  np.testing.assert_array_equal(got.astype(np.int64), [ref_rdbpot(int(v), e) for v in x])


def test_multiply_by_quantized_multiplier_exact_all_shifts():
  rs = np.random.RandomState(1)
  xs = np.asarray(EDGE + list(rs.randint(-(1 << 24), 1 << 24, 200)), np.int64)
  for shift in range(-31, 31):
    m0 = int(rs.randint(1 << 30, I32_MAX))
    got = np.asarray(intexec.multiply_by_quantized_multiplier(xs.astype(np.int32), m0, shift))
    ref = [ref_mbqm(int(x), m0, shift) for x in xs]
    np.testing.assert_array_equal(got.astype(np.int64), ref, err_msg=f"shift {shift}")


def test_per_channel_multipliers_broadcast():
  rs = np.random.RandomState(2)
  x = rs.randint(-(1 << 20), 1 << 20, (5, 4)).astype(np.int32)
  ms = [0.5, 0.0123, 1.7, 3e-5]
  m0, sh = intexec.quantize_multipliers(ms)
  got = np.asarray(intexec.multiply_by_quantized_multiplier(x, m0, sh))
  for c in range(4):
    np.testing.assert_array_equal(got[:, c], [ref_mbqm(int(v), int(m0[c]), int(sh[c]))
                                              for v in x[:, c]])
    # and it approximates x * m to within one unit
    assert np.all(np.abs(got[:, c] - x[:, c] * ms[c]) <= 1.0)


@pytest.mark.parametrize("m", [1e-12, 1e-10, 2 ** -40, 0.25, 0.5, 0.75, 1 - 2 ** -40, 1.0, 1.5,
                               3.14159, 2 ** 20, 2 ** 31, 1e12])
def test_quantize_multiplier_matches_tflite(m):
  q, shift = math.frexp(m)
  q_fixed = int(math.floor(q * 2 ** 31 + 0.5))
  if q_fixed == 2 ** 31:
    q_fixed, shift = q_fixed // 2, shift + 1
  if shift < -31:
    q_fixed, shift = 0, 0
  if shift > 30:
    q_fixed, shift = 2 ** 31 - 1, 30
  assert intexec.quantize_multiplier(m) == (q_fixed, shift)
  m0, s = intexec.quantize_multiplier(m)
  assert 0 <= m0 <= I32_MAX and -31 <= s <= 30
  if 2 ** -31 < m < 2 ** 30:
    assert m0 * 2.0 ** (s - 31) == pytest.approx(m, rel=2 ** -30)


def test_quantize_multiplier_rejects_bad_values():
  assert intexec.quantize_multiplier(0.0) == (0, 0)
  for bad in (-0.5, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="finite multiplier >= 0"):
      intexec.quantize_multiplier(bad)


def test_double_rounding_example_and_single_rounding_multiplier():
  # x m = 4117 * 6.0716e-4 = 2.49968: TFLite's normalised multiplier (shift -11) rounds it to a
  # multiple of 2^-11 first (2.5) and then to 3; the single-rounding form gives round(x m) = 2.
  m, x = 6.0716e-4, 4117
  m0, shift = intexec.quantize_multiplier(m)
  assert shift == -10 and ref_mbqm(x, m0, shift) == 3
  m1, s1 = intexec.requant_multiplier(m, out_max=16)
  assert (m1, s1) == (int(math.floor(m * 2 ** 31 + 0.5)), 0) and ref_mbqm(x, m1, s1) == 2


@pytest.mark.parametrize("m,out_max", [(6.07e-4, 16), (3.3e-3, 4), (1.2e-5, 256), (2e-8, 256),
                                       (0.3, 256), (0.7, 16), (3.5, 16)])
def test_requant_multiplier_error_bound(m, out_max):
  """Brute force over every accumulator with |x m| <= out_max: wrong roundings (against
  floor(x m + 1/2) in exact arithmetic) occur only within the documented bound of a tie, and never
  more often than with TFLite's normalised multiplier."""
  from fractions import Fraction
  mf = Fraction(m)
  xmax = min(int(out_max / m), I32_MAX)
  xs = np.unique(np.linspace(-xmax, xmax, 20001).astype(np.int64))
  m1, s1 = intexec.requant_multiplier(m, out_max)
  m0, s0 = intexec.quantize_multiplier(m)
  assert 0 < m1 <= I32_MAX and -31 <= s1 <= 30
  got = np.asarray(intexec.multiply_by_quantized_multiplier(xs.astype(np.int32), m1, s1), np.int64)
  tfl = np.asarray(intexec.multiply_by_quantized_multiplier(xs.astype(np.int32), m0, s0), np.int64)
  exact = np.asarray([math.floor(int(x) * mf + Fraction(1, 2)) for x in xs], np.int64)
  if s1 < 0:
    bound = 2.0 ** (s1 - 1) + out_max * 2.0 ** (s1 - 32) / m
  else:
    bound = out_max * 2.0 ** -32 / m + 2.0 ** -31
  for x in xs[got != exact]:  # every wrong rounding lies within `bound` of a half-integer
    v = int(x) * mf
    assert abs(float(v - math.floor(v) - Fraction(1, 2))) <= bound
  assert np.sum(got != exact) <= np.sum(tfl != exact)


def test_fixed_point_core_is_int32_only():
  """No 64-bit or floating-point op in the jaxpr (JAX default 32-bit mode)."""
  jaxpr = jax.make_jaxpr(intexec.multiply_by_quantized_multiplier)(
      jnp.zeros((8,), jnp.int32), jnp.int32(1 << 30), jnp.int32(-5))
  dtypes = {str(v.aval.dtype) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
  assert dtypes <= {"int32", "uint32", "bool"}, dtypes


def test_max_pool_before_requantize_gives_the_same_integers():
  """The executor pools accumulators before requantizing when the requantization is monotone:
  compared with the manifest order (requantize, then pool) against the int64 reference, on
  accumulators of both signs with per-channel multipliers, including exact rounding ties."""
  from mpq.intexec.executor import _swapped
  rs = np.random.RandomState(5)
  acc = rs.randint(-2 ** 20, 2 ** 20, (2, 6, 6, 3)).astype(np.int32)
  acc[0, 0, 0, 0], acc[0, 0, 1, 0] = 3 << 9, -(3 << 9)  # ties at shift -10
  m0 = np.asarray([1 << 30, 1518500250, 2 ** 31 - 1], np.int32)
  sh = np.asarray([-10, -3, 0], np.int32)
  t = {"m": m0, "s": sh}
  rq = {"op": "requantize", "name": "rq", "input": "a", "output": "q", "multiplier": "m",
        "shift": "s", "zero_point": 3, "clamp": [-128, 127], "bits": 8}
  pool = {"op": "max_pool", "name": "p", "input": "q", "output": "o", "window": 2}
  manifest = {"ops": [{"op": "quantize", "output": "a"}, rq, pool,
                      {"op": "dequantize", "input": "o", "scale": 1.0}]}
  _, core, _ = intexec.build(manifest, t)
  assert _swapped(manifest["ops"][1:-1], t) == {0}
  ref = np.vectorize(ref_mbqm)(acc, m0, sh) + 3
  ref = np.clip(ref, -128, 127).reshape(2, 3, 2, 3, 2, 3).max(axis=(2, 4))
  np.testing.assert_array_equal(core(jnp.asarray(acc)), ref)
  # not reordered where a left shift could wrap, or where the requantized tensor has other uses
  assert _swapped(manifest["ops"][1:-1], {"m": m0, "s": np.asarray([-10, 1, 0], np.int32)}) == set()
  other = {"op": "max_pool", "name": "p2", "input": "q", "output": "o2", "window": 3}
  assert _swapped([rq, pool, other], t) == set()
