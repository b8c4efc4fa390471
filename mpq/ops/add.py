"""Residual addition: the `add` layer and IR op (TFLite's ADD).

`y = s_a q_a + s_b q_b` with both inputs on their own signed grids: each input `(q - z) << L`
(L = 31 - max input bits, so |q| << L stays below 2^30) is multiplied by `s_i / (2 max(s_a, s_b))`
(MultiplyByQuantizedMultiplier) and the two are summed: an int32 accumulator at scale
`2 max(s_a, s_b) / 2^L`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mpq.fixedpoint import multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_exact
from mpq.ops.registry import IROp, OpKind, register


class Add(OpKind):
  name, quantizable = "add", True

  def input_quantizers(self, layer) -> tuple:
    return (layer.aq_a, layer.aq_b)

  def lower(self, lw, node) -> None:
    """The target's form (`Target.add_ir`): `add` (fixed point, an int32 accumulator at
    `2 max(s_a, s_b) / 2^L`) or `add_grid` (straight onto the consumer's grid, which the target's
    requantizer records in the op; rule `ort`, ONNX Runtime's float32 QLinearAdd)."""
    layer, name = lw.quantized_layer(node), node.name
    ins = [lw.to_grid(t, q, f"{name}/{k}") for t, q, k in
           zip(node.inputs, self.input_quantizers(layer), ("a", "b"))]
    scales = [float(g["scale"][0]) for _, g in ins]
    if lw.target.add_ir == "add_grid":
      offsets = []
      for t, _ in ins:
        if t not in lw.grids:
          lw.fail(f"layer {name!r}: an input of the addition is not a requantized tensor, which "
                  f"export target {lw.target.name!r} needs")
        offsets.append(lw.target.storage_offset(*lw.grids[t]["clamp"]))
      t_acc = lw.new()
      lw.emit({"op": "add_grid", "rule": "ort", "name": name, "inputs": [t for t, _ in ins], "output": t_acc,
               "input_scales": scales, "input_zero_points": [int(g["zero_point"][0]) for _, g in ins],
               "input_storage": offsets, "a_bits": [g["bits"] for _, g in ins],
               "quantizers": [layer.aq_a.name, layer.aq_b.name]})
      # the accumulator is the output grid's integers minus its zero point: scale 1 of that grid
      lw.accumulator(node.output, name, t_acc, np.asarray([1.0]), 2.0 ** 24)
      return
    s_max = max(scales)
    left = lw.target.add_shift(max(g["bits"] for _, g in ins), lw.consumer_bits(node))
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
    need(op, "rule", op.get("rule", "double") in ("double", "vector16"),
         f"must be 'double' or 'vector16'{self.got(op, 'rule')}")
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

  def for_family(self, op, family):
    """LiteRT's optimized int16 ADD (`litert-ruy`, and `litert-auto`, where XNNPACK takes no
    int16 op; a tflite export's ADD with left shift 15, `tflite_target.ADD_SHIFT_16`): rule
    `vector16` (measured, `litert_rules.add_16x8`); otherwise the op as it is."""
    if family in ("litert-ruy", "litert-auto") and op["left_shift"] == 15:
      return dict(op, rule="vector16")
    return op

  def kernel(self, op, env, tensors):
    """`sum_i MBQM((q_i - z_i) << left_shift, M_i, shift_i)` in int32. Rule `vector16` (LiteRT's
    optimized int16 ADD): over the flattened tensor, whole blocks of 16 from the start rescale
    each input by one rounding (`multiply_by_quantized_multiplier_exact`), the last `size % 16`
    elements as above."""
    acc = jnp.int32(0)
    vector = op.get("rule") == "vector16"
    for name, z, m0, sh in zip(op["inputs"], op["input_zero_points"], op["multipliers"],
                               op["shifts"]):
      xi = jnp.left_shift(env[name] - jnp.int32(z), jnp.int32(op["left_shift"]))
      y = multiply_by_quantized_multiplier(xi, jnp.int32(m0), jnp.int32(sh), nonneg=m0 >= 0)
      if vector:
        n = xi.size
        body = (jnp.arange(n) < 16 * (n // 16)).reshape(xi.shape)
        y = jnp.where(body, multiply_by_quantized_multiplier_exact(xi, jnp.int32(m0),
                                                                   jnp.int32(sh)), y)
      acc = acc + y
    return acc

  def tflite_op(self, op):
    return "ADD"

  def tflite(self, op, w):
    """ADD of two int8 tensors with the consuming requantization fused (its output grid and clamp
    as a fused activation), or of two int16 tensors (16x8 mode: an input over 8 bits; an 8-bit
    input converted exactly). LiteRT derives the same left shift (20; 15 for int16) and
    multipliers from the file's scales (add.cc Prepare): checked here against the op's."""
    from mpq.fixedpoint import quantize_multiplier  # pylint: disable=g-import-not-at-top
    r = w.requantize_of(op)
    wide = not w.float and w.sixteen_bit(op, r["bits"])
    xs = []
    for t, z in zip(op["inputs"], op["input_zero_points"]):
      x, off = (w.as_int16 if wide else w.grid)(op, t)
      if not w.float and z + off != w.builder.tensors[x].quantization.zeroPoint[0]:
        w.fail(op, f"its input zero point for {t!r} differs from the tensor's")
      xs.append(x)
    s = [float(np.float32(v)) for v in op["input_scales"]]
    twice_max = 2.0 * max(s)
    want = [quantize_multiplier(v / twice_max) for v in s]
    left = w.add_shift(wide)
    if not w.float and (op["left_shift"] != left or [list(p) for p in want] != [
        [m, sh] for m, sh in zip(op["multipliers"], op["shifts"])]):
      w.fail(op, f"its left shift and input multipliers are not LiteRT's (left shift {left}, "
             "QuantizeMultiplier(s_i / 2 max(s_a, s_b))); export with --target=tflite")
    y, act = w.fused_output(r, wide=wide)
    w.builder.add_operator("ADD", xs, [y], w.builder.options("AddOptions",
                                                             fusedActivationFunction=act))
    w.finish_output(r["output"])


def _table_ort(op, za, zb, zc) -> np.ndarray:
  """ONNX Runtime's com.microsoft QLinearAdd (`mpq.export.ort_rules.qlinear_add`): float32, the zero
  points folded into a constant, two fused multiply-adds of the stored values, half to even."""
  from mpq.float32 import f32, fma_f32, rint_f32  # pylint: disable=g-import-not-at-top
  (s_a, s_b), s_c = op["input_scales"], op["output_scale"]
  r_a, r_b = f32(f32(s_a) / f32(s_c)), f32(f32(s_b) / f32(s_c))
  k = f32(f32(zc) - fma_f32(r_a, f32(za), f32(r_b * f32(zb))))  # the compiler's contraction
  v = np.arange(256, dtype=np.float32)
  inner = fma_f32(v, r_b, k)  # per stored b
  return rint_f32(fma_f32(v[:, None], r_a, inner[None, :])) - zc


def xnnpack_add_params(s_a: float, s_b: float, s_c: float) -> tuple[int, int, int]:
  """(a multiplier, b multiplier, shift) of XNNPACK's qs8 add (LiteRT `litert-auto`): the float32
  ratios `r_i = f32(s_i / s_c)`, `shift = 20 - floor(log2 max |r_i|)`, `m_i = lrintf(r_i 2^shift)`."""
  f32 = np.float32
  r = [f32(f32(s) / f32(s_c)) for s in (s_a, s_b)]
  shift = 20 - (int(np.frexp(max(abs(r[0]), abs(r[1])))[1]) - 1)
  m = [int(np.rint(f32(np.ldexp(v, shift)))) for v in r]
  return m[0], m[1], shift


def _table_xnnpack(op, za, zb, zc) -> np.ndarray:
  """XNNPACK's qs8 add (measured against LiteRT `AUTO`; `tests/test_requant_rules.py`): integer,
  `(2^(shift-1) + m_a (a - z_a) + m_b (b - z_b)) >> shift` (an arithmetic shift: ties toward +inf),
  then `+ z_c` and the clamp. The table holds the shifted sum (the result minus `z_c`), which
  depends only on `q - z` of the inputs: `zc` is not needed."""
  del zc
  (s_a, s_b), s_c = op["input_scales"], op["output_scale"]
  m_a, m_b, shift = xnnpack_add_params(s_a, s_b, s_c)
  v = np.arange(256, dtype=np.int64)
  acc = (1 << (shift - 1)) + m_a * (v[:, None] - za) + m_b * (v[None, :] - zb)
  return acc >> shift


ADD_GRID_RULES = {"ort": _table_ort, "xnnpack": _table_xnnpack}


class AddGridIR(AddIR):
  """An addition of two grid tensors straight onto the output grid, as a runtime computes it in one
  kernel (`rule`, `ADD_GRID_RULES`: `ort` ONNX Runtime's QLinearAdd, `xnnpack` XNNPACK's qs8 add).
  The output grid (`output_scale`, `output_zero_point`, `output_storage`) is the consuming
  `requantize`'s, which is then `y = x` (rule float32_even of scale 1: exact below 2^24) plus the
  zero point, clamped: the op's output is the result's integers minus the output zero point.
  `input_storage` / `output_storage`: what the file adds to each grid's integers (a rule may depend
  on the stored values, not only on `q - z`). The kernel looks up a [256, 256] table of every pair
  of stored inputs, computed on the host in exact arithmetic (`table`)."""
  name = "add_grid"

  def validate(self, op, raw, tensors, need):
    need(op, "rule", op.get("rule") in ADD_GRID_RULES,
         f"must be one of {', '.join(ADD_GRID_RULES)}{self.got(op, 'rule')}")
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
      need(op, "input_storage", -128 <= z + off <= 255, "must put every zero point in the "
           f"8-bit storage (zero point {z}, storage offset {off})")

  def value_range(self, op, ranges, need):
    """Each input is a grid tensor whose stored values `q + storage` span at most 256 values."""
    for t, off in zip(op["inputs"], op["input_storage"]):
      r = ranges.get(t)
      need(op, "inputs", r is not None, f"names {t!r}, which is no integer grid tensor (an "
           "accumulator); requantize it first")
      need(op, "input_storage", -128 <= r[0] + off and r[1] + off <= 255 and r[1] - r[0] <= 255,
           f"{off} does not put input {t!r} (range {list(r)}) in 8-bit storage")
    return None

  @staticmethod
  def base(op) -> int:
    """The smallest stored value the table covers: -128 (int8 storage) or 0 (uint8)."""
    zs = [z + off for z, off in zip(op["input_zero_points"], op["input_storage"])]
    return -128 if min(op["input_storage"]) < 0 or min(zs) < 0 or op.get("rule") == "xnnpack" \
        else 0

  @classmethod
  def table(cls, op) -> np.ndarray:
    """The result minus the output zero point for every pair of stored inputs, [256, 256] int32
    indexed by `stored - base(op)`."""
    za, zb = (z + off - cls.base(op) for z, off in zip(op["input_zero_points"],
                                                        op["input_storage"]))
    zc = op["output_zero_point"] + op["output_storage"] - cls.base(op)
    out = ADD_GRID_RULES[op["rule"]](op, za, zb, zc)
    return np.clip(out, -2 ** 24, 2 ** 24).astype(np.int32)

  def kernel(self, op, env, tensors):
    base = self.base(op)
    a, b = (jnp.clip(env[t] + jnp.int32(off - base), 0, 255)
            for t, off in zip(op["inputs"], op["input_storage"]))
    return jnp.asarray(self.table(op).reshape(-1))[a * 256 + b]

  def tflite_op(self, op):
    return None

  def tflite(self, op, w):
    w.fail(op, "an addition onto its output grid is a runtime's kernel, not a .tflite op; export "
           "with --target=tflite (the addition is lowered per target)")

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
    if op.get("rule") != "ort":
      w.fail(op, f"its rule {op.get('rule')!r} is not ONNX Runtime's ('ort')")
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


register(Add(), AddIR(), AddGridIR())
