"""Quantizer functions and estimators against NumPy references and closed-form gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq.quant import core, estimators as est
from mpq.quant.oscillation import Oscillation
from mpq.quant.quantizer import Quantizer

RNG = np.random.RandomState(0)


def rhu(v):
  """Round half up (ties toward +inf), mpq's rounding, in float64."""
  return np.floor(np.asarray(v, np.float64) + 0.5)


def test_round_half_up_on_ties_and_near_ties():
  below = np.nextafter(np.float32(0.5), np.float32(0))  # 0.49999997: + 0.5 rounds to 1 in float32
  v = np.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, below, -below, 1.4999999, 2 ** 22 + 0.5,
                  -(2 ** 22) - 0.5, 3.0, -3.0], np.float32)
  want = [-2, -1, 0, 1, 2, 3, 0, 0, 1, 2 ** 22 + 1, -(2 ** 22), 3, -3]
  np.testing.assert_array_equal(np.asarray(core.round_half_up(jnp.asarray(v))), want)
  x = RNG.randn(10000).astype(np.float32) * 100
  np.testing.assert_array_equal(np.asarray(core.round_half_up(x)), rhu(x))


def np_range(bits, signed, narrow=False):
  if signed:
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax
  return 0, 2 ** bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("signed,narrow", [(True, False), (True, True), (False, False)])
def test_qrange_and_quantize_match_numpy(bits, signed, narrow):
  lo, hi = np_range(bits, signed, narrow)
  qmin, qmax = core.qrange(jnp.asarray(bits), signed, narrow)
  assert (float(qmin), float(qmax)) == (lo, hi)
  x = RNG.randn(1000).astype(np.float32) * 3
  scale, zp = 0.05, (0 if signed else 7)
  q = core.quantize(x, scale, zp, bits, signed, narrow)
  ref = np.clip(rhu(x / np.float32(scale)) + zp, lo, hi).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(q), ref)
  np.testing.assert_allclose(core.dequantize(q, scale, zp), (ref - zp) * np.float32(scale), rtol=1e-6)
  np.testing.assert_allclose(core.fake_quant(x, scale, zp, bits, signed, narrow),
                             (ref - zp) * np.float32(scale), rtol=1e-6)


def test_per_channel_quantize_any_axis():
  x = RNG.randn(3, 5, 4).astype(np.float32)
  for axis in range(3):
    n = x.shape[axis]
    s = (np.arange(n, dtype=np.float32) + 1) * 0.1
    shaped = s.reshape(core.channel_shape(3, axis, n))
    q = core.quantize(x, shaped, 0, 4, True)
    ref = np.clip(rhu(x / shaped), -8, 7)
    np.testing.assert_array_equal(np.asarray(q), ref)


def test_affine_params_make_zero_exact():
  scale, zp = core.affine_params(jnp.asarray(-0.37), jnp.asarray(2.11), 8)
  assert float(zp) == round(float(zp)) and 0 <= float(zp) <= 255
  assert float(core.fake_quant(jnp.zeros(()), scale, zp, 8, False)) == 0.0
  # a range not containing 0 is widened to contain it
  scale, zp = core.affine_params(jnp.asarray(0.5), jnp.asarray(2.0), 8)
  assert float(zp) == 0 and float(scale) == pytest.approx(2.0 / 255)


def _weighted_grads(f, *args, argnums):
  w = jnp.asarray(RNG.randn(*np.shape(args[0])).astype(np.float32))
  return w, jax.grad(lambda *a: jnp.sum(w * f(*a)), argnums=argnums)(*args)


def test_ste_fake_quant_gradient_is_clipped_identity():
  x = jnp.asarray(np.linspace(-3, 3, 101, dtype=np.float32))
  scale, zp = 0.1, 3.0
  w, (dx,) = _weighted_grads(lambda x: core.fake_quant(x, scale, zp, 4, False), x, argnums=(0,))
  v = np.asarray(x) / scale + zp
  np.testing.assert_allclose(dx, np.where((v >= 0) & (v <= 15), w, 0.0))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradients_closed_form(signed, per_channel):
  bits = 3
  n, p = np_range(bits, signed)
  x = RNG.randn(6, 4).astype(np.float32) * (1.0 if signed else 0.7)
  x = x if signed else np.abs(x)
  s = (np.asarray([0.1, 0.2, 0.15, 0.3], np.float32).reshape(1, 4) if per_channel
       else np.float32(0.2))
  w, (dx, ds) = _weighted_grads(lambda x, s: est.lsq(x, s, jnp.float32(n), jnp.float32(p)),
                                jnp.asarray(x), jnp.asarray(s), argnums=(0, 1))
  v = x / s
  inside = (v >= n) & (v <= p)
  np.testing.assert_allclose(dx, np.where(inside, w, 0))
  ds_elem = np.where(v < n, n, np.where(v > p, p, rhu(v) - v))
  ref = (w * ds_elem).sum(axis=0, keepdims=True) if per_channel else (w * ds_elem).sum()
  np.testing.assert_allclose(ds, ref, rtol=1e-5, atol=1e-6)
  y = est.lsq(jnp.asarray(x), jnp.asarray(s), jnp.float32(n), jnp.float32(p))
  np.testing.assert_allclose(y, rhu(np.clip(v, n, p)) * s, rtol=1e-6)


