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
    """The target's form (`Target.add_ir`): `add` (fixed point, an int32 accumulator at
    `2 max(s_a, s_b) / 2^L`) or `qlinear_add` (ONNX Runtime's float32 QLinearAdd, straight onto the
    consumer's grid, which the target's requantizer records in the op)."""
    layer, name = lw.quantized_layer(node), node.name
    ins = [lw.to_grid(t, q, f"{name}/{k}") for t, q, k in
           zip(node.inputs, (layer.aq_a, layer.aq_b), ("a", "b"))]
    scales = [float(g["scale"][0]) for _, g in ins]
    if lw.target.add_ir == "qlinear_add":
      offsets = []
      for t, _ in ins:
        if t not in lw.grids:
          lw.fail(f"layer {name!r}: an input of the addition is not a requantized tensor, which "
                  f"export target {lw.target.name!r} needs")
        offsets.append(lw.target.storage_offset(*lw.grids[t]["clamp"]))
      t_acc = lw.new()
      lw.emit({"op": "qlinear_add", "name": name, "inputs": [t for t, _ in ins], "output": t_acc,
               "input_scales": scales, "input_zero_points": [int(g["zero_point"][0]) for _, g in ins],
               "input_storage": offsets, "a_bits": [g["bits"] for _, g in ins],
               "quantizers": [layer.aq_a.name, layer.aq_b.name]})
      # the accumulator is the output grid's integers minus its zero point: scale 1 of that grid
      lw.accumulator(node.output, name, t_acc, np.asarray([1.0]), 2.0 ** 24)
      return
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
    w.finish_output(r["output"])


class QLinearAddIR(AddIR):
  """ONNX Runtime's com.microsoft QLinearAdd (`mpq.export.ort_rules.qlinear_add`: float32, two
  fused multiply-adds on the stored uint8 values, rounded half to even), onto the output grid
  (`output_scale`, `output_zero_point`, `output_storage`) that the `requantize` consuming it
  completes (scale 1, rule float32_even: `y = x`, then `+ z`, clamped). Its output is the result's
  integers minus the output zero point. `input_storage` / `output_storage`: what the file adds to
  each grid's integers (uint8 storage; the rule depends on the stored values, not only on
  `q - z`)."""
  name = "qlinear_add"

  def validate(self, op, raw, tensors, need):
    need(op, "inputs", isinstance(op.get("inputs"), list) and len(op["inputs"]) == 2
         and all(isinstance(t, str) for t in op["inputs"]),
         f"must list two tensor names{self.got(op, 'inputs')}")
    self.integers(op, "a_bits", need, 2, 2, 8)
    self.integers(op, "input_zero_points", need, 2, -255, 255)
    self.integers(op, "input_storage", need, 2, -255, 255)
    self.scales(op, "input_scales", need, sizes=[2])
    self.scale(op, "output_scale", need)
    self.integer(op, "output_zero_point", need, -255, 255)
    self.integer(op, "output_storage", need, -255, 255)
    for z, off in [*zip(op["input_zero_points"], op["input_storage"]),
                   (op["output_zero_point"], op["output_storage"])]:
      need(op, "input_storage", 0 <= z + off <= 255, "must put every zero point in uint8 "
           f"(zero point {z}, storage offset {off})")

  def value_range(self, op, ranges, need):
    """Each input is a grid tensor whose stored values `q + storage` lie in uint8."""
    for t, off in zip(op["inputs"], op["input_storage"]):
      r = ranges.get(t)
      need(op, "inputs", r is not None, f"names {t!r}, which is no integer grid tensor (an "
           "accumulator); requantize it first")
      need(op, "input_storage", 0 <= r[0] + off and r[1] + off <= 255,
           f"{off} does not put input {t!r} (range {list(r)}) in uint8")
    return None

  @staticmethod
  def table(op) -> np.ndarray:
    """The result minus the output zero point for every pair of stored inputs [256, 256], computed
    on the host in exact float32 (the kernel looks it up)."""
    from mpq.float32 import f32, fma_f32, rint_f32  # pylint: disable=g-import-not-at-top
    (s_a, s_b), s_c = op["input_scales"], op["output_scale"]
    z_a, z_b = (z + off for z, off in zip(op["input_zero_points"], op["input_storage"]))
    z_c = op["output_zero_point"] + op["output_storage"]
    r_a, r_b = f32(f32(s_a) / f32(s_c)), f32(f32(s_b) / f32(s_c))
    k = f32(f32(z_c) - f32(f32(r_a * f32(z_a)) + f32(r_b * f32(z_b))))
    v = np.arange(256, dtype=np.float32)
    inner = fma_f32(v, r_b, k)  # per stored b
    out = rint_f32(fma_f32(v[:, None], r_a, inner[None, :]))  # [a, b]
    return (np.clip(out, -2 ** 24, 2 ** 24) - z_c).astype(np.int32)

  def kernel(self, op, env, tensors):
    a, b = (env[t] + jnp.int32(off) for t, off in zip(op["inputs"], op["input_storage"]))
    flat = jnp.asarray(self.table(op).reshape(-1))
    return flat[jnp.clip(a, 0, 255) * 256 + jnp.clip(b, 0, 255)]

  def tflite_op(self, op):
    return None

  def tflite(self, op, w):
    w.fail(op, "ONNX Runtime's QLinearAdd has no TFLite form; export with --target=tflite from the "
           "start (the addition is lowered per target)")

  def onnx_requantizer(self, op, s_out, out):
    """QLinearAdd computes its consumer's grid itself: the grid goes into the op, the `requantize`
    is `y = x` (float32_even of scale 1: exact below 2^24) plus the zero point, clamped."""
    if "output_scale" in op:
      raise ValueError("an addition's output feeds two grids; ONNX ops have one output")
    op.update(output_scale=float(np.float32(s_out)), output_zero_point=int(out["zero_point"]),
              output_storage=int(out["storage"]))
    return "float32_even", {"scale": np.asarray([1.0], np.float32)}

  def onnx(self, op, w):
    """com.microsoft QLinearAdd of two uint8 tensors, onto the consuming requantization's grid (and
    its Clip where the grid is narrower than uint8)."""
    r = w.requantize_of(op)
    scale = np.asarray(w.tensors[r["scale"]]) if r.get("rule") == "float32_even" else None
    if scale is None or scale.size != 1 or scale[0] != 1.0 or (
        op["output_scale"], op["output_zero_point"]) != (r["output_scale"], r["zero_point"]):
      w.fail(op, "its requantization is not the identity onto its output grid (export with "
             "--target=onnx)")
    xs = []
    for t, z, off in zip(op["inputs"], op["input_zero_points"], op["input_storage"]):
      x, stored = w.grid(op, t)
      if stored != off:
        w.fail(op, f"its storage offset {off} for {t!r} is not the tensor's ({stored})")
      w.check_zero_point(op, t, z)
      xs += [x, *w.qparams[t]]
    y, ys, yz = w.output_of(r)
    if w.offsets[r["output"]] != op["output_storage"]:
      w.fail(op, f"its output_storage {op['output_storage']} is not its output tensor's")
    w.builder.node("QLinearAdd", [*xs, ys, yz], [y])
    w.clamp(r["output"])


register(Add(), AddIR(), QLinearAddIR())
