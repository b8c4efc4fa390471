"""Residual addition: the `add` layer and IR op (TFLite's ADD).

`y = s_a q_a + s_b q_b` with both inputs on their own signed grids: each input `(q - z) << L`
(L = 31 - max input bits, so |q| << L stays below 2^30) is multiplied by `s_i / (2 max(s_a, s_b))`
(MultiplyByQuantizedMultiplier) and the two are summed: an int32 accumulator at scale
`2 max(s_a, s_b) / 2^L`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mpq.fixedpoint import multiply_by_quantized_multiplier
from mpq.ops.registry import IROp, OpKind, register


class Add(OpKind):
  name, quantizable = "add", True

  def lower(self, lw, node) -> None:
    layer, name = lw.quantized_layer(node), node.name
    ins = [lw.to_grid(t, q, f"{name}/{k}") for t, q, k in
           zip(node.inputs, (layer.aq_a, layer.aq_b), ("a", "b"))]
    scales = [float(g["scale"][0]) for _, g in ins]
    s_max = max(scales)
    left = 31 - max(g["bits"] for _, g in ins)
    s_acc = 2 * s_max / 2 ** left
    mults = [lw.multiplier(s / (2 * s_max), 2.0 ** 30) for s in scales]
    t_acc = lw.new()
    lw.emit({"op": "add", "name": name, "inputs": [t for t, _ in ins], "output": t_acc,
             "left_shift": left, "multipliers": [m for m, _ in mults],
             "shifts": [s for _, s in mults],
             "input_zero_points": [int(g["zero_point"][0]) for _, g in ins],
             "input_scales": scales, "a_bits": [g["bits"] for _, g in ins],
             "quantizers": [layer.aq_a.name, layer.aq_b.name]})
    lw.accumulator(node.output, name, t_acc, np.asarray([s_acc]), 2.0 ** 31 - 1)


class AddIR(IROp):
  name = "add"

  def inputs(self, op):
    return list(op.get("inputs") or [])

  def validate(self, op, raw, tensors, need):
    need(op, "inputs", isinstance(op.get("inputs"), list) and len(op["inputs"]) == 2,
         "must list two tensors")
    need(op, "left_shift", isinstance(op.get("left_shift"), int) and 0 <= op["left_shift"] <= 30,
         "must be an integer in [0, 30]")
    for field, ok, what in (("multipliers", lambda v: 0 <= v <= 2 ** 31 - 1, "int32 >= 0"),
                            ("shifts", lambda v: -31 <= v <= 30, "in [-31, 30]"),
                            ("input_zero_points", lambda v: True, "integers")):
      vals = op.get(field)
      need(op, field, isinstance(vals, list) and len(vals) == 2
           and all(isinstance(v, int) and ok(v) for v in vals), f"must be two {what}")

  def kernel(self, op, env, tensors):
    acc = jnp.int32(0)
    for name, z, m0, sh in zip(op["inputs"], op["input_zero_points"], op["multipliers"],
                               op["shifts"]):
      xi = jnp.left_shift(env[name] - jnp.int32(z), jnp.int32(op["left_shift"]))
      acc = acc + multiply_by_quantized_multiplier(xi, jnp.int32(m0), jnp.int32(sh),
                                                   nonneg=m0 >= 0)
    return acc


register(Add(), AddIR())
