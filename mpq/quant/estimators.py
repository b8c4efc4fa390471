"""Gradient estimators for fake quantization, each a `jax.custom_vjp` with its math written down.

Notation: `v = x / s`; `n, p` the integer range (signed `n = -2^(b-1), p = 2^(b-1) - 1`, unsigned
`n = 0, p = 2^b - 1`); "inside" means `n <= v <= p`. All functions are elementwise in `x` with
parameters (`s`, `log2_t`, ...) broadcasting against `x`: a parameter's gradient is the sum over
the elements that share it.

ste    (Jacob et al. 2017)   `fake_quant` in `mpq.quant.core`: range from statistics, no range gradient.
lsq    (Esser et al. 2019)   `lsq(x, s, n, p)`; `lsq_plus` adds a learned offset (LSQ+).
tqt    (Jain et al. 2019)    `tqt(x, log2_t, bits, signed)`: power-of-2 scale from a log2 threshold.
noise  (Wang et al. 2022)    `noisy(q, x, amplitude, key)`: error-aware noise on top of `lsq`.
dbits  (Uhlich et al. 2020, SDQ)  `dbits(x, amax, bits, signed)`: continuous bitwidth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mpq.quant.core import MAX_BITS, MIN_BITS, pow2i, qrange, reduce_to, round_half_up

LN2 = math.log(2.0)


def scale_grad(s, g):
  """Returns `s` unchanged in value with its gradient multiplied by `g` (LSQ gradient scaling).

  `s' = stop_gradient(s - g * s) + g * s`, so `s' == s` and `dL/ds = g * dL/ds'`.
  """
  return jax.lax.stop_gradient(s - g * s) + g * s


def lsq_grad_scale(n_per_scale, qmax) -> jax.Array:
  """LSQ's gradient scale `g = 1 / sqrt(N * Qp)` (N = elements sharing one step size)."""
  return jax.lax.rsqrt(jnp.maximum(n_per_scale * qmax, 1.0))


# ----------------------------------------------------------------------------------------------- LSQ
@jax.custom_vjp
def lsq(x, s, n, p):
  """Learned-step-size fake quantization (Esser et al. 2019, "Learned Step Size Quantization").

  Forward:   `x_hat = round(clip(x / s, n, p)) * s`
  Backward:  `d x_hat / d x = 1` inside, 0 outside;
             `d x_hat / d s = round(v) - v` inside, `n` below, `p` above (summed to `s`'s shape).
  No gradient reaches `n` and `p`. Apply `scale_grad(s, lsq_grad_scale(N, p))` to `s` first for
  the paper's gradient scale.
  """
  return round_half_up(jnp.clip(x / s, n, p)) * s


def _lsq_fwd(x, s, n, p):
  v = x / s
  return round_half_up(jnp.clip(v, n, p)) * s, (v, s, n, p)


def _lsq_bwd(res, g):
  v, s, n, p = res
  inside = (v >= n) & (v <= p)
  dx = jnp.where(inside, g, 0.0)
  ds_elem = jnp.where(v < n, n, jnp.where(v > p, p, round_half_up(v) - v))
  ds = reduce_to(g * ds_elem, jnp.shape(s))
  return dx, ds, jnp.zeros_like(n), jnp.zeros_like(p)


lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_plus(x, s, beta, n, p):
  """LSQ+ (Bhalgat et al. 2020): learned offset `beta` for asymmetric activations.

  `x_hat = round(clip((x - beta) / s, n, p)) * s + beta`. Through `lsq`'s gradients:
  `d x_hat / d beta = 1 - d x_hat / d x` = 0 inside, 1 outside; `d/ds` as for `lsq` at `x - beta`.
  """
  return lsq(x - beta, s, n, p) + beta


# ----------------------------------------------------------------------------------------------- TQT
def tqt_scale(log2_t, bits, signed: bool) -> jax.Array:
  """TQT's power-of-2 scale `2^ceil(log2_t) / 2^(b-1)` (signed) or `/ 2^b` (unsigned): the one
  place this formula lives (the estimator's forward, its weight grid and its export use it)."""
  return jnp.exp2(jnp.ceil(log2_t)) / pow2i(jnp.asarray(bits) - (1 if signed else 0))


@jax.custom_vjp
def _tqt(x, log2_t, s, n, p):
  return jnp.clip(round_half_up(x / s), n, p) * s


def _tqt_fwd(x, log2_t, s, n, p):
  v = x / s
  return jnp.clip(round_half_up(v), n, p) * s, (v, s, log2_t, n, p)


def _tqt_bwd(res, g):
  v, s, log2_t, n, p = res
  inside = (v >= n) & (v <= p)
  dx = jnp.where(inside, g, 0.0)
  dl = s * LN2 * jnp.where(v < n, n, jnp.where(v > p, p, round_half_up(v) - v))
  z = jnp.zeros_like
  return dx, reduce_to(g * dl, jnp.shape(log2_t)), z(s), z(n), z(p)


_tqt.defvjp(_tqt_fwd, _tqt_bwd)


def tqt(x, log2_t, bits, signed: bool):
  """Trained quantization thresholds (Jain et al. 2019, arXiv 1903.08066).

  Forward:   `s = 2^ceil(log2_t) / 2^(b-1)` (signed; `/ 2^b` unsigned), `q = clip(round(x/s), n, p) * s`
  Backward:  `d q / d x = 1` inside, 0 outside (round and ceil pass straight through);
             `d q / d log2_t = s ln2 (round(v) - v)` inside, `s ln2 n` below, `s ln2 p` above.
  """
  n, p = qrange(bits, signed)
  return _tqt(x, log2_t, tqt_scale(log2_t, bits, signed), n, p)


