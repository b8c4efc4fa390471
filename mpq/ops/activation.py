"""Activations: `relu` and `relu6`, applied by layers (`activation=`) and lowered as clamps.

Between an accumulator and the next quantizer a ReLU is the requantization clamp's lower end
(`lo = z_out`) and ReLU6 also its upper end (`hi = round_half_up(6 / s_out) + z_out`); where they
must run on the accumulator (before average pooling) they are the IR op `clamp` with
`[0, 2^31 - 1]`, ReLU6 with a per-channel `hi = round_half_up(6 / s_acc,c)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mpq.ops.registry import Activation, IROp, register
from mpq.rounding import half_up

INT32_MAX = 2 ** 31 - 1


class ReLU(Activation):
  name = "relu"

  def apply(self, y):
    return jax.nn.relu(y)

  def _hi(self, lw, acc):
    return INT32_MAX

  def on_accumulator(self, lw, acc, node):
    out = lw.new()
    op = {"op": "clamp", "name": f"{acc.name}/{self.name}", "input": acc.tensor, "output": out,
          "lo": 0, "hi": self._hi(lw, acc)}
    lw.emit(op)
    return acc._replace(tensor=out)

  def clamp(self, lo, hi, zero_point, scale):
    return max(lo, zero_point), hi


class ReLU6(ReLU):
  name = "relu6"

  def apply(self, y):
    return jax.nn.relu6(y)

  def _hi(self, lw, acc):
    scale = np.asarray(acc.scale, np.float64)
    hi = np.minimum(lw.round("clamp", np.asarray(6.0 / scale, np.float32)), INT32_MAX)
    hi = hi.astype(np.int32)
    name = f"{acc.name}/relu6_hi"
    lw.tensors[name] = np.broadcast_to(hi, scale.shape).copy()
    return name

  def clamp(self, lo, hi, zero_point, scale):
    lo, hi = super().clamp(lo, hi, zero_point, scale)
    # round(6 / s_out) as the quantizer that follows rounds (half up: mpq's fake quant)
    return lo, min(hi, int(half_up(np.float32(6.0 / scale))) + zero_point)


class ClampIR(IROp):
  """`clip(x, lo, hi)`; `hi` an integer or the name of a per-channel int32 tensor."""
  name = "clamp"

  def validate(self, op, raw, tensors, need):
    """`lo` an int32 integer; `hi` one too, or the name of a non-empty 1-d int32 tensor (per
    channel); lo <= hi."""
    lo = self.integer(op, "lo", need, -2 ** 31, INT32_MAX)
    if isinstance(op.get("hi"), str):
      t = self.tensor(op, "hi", raw, need, np.int32, ndim=1,
                      what="a non-empty 1-d int32 tensor (per channel)")
      need(op, "hi", t.size >= 1, "must name a non-empty 1-d int32 tensor (per channel)")
      tensors[op["hi"]] = t
      hi = int(t.min())
    else:
      hi = self.integer(op, "hi", need, -2 ** 31, INT32_MAX)
    need(op, "lo", lo <= hi, f"must be <= hi ({hi}){self.got(op, 'lo')}")

  def kernel(self, op, env, tensors):
    hi = op["hi"]
    hi = jnp.asarray(tensors[hi], jnp.int32) if isinstance(hi, str) else jnp.int32(hi)
    return jnp.clip(env[op["input"]], jnp.int32(op["lo"]), hi)


register(ReLU(), ReLU6(), ClampIR())
