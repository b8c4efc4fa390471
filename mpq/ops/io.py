"""The IR ops at a quantized tensor's boundaries: `quantize` (float input -> the first grid),
`requantize` (int32 accumulator -> the next quantizer's grid) and `dequantize` (the last
accumulator -> float logits). They belong to no op kind: the exporter emits them around every op."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mpq.fixedpoint import multiply_by_quantized_multiplier
from mpq.ops.registry import IROp, register
from mpq.rounding import half_up


class Quantize(IROp):
  """`clip(round_half_up(x / s) + z, qmin, qmax)` of the float input."""
  name = "quantize"

  def validate(self, op, raw, tensors, need):
    bits = self.bits(op, "bits", need)
    self.scale(op, "scale", need)
    lo, hi = self.bits_range(bits)
    qmin = self.integer(op, "qmin", need, lo, hi - 1)
    qmax = self.integer(op, "qmax", need, qmin + 1, min(hi, qmin + 2 ** bits - 1))
    self.integer(op, "zero_point", need, qmin, qmax)

  def value_range(self, op, ranges, need):
    return op["qmin"], op["qmax"]

  def kernel(self, op, env, tensors):
    x = half_up(jnp.asarray(env[op["input"]], jnp.float32) / op["scale"]) + op["zero_point"]
    return jnp.clip(x, op["qmin"], op["qmax"]).astype(jnp.int32)


def requantize(op, x, tensors):
  """`MultiplyByQuantizedMultiplier(acc, M0_c, shift_c) + z_out`, clamped to `op["clamp"]`."""
  m0 = np.asarray(tensors[op["multiplier"]])
  y = multiply_by_quantized_multiplier(x, jnp.asarray(m0, jnp.int32),
                                       jnp.asarray(tensors[op["shift"]], jnp.int32),
                                       nonneg=bool(np.all(m0 >= 0)))
  lo, hi = op["clamp"]
  return jnp.clip(y + jnp.int32(op["zero_point"]), jnp.int32(lo), jnp.int32(hi))


class Requantize(IROp):
  name = "requantize"

  def validate(self, op, raw, tensors, need):
    """M0 and shift: int32 tensors of one shape (per output channel, or one), M0 >= 0, shift in
    [-31, 30]; the output grid: `bits` 2-16, `zero_point` and `clamp` on it."""
    m0 = self.tensor(op, "multiplier", raw, need, np.int32, ndim=1,
                     what="a non-empty 1-d int32 tensor (M0 per output channel)")
    need(op, "multiplier", m0.size >= 1 and np.all(m0 >= 0),
         "must hold integers >= 0 (a non-empty int32 tensor)")
    sh = self.tensor(op, "shift", raw, need, np.int32, shape=m0.shape,
                     what=f"an int32 tensor of the multiplier's shape {m0.shape}")
    need(op, "shift", np.all((sh >= -31) & (sh <= 30)), "must hold integers in [-31, 30]")
    bits = self.bits(op, "bits", need)
    self.grid_range(op, "clamp", bits, need, strict=False)
    self.integer(op, "zero_point", need, *self.bits_range(bits))
    tensors[op["multiplier"]], tensors[op["shift"]] = m0, sh

  def value_range(self, op, ranges, need):
    return tuple(op["clamp"])

  def kernel(self, op, env, tensors):
    return requantize(op, env[op["input"]], tensors)


class Dequantize(IROp):
  """The last accumulator as float: `acc * scale_c`."""
  name = "dequantize"

  def validate(self, op, raw, tensors, need):
    """`scale`: finite numbers > 0, one or one per class (the loader checks the count)."""
    self.scales(op, "scale", need)

  def kernel(self, op, env, tensors):
    return env[op["input"]].astype(jnp.float32) * jnp.asarray(np.asarray(op["scale"], np.float32))


register(Quantize(), Requantize(), Dequantize())
