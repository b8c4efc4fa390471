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
    left = lw.target.add_shift(max(g["bits"] for _, g in ins))
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
  name, input_field = "add", "inputs"

  def inputs(self, op):
    v = op.get("inputs")
    return list(v) if isinstance(v, list) else [v]

  def validate(self, op, raw, tensors, need):
    """Two input tensors, each with its bits (2-16), zero point on that grid, scale > 0,
    quantizer name, int32 multiplier >= 0 and shift in [-31, 30]; `left_shift` in [0, 30]."""
    need(op, "inputs", isinstance(op.get("inputs"), list) and len(op["inputs"]) == 2
         and all(isinstance(t, str) for t in op["inputs"]),
         f"must list two tensor names{self.got(op, 'inputs')}")
    self.integer(op, "left_shift", need, 0, 30)
    self.integers(op, "multipliers", need, 2, 0, 2 ** 31 - 1)
    self.integers(op, "shifts", need, 2, -31, 30)
    bits = self.integers(op, "a_bits", need, 2, 2, 16)
    zs = self.integers(op, "input_zero_points", need, 2)
    for b, z in zip(bits, zs):
      lo, hi = self.bits_range(b)
      need(op, "input_zero_points", lo <= z <= hi, f"must lie on their inputs' grids ({b} bits: "
           f"[{lo}, {hi}]){self.got(op, 'input_zero_points')}")
    self.scales(op, "input_scales", need, sizes=[2])
    need(op, "quantizers", isinstance(op.get("quantizers"), list) and len(op["quantizers"]) == 2
         and all(isinstance(q, str) for q in op["quantizers"]),
         f"must list two quantizer names{self.got(op, 'quantizers')}")

  def value_range(self, op, ranges, need):
    """Each input is a grid tensor whose `(q - z) << left_shift` fits int32 over its range."""
    for t, z in zip(op["inputs"], op["input_zero_points"]):
      r = ranges.get(t)
      need(op, "inputs", r is not None, f"names {t!r}, which is no integer grid tensor (an "
           "accumulator); requantize it first")
      d = max(abs(r[0] - z), abs(r[1] - z))
      need(op, "left_shift", d << op["left_shift"] <= 2 ** 31 - 1,
           f"{op['left_shift']} overflows int32 on input {t!r} (range {list(r)}, zero point {z})")
    return None

  def kernel(self, op, env, tensors):
    acc = jnp.int32(0)
    for name, z, m0, sh in zip(op["inputs"], op["input_zero_points"], op["multipliers"],
                               op["shifts"]):
      xi = jnp.left_shift(env[name] - jnp.int32(z), jnp.int32(op["left_shift"]))
      acc = acc + multiply_by_quantized_multiplier(xi, jnp.int32(m0), jnp.int32(sh),
                                                   nonneg=m0 >= 0)
    return acc

  def tflite_op(self, op):
    return "ADD"

  def tflite(self, op, w):
    """ADD of two int8 tensors with the consuming requantization fused (its output grid and clamp
    as a fused activation). LiteRT derives the same left shift (20) and multipliers from the
    file's scales (add.cc Prepare): checked here against the op's."""
    from mpq.fixedpoint import quantize_multiplier  # pylint: disable=g-import-not-at-top
    r = w.requantize_of(op)
    xs = []
    for t, z in zip(op["inputs"], op["input_zero_points"]):
      x, off = w.grid(op, t)
      if z + off != w.builder.tensors[x].quantization.zeroPoint[0]:
        w.fail(op, f"its input zero point for {t!r} differs from the tensor's")
      xs.append(x)
    s = [float(np.float32(v)) for v in op["input_scales"]]
    twice_max = 2.0 * max(s)
    want = [quantize_multiplier(v / twice_max) for v in s]
    if op["left_shift"] != 20 or [list(p) for p in want] != [
        [m, sh] for m, sh in zip(op["multipliers"], op["shifts"])]:
      w.fail(op, "its left shift and input multipliers are not LiteRT's (left shift 20, "
             "QuantizeMultiplier(s_i / 2 max(s_a, s_b))); export with --target=tflite")
    y, act = w.fused_output(r)
    w.builder.add_operator("ADD", xs, [y], w.builder.options("AddOptions",
                                                             fusedActivationFunction=act))


register(Add(), AddIR())
