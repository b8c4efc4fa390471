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
    for field in ("multiplier", "shift"):
      need(op, field, op.get(field) in raw, "names no tensor in weights.npz")
    m0, sh = raw[op["multiplier"]], raw[op["shift"]]
    need(op, "multiplier", m0.dtype == np.int32 and np.all(m0 >= 0), "must be int32 >= 0")
    need(op, "shift", np.all((sh >= -31) & (sh <= 30)), "must lie in [-31, 30]")
    lo, hi = op.get("clamp", [None, None])
    need(op, "clamp", isinstance(lo, int) and isinstance(hi, int) and lo <= hi,
         "must be [lo, hi] integers with lo <= hi")
    tensors[op["multiplier"]], tensors[op["shift"]] = m0, sh

  def kernel(self, op, env, tensors):
    return requantize(op, env[op["input"]], tensors)


class Dequantize(IROp):
  """The last accumulator as float: `acc * scale_c`."""
  name = "dequantize"

  def kernel(self, op, env, tensors):
    return env[op["input"]].astype(jnp.float32) * jnp.asarray(np.asarray(op["scale"], np.float32))


register(Quantize(), Requantize(), Dequantize())