def test_lsq_gradient_scale():
  s = jnp.float32(0.2)
  g = est.lsq_grad_scale(100, 7.0)
  assert float(g) == pytest.approx(1 / math.sqrt(700))
  x = jnp.asarray(RNG.randn(50).astype(np.float32))
  f = lambda s: jnp.sum(est.lsq(x, s, -8.0, 7.0))
  fs = lambda s: jnp.sum(est.lsq(x, est.scale_grad(s, g), -8.0, 7.0))
  assert float(fs(s)) == float(f(s))
  assert float(jax.grad(fs)(s)) == pytest.approx(float(g) * float(jax.grad(f)(s)), rel=1e-5)


def test_lsq_plus_offset_gradient():
  x = jnp.asarray(np.linspace(-2, 3, 64, dtype=np.float32))
  s, beta = jnp.float32(0.25), jnp.float32(0.4)
  w, (dx, dbeta) = _weighted_grads(lambda x, b: est.lsq_plus(x, s, b, -4.0, 3.0), x, beta,
                                   argnums=(0, 1))
  v = (np.asarray(x) - 0.4) / 0.25
  inside = (v >= -4) & (v <= 3)
  np.testing.assert_allclose(dx, np.where(inside, w, 0))
  np.testing.assert_allclose(dbeta, np.sum(np.where(inside, 0, w)), rtol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_tqt_forward_and_gradients(signed):
  bits = 4
  n, p = np_range(bits, signed)
  x = RNG.randn(200).astype(np.float32) * 1.5
  x = x if signed else np.abs(x)
  log2_t = np.float32(0.3)  # threshold 2^ceil(0.3) = 2
  s = 2.0 / (2 ** (bits - 1) if signed else 2 ** bits)
  assert float(est.tqt_scale(log2_t, bits, signed)) == s
  w, (dx, dl) = _weighted_grads(lambda x, l: est.tqt(x, l, bits, signed), jnp.asarray(x),
                                jnp.asarray(log2_t), argnums=(0, 1))
  v = x / s
  np.testing.assert_allclose(est.tqt(x, log2_t, bits, signed), np.clip(rhu(v), n, p) * s,
                             rtol=1e-6)
  inside = (v >= n) & (v <= p)
  np.testing.assert_allclose(dx, np.where(inside, w, 0))
  ref = np.sum(w * s * math.log(2) * np.where(v < n, n, np.where(v > p, p, rhu(v) - v)))
  np.testing.assert_allclose(dl, ref, rtol=1e-4, atol=1e-6)


def test_noise_is_exact_at_zero_and_bounded_by_error():
  x = jnp.asarray(RNG.randn(500).astype(np.float32))
  q = est.lsq(x, jnp.float32(0.3), -4.0, 3.0)
  u = est.hash_uniform(jnp.uint32(1), x.shape)
  np.testing.assert_array_equal(est.noisy(q, x, 0.0, u), q)
  y = est.noisy(q, x, 0.5, u)
  bound = 0.5 * np.abs(np.asarray(q) - np.asarray(x)) + 1e-7
  assert np.all(np.abs(np.asarray(y) - np.asarray(q)) <= bound)
  assert np.any(np.asarray(y) != np.asarray(q))
  # the noise carries no gradient: d/dx equals LSQ's
  gx = jax.grad(lambda x: jnp.sum(est.noisy(est.lsq(x, 0.3, -4.0, 3.0), x, 0.5, u)))(x)
  gq = jax.grad(lambda x: jnp.sum(est.lsq(x, 0.3, -4.0, 3.0)))(x)
  np.testing.assert_array_equal(gx, gq)
  assert float(est.noise_amplitude(1000, 0.5, 1000.0)) == pytest.approx(0.5 / math.e)


def test_fmix32_matches_murmur3_reference():
  """MurmurHash3's fmix32 written independently in Python integers."""
  def ref(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)
  vals = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789]
  got = est.fmix32(jnp.asarray(vals, jnp.uint32))
  assert [int(v) for v in got] == [ref(v) for v in vals]