# --------------------------------------------------------------------------------------------- noise
def noise_amplitude(step, lambda0: float, tau: float) -> jax.Array:
  """`lambda0 * exp(-step / tau)`: the decaying noise amplitude (0 when `lambda0 == 0`)."""
  return lambda0 * jnp.exp(-jnp.asarray(step, jnp.float32) / tau)


def fmix32(h) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 with full avalanche (every input bit
  flips each output bit with probability about 1/2)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_uniform(seed, shape) -> jax.Array:
  """Uniform(-1, 1) float32 noise from a counter-based hash of each element's flat index i:
  `fmix32(i * 0x9E3779B9 + fmix32(seed))`, whose top 24 bits give `u = (k + 1/2) / 2^23 - 1`.

  About ten integer operations per element, which fuse with the quantizer's own elementwise work;
  threefry (`jax.random.uniform`) costs several times that (`noise_uniform`). The quality needed here (noise injection, not Monte Carlo) is checked
  in the tests: moments, a chi-square of 64 bins, and correlation between neighbours and seeds.
  Distinct seeds give distinct streams; a stream repeats only after 2^32 elements.
  """
  n = math.prod(shape)
  i = jax.lax.iota(jnp.uint32, n)
  h = fmix32(i * jnp.uint32(0x9E3779B9) + fmix32(jnp.asarray(seed).astype(jnp.uint32)))
  k = (h >> 8).astype(jnp.int32).astype(jnp.float32)
  return ((k + 0.5) * (2.0 ** -23) - 1.0).reshape(shape)


NOISE_RNGS = ("hash", "threefry")


def noise_uniform(rng: str, layer_seed: int, count, shape) -> jax.Array:
  """U(-1, 1) noise for training call `count` of the quantizer seeded `layer_seed`: a fresh stream
  per quantizer and call.

  'hash'      `hash_uniform(fmix32(layer_seed) + count)`: about ten integer ops per element.
  'threefry'  `jax.random.uniform` with `fold_in(key(layer_seed), count)`: the reference generator,
              several times the work (resnet20's noise step over the float step, measured in one
              process: 1.61 with it, 1.26 with 'hash').
  On cnn W2A2 (benchmarks/accuracy.py, seeds 0, 1, 2) 'hash' reached 89.40 / 89.54 / 89.72% and
  'threefry' 89.80 / 89.54 / 89.84%: within the seed-to-seed spread, though on average 0.17 lower.
  """
  if rng == "threefry":
    key = jax.random.fold_in(jax.random.key(layer_seed), count)
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
  if rng != "hash":
    raise ValueError(f"unknown noise rng {rng!r}; use one of {NOISE_RNGS}")
  seed = fmix32(jnp.uint32(layer_seed)) + jnp.asarray(count).astype(jnp.uint32)
  return hash_uniform(seed, shape)


def noisy(q, x, amplitude, u):
  """Quantization-error-aware noise on a fake-quantized `q = Q(x)` (Wang et al. 2022, noise tempering).

  `y = q + amplitude * |q - x| * u`, `u ~ Uniform(-1, 1)` per element (`noise_uniform`), with
  the noise term held constant in the backward pass (`stop_gradient`), so the gradients are those
  of `q` (LSQ). The noise scales with the actual rounding/clipping error of each element and
  vanishes with `amplitude`: at amplitude 0, `y == q` exactly. (The paper's exact formula was not at
  hand; this is the documented behaviour from its abstract: exact quantization plus
  error-proportional noise whose amplitude decays exponentially.)
  """
  return q + jax.lax.stop_gradient(amplitude * jnp.abs(q - x) * u)


# --------------------------------------------------------------------------------------------- dbits
def effective_bits(bits, fixed_bits, integer: bool = False) -> jax.Array:
  """The bitwidth a `dbits` quantizer uses: its fixed bits once set (`fixed_bits > 0`), else the
  continuous `bits` clipped to [MIN_BITS, MAX_BITS], rounded half up first when `integer` (the
  bits it evaluates and exports at). The size budget of `mixed.method=dbits` counts these bits."""
  b = round_half_up(bits) if integer else bits
  return jnp.where(fixed_bits > 0, fixed_bits, jnp.clip(b, MIN_BITS, MAX_BITS))


def dbits(x, amax, bits, signed: bool, grad_scale=1.0):
  """Differentiable bitwidth (Uhlich et al. 2020 parametrisation; SDQ-style interpolation).

  The clipping range `amax` and a continuous bitwidth `b` are parameters. With `b` clipped to
  [MIN_BITS, MAX_BITS] (the gradient passes the clip straight through, so `b` can re-enter), `lo = min(floor(b), MAX_BITS - 1)`, `f = b - lo` (lo held constant):

      Q_k(x) = lsq(x, amax / p_k, n_k, p_k)          (k = lo, lo + 1; p_k = qmax at k bits)
      y      = (1 - f) Q_lo(x) + f Q_lo+1(x)

  so `dy/db = Q_lo+1(x) - Q_lo(x)`, `dy/dx` and `dy/d amax` are the interpolated LSQ gradients
  (through `s_k = amax / p_k`). `grad_scale` multiplies `amax`'s gradient (LSQ-style). At integer
  `b` the forward is exactly `b`-bit quantization with step `amax / p_b`.
  """
  b = bits + jax.lax.stop_gradient(jnp.clip(bits, MIN_BITS, MAX_BITS) - bits)  # straight-through clip
  lo = jax.lax.stop_gradient(jnp.minimum(jnp.floor(b), MAX_BITS - 1))
  f = b - lo
  amax = scale_grad(amax, grad_scale)

  def q(k):
    n, p = qrange(k, signed, narrow=signed)
    return lsq(x, amax / p, n, p)

  return (1.0 - f) * q(lo) + f * q(lo + 1)
