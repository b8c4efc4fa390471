"""Uniform quantization as pure functions: ranges, `quantize`, `dequantize`, `fake_quant`.

Affine mapping (Jacob et al. 2017, arXiv 1712.05877): a real value r is represented by an integer q
with `r = scale * (q - zero_point)`. Symmetric quantization is the case `zero_point = 0`.

    quantize(x)   = clip(round(x / scale) + zero_point, qmin, qmax)      (integers, int32)
    dequantize(q) = scale * (q - zero_point)
    fake_quant(x) = dequantize(quantize(x))                               (float, same shape as x)

Integer ranges for b bits:
    signed            [-2^(b-1), 2^(b-1) - 1]
    signed, narrow    [-(2^(b-1) - 1), 2^(b-1) - 1]     (symmetric: -qmax is representable)
    unsigned          [0, 2^b - 1]

`bits` is always an array (a traced value inside `jit`), never baked into the graph as a Python
constant, so changing a layer's bitwidth between steps does not recompile. `scale` and
`zero_point` broadcast against `x`: a scalar for per-tensor quantization, or shaped like
`channel_shape(x.ndim, axis, n)` for per-channel quantization along `axis`.

Rounding is `round_half_up` (`mpq.rounding.half_up`, ties toward +inf): the rounding of gemmlowp's
fixed-point multiply, so that evaluation and the integer executor agree on exact ties (which are
common with power-of-two scales). `fake_quant` passes gradients straight through inside the
clipping range and blocks them outside (the clipped straight-through estimator); the learned
estimators in `mpq.quant.estimators` add gradients for the scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpq.rounding import half_up as round_half_up  # the mpq target's rule (mpq.rounding)

MIN_BITS, MAX_BITS = 2, 16


def pow2i(e) -> jax.Array:
  """Exactly 2^e as float32 for integer-valued `e` (array or int), via an integer shift."""
  e = jnp.asarray(e)
  return jnp.left_shift(jnp.int32(1), e.astype(jnp.int32)).astype(jnp.float32)


def qrange(bits, signed: bool, narrow: bool = False) -> tuple[jax.Array, jax.Array]:
  """(qmin, qmax) as float32 arrays for integer `bits` (traced)."""
  if signed:
    qmax = pow2i(jnp.asarray(bits) - 1) - 1
    qmin = -qmax if narrow else -qmax - 1
  else:
    qmin = jnp.zeros_like(pow2i(bits))
    qmax = pow2i(bits) - 1
  return qmin, qmax


def channel_shape(ndim: int, axis: int, n: int) -> tuple[int, ...]:
  """Shape of a per-channel parameter that broadcasts against an `ndim` array along `axis`."""
  axis = axis % ndim
  return tuple(n if i == axis else 1 for i in range(ndim))


def reduce_to(y: jax.Array, shape) -> jax.Array:
  """Sums `y` over the axes on which an array of `shape` was broadcast to `y.shape`."""
  shape = tuple(shape)
  lead = y.ndim - len(shape)
  y = jnp.sum(y, axis=tuple(range(lead))) if lead else y
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and y.shape[i] != 1)
  return jnp.sum(y, axis=axes, keepdims=True).reshape(shape) if axes else y.reshape(shape)


def quantize(x, scale, zero_point, bits, signed: bool, narrow: bool = False) -> jax.Array:
  """Integers `clip(round(x / scale) + zero_point, qmin, qmax)` as int32."""
  qmin, qmax = qrange(bits, signed, narrow)
  q = jnp.clip(round_half_up(x / scale) + zero_point, qmin, qmax)
  return q.astype(jnp.int32)


def dequantize(q, scale, zero_point=0.0) -> jax.Array:
  """`scale * (q - zero_point)` in float32."""
  return (jnp.asarray(q, jnp.float32) - zero_point) * scale


@jax.custom_vjp
def _fake_quant(x, scale, zero_point, qmin, qmax):
  return (jnp.clip(round_half_up(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _fake_quant_fwd(x, scale, zero_point, qmin, qmax):
  v = x / scale + zero_point
  inside = (v >= qmin) & (v <= qmax)
  return _fake_quant(x, scale, zero_point, qmin, qmax), (inside, scale, zero_point, qmin, qmax)


def _fake_quant_bwd(res, g):
  inside, scale, zero_point, qmin, qmax = res
  z = jnp.zeros_like
  return (jnp.where(inside, g, 0.0), z(scale), z(zero_point), z(qmin), z(qmax))


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, scale, zero_point, bits, signed: bool, narrow: bool = False) -> jax.Array:
  """`dequantize(quantize(x))`, with the clipped straight-through gradient.

  Forward: `scale * (clip(round(x / scale) + zero_point, qmin, qmax) - zero_point)`.
  Backward: `d/dx = 1` where `qmin <= x / scale + zero_point <= qmax`, else 0; no gradient
  reaches `scale`, `zero_point` or `bits` (ranges are statistics here, not parameters).
  """
  qmin, qmax = qrange(bits, signed, narrow)
  return _fake_quant(x, scale, zero_point, qmin, qmax)


def symmetric_scale(amax, bits, signed: bool = True, narrow: bool = True) -> jax.Array:
  """Scale that maps `amax` to the largest integer: `amax / qmax` (Wu et al. 2020)."""
  _, qmax = qrange(bits, signed, narrow)
  return jnp.maximum(amax, 1e-8) / qmax


def affine_params(lo, hi, bits) -> tuple[jax.Array, jax.Array]:
  """(scale, zero_point) for the range [lo, hi] on the unsigned grid [0, 2^b - 1].

  The range is first widened to contain 0; the zero point is rounded to an integer in
  [qmin, qmax] ("nudged", Jacob et al. 2017) so that real 0 is exactly representable.
  """
  qmin, qmax = qrange(bits, signed=False)
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  scale = jnp.maximum(hi - lo, 1e-8) / (qmax - qmin)
  zero_point = jnp.clip(round_half_up(qmin - lo / scale), qmin, qmax)
  return scale, zero_point