def test_hash_uniform_is_uniform_and_uncorrelated():
  n = 1 << 18
  a = np.asarray(est.hash_uniform(jnp.uint32(7), (n,)), np.float64)
  b = np.asarray(est.hash_uniform(jnp.uint32(8), (n,)), np.float64)
  assert a.min() >= -1.0 and a.max() < 1.0
  # moments of U(-1, 1): mean 0 (sd 1/sqrt(3n)), variance 1/3
  assert abs(a.mean()) < 4 / math.sqrt(3 * n) and abs(a.var() - 1 / 3) < 0.005
  # chi-square over 64 bins: 63 degrees of freedom, 99.99th percentile ~ 116
  counts = np.histogram(a, bins=64, range=(-1, 1))[0]
  assert np.sum((counts - n / 64) ** 2 / (n / 64)) < 116
  # neighbours, and the streams of two consecutive seeds, are uncorrelated (sd of r ~ 1/sqrt(n))
  assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 4 / math.sqrt(n)
  assert abs(np.corrcoef(a, b)[0, 1]) < 4 / math.sqrt(n)
  # deterministic, and shaped
  np.testing.assert_array_equal(est.hash_uniform(jnp.uint32(7), (n,)), a.astype(np.float32))
  assert est.hash_uniform(jnp.uint32(7), (4, 3, 2)).shape == (4, 3, 2)


@pytest.mark.parametrize("rng", ["hash", "threefry"])
def test_noise_quantizer_draws_fresh_noise_per_call_and_layer(rng):
  x = jnp.asarray(RNG.randn(4, 64).astype(np.float32))
  qa = Quantizer("a", "act", "noise", 3, signed=True, noise_lambda0=0.5, noise_rng=rng)
  qb = Quantizer("b", "act", "noise", 3, signed=True, noise_lambda0=0.5, noise_rng=rng)
  for q in (qa, qb):
    q.step_size.value = jnp.float32(0.3)
  y1, y2, yb = qa(x, train=True), qa(x, train=True), qb(x, train=True)
  exact = est.lsq(x, jnp.float32(0.3), -4.0, 3.0)
  for y in (y1, y2, yb):
    assert np.mean(np.asarray(y) != np.asarray(exact)) > 0.9
  assert not np.array_equal(y1, y2) and not np.array_equal(y1, yb)
  np.testing.assert_array_equal(qa(x, train=False), exact)  # no noise at evaluation


def test_noise_quantizer_learns_its_gradient_scale():
  """d loss / d rho = (d loss / d s') * g * exp(rho) * s, the learnable gradient scale of noise."""
  q = Quantizer("l", "act", "noise", 4, signed=True, noise_lambda0=0.0)
  q.step_size.value = jnp.float32(0.2)
  x = jnp.asarray(RNG.randn(8, 16).astype(np.float32))
  from flax import nnx
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, train=False) ** 2)

  grads = jax.grad(loss)(params)
  g = 1 / math.sqrt(16 * 7)
  y = est.lsq(x, jnp.float32(0.2), -8.0, 7.0)
  _, ds = jax.vjp(lambda s: est.lsq(x, s, -8.0, 7.0), jnp.float32(0.2))
  ds = ds(2 * y)[0]
  assert float(grads["step_size"].value) == pytest.approx(g * float(ds), rel=1e-5)
  assert float(grads["grad_log_scale"].value) == pytest.approx(float(ds) * g * 0.2, rel=1e-5)


@pytest.mark.parametrize("b", [2.0, 3.3, 4.75, 7.5, 16.0])
def test_dbits_interpolation_and_gradients(b):
  x = jnp.asarray(RNG.randn(300).astype(np.float32))
  amax = jnp.float32(2.0)
  lo = min(math.floor(b), 15)
  f = b - lo

  def q_np(k):
    pk = 2 ** (k - 1) - 1
    s = 2.0 / pk
    return rhu(np.clip(np.asarray(x) / s, -pk, pk)) * s, s, pk

  (q_lo, s_lo, p_lo), (q_hi, s_hi, p_hi) = q_np(lo), q_np(lo + 1)
  y = est.dbits(x, amax, jnp.float32(b), True)
  np.testing.assert_allclose(y, (1 - f) * q_lo + f * q_hi, rtol=1e-5, atol=1e-6)
  db = jax.grad(lambda bb: jnp.sum(est.dbits(x, amax, bb, True)))(jnp.float32(b))
  np.testing.assert_allclose(db, np.sum(q_hi - q_lo), rtol=1e-4, atol=1e-4)

  def ds(s, pk):  # LSQ step gradient summed
    v = np.asarray(x) / s
    return np.sum(np.where(v < -pk, -pk, np.where(v > pk, pk, rhu(v) - v)))

  damax_ref = (1 - f) * ds(s_lo, p_lo) / p_lo + f * ds(s_hi, p_hi) / p_hi
  da = jax.grad(lambda a: jnp.sum(est.dbits(x, a, jnp.float32(b), True)))(amax)
  np.testing.assert_allclose(da, damax_ref, rtol=1e-4, atol=1e-4)


def test_dbits_quantizer_evaluates_at_rounded_bits():
  q = Quantizer("l", "weight", "dbits", 3.6, channels=4, ndim=2)
  q.amax.value = jnp.full((1, 4), 1.5)
  w = jnp.asarray(RNG.randn(10, 4).astype(np.float32))
  assert float(q.int_bits()) == 4
  np.testing.assert_allclose(q(w, train=False), est.dbits(w, q.amax.value, 4.0, True), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["ste", "lsq", "tqt", "noise", "dbits"])
def test_quantizer_output_lies_on_its_exported_grid(estimator):
  """Eval output == dequantize(quantize(x)) on the grid `integer_grid()` reports."""
  q = Quantizer("l", "act", estimator, 4, signed=False)
  q.set_range(2.5, lo=0.0)
  x = jnp.asarray(np.abs(RNG.randn(64, 8)).astype(np.float32) * 1.5)
  g = q.integer_grid()
  scale, zp = g["scale"], g["zero_point"]
  ref = core.dequantize(core.quantize(x, scale, zp, g["bits"], g["signed"], g["narrow"]), scale, zp)
  np.testing.assert_allclose(q(x, train=False), ref, rtol=1e-6, atol=1e-7)


def _osc_quantizer(freeze=0.0, dampen=False, m=0.25):
  q = Quantizer("l", "weight", "lsq", 4, channels=2, ndim=2, kernel_shape=(1, 2),
                oscillation=Oscillation(track=True, freeze=freeze, momentum=m, dampen=dampen))
  q.step_size.value = jnp.full((1, 2), 0.1)
  return q


def test_oscillation_frequency_matches_closed_form():
  """Weight 0 flips between integers 0 and 1 every step, weight 1 moves monotonically: after call
  k >= 2 the first has f = 1 - (1 - m)^(k - 2), the second f = 0."""
  m = 0.25
  q = _osc_quantizer(m=m)
  for k in range(1, 9):
    w = jnp.asarray([[0.04 if k % 2 else 0.06, 0.1 * k]], jnp.float32)
    q(w, train=True)
    f = np.asarray(q.osc_freq.value)[0]
    assert f[0] == pytest.approx(1 - (1 - m) ** (k - 2) if k >= 2 else 0.0, abs=1e-6)
    assert f[1] == 0.0


def test_freezing_fixes_oscillating_weights_at_their_average_integer():
  q = _osc_quantizer(freeze=0.5, m=0.25)
  for k in range(1, 12):
    w = jnp.asarray([[0.04 if k % 2 else 0.06, 0.1 * k]], jnp.float32)
    y = q(w, train=True)
  frozen = np.asarray(q.frozen.value)[0]
  assert frozen[0] == 1 and frozen[1] == 0
  assert float(q.frozen_int.value[0, 0]) in (0.0, 1.0)
  # frozen: the output no longer follows the weight, and the weight gets no gradient
  w = jnp.asarray([[0.9, 0.3]], jnp.float32)
  np.testing.assert_allclose(q(w, train=False)[0, 0], float(q.frozen_int.value[0, 0]) * 0.1)
  g = jax.grad(lambda w: jnp.sum(q(w, train=False)))(w)
  assert float(g[0, 0]) == 0.0 and float(g[0, 1]) == 1.0


def test_dampening_term_closed_form():
  q = _osc_quantizer(dampen=True)
  w = jnp.asarray([[0.33, 2.0]], jnp.float32)  # the second weight is clipped at 0.7
  q(w, train=True)
  expected = (((0.3 - 0.33) / 0.1) ** 2 + ((0.7 - 0.7) / 0.1) ** 2) / 2  # mean, in LSB^2
  assert float(q.damp.value) == pytest.approx(expected, rel=1e-4)
  assert float(q.clip_frac.value) == 0.5


def test_distillation_loss_is_scaled_kl():
  from mpq.losses import distillation_loss
  s = RNG.randn(4, 10).astype(np.float32)
  t = RNG.randn(4, 10).astype(np.float32)
  for temp in (1.0, 3.0):
    p = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    q = np.exp(s / temp) / np.exp(s / temp).sum(-1, keepdims=True)
    ref = temp ** 2 * np.sum(p * np.log(p / q), axis=-1)
    np.testing.assert_allclose(distillation_loss(s, t, temp), ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(distillation_loss(t, t, 2.0), 0.0, atol=1e-6)
