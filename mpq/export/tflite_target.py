"""The `tflite` export target: a .tflite file that LiteRT runs, and the mpq manifest of the same
integer model, which mpq's executor runs with LiteRT's arithmetic.

What the target decides (`mpq.export.targets.Target`):
  multipliers   derived as LiteRT derives them from the float32 scales in the file (Prepare of
                CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED: per output channel
                `QuantizeMultiplier(double(f32 s_in) * double(f32 s_w,c) / double(f32 s_out))`;
                ADD: left shift 20, `QuantizeMultiplier(s_i / 2 max(s_a, s_b))` per input and
                `2 max(s_a, s_b) / (2^20 s_out)` for the output), whatever mpq's own rule would
                choose (`requantizer`)
  graph         one int8 tensor per accumulator (a .tflite op has one output): where a block's
                input feeds a conv and a shortcut on two grids, the second is a QUANTIZE int8 ->
                int8 of the first (`requantize_grid`); average pooling is a MEAN of the int8
                tensor on its grid (`mean`). Both round twice where the fake-quant model rounds
                once, so such exports differ from it (reported by `--compare`), not from LiteRT
  rules         each requantization takes the rule of the kernel that performs it in the kernel
                family (`REQUANT_RULES`, measured against LiteRT: `mpq.export.litert_rules`,
                tests/test_requant_rules.py); the manifest is written for `litert-ref`
  input         the uint8 image (`pixel_input`: the first quantizer must be the pixel grid), shape
                [batch, H, W, C] with a dynamic batch, then QUANTIZE uint8 -> int8 (exact: equal
                scales, zero point - 128)
  output        int8 logits on a calibrated per-tensor grid (`output_dtype`; FULLY_CONNECTED cannot
                output int32); argmax ties go to the lowest index
  16x8 mode     grids over 8 bits are int16 tensors with zero point 0 (`storage`); an op with an
                int16 input or output runs LiteRT's 16x8 kernel (`sixteen_bit`), with exact
                int8 <-> int16 QUANTIZEs around it where a side is 8-bit, and the 16x8 kernels'
                measured rules (`REQUANT_RULES` `*/16x8`)

The .tflite graph is written from the validated manifest (`to_tflite`): every IR op lowers itself
(`IROp.tflite(op, writer)`, in `mpq.ops`) through the `Writer` below, which holds what they share:
the tensors of the file, the int8 storage of integer grids (a grid of [0, 255] is stored as
int8 with every value and the zero point minus 128; signed grids as they are), and the fusion of
a requantization's clamp into the producing op's fused activation. An op or a clamp that the
target cannot express is an ExportError naming the layer.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mpq.fixedpoint import quantize_multiplier

FILE = "model.tflite"
METADATA = "mpq"  # the name of the model's metadata entry (a JSON object of str -> str)
FAMILY = "litert-ref"  # the kernel family whose rules the manifest records

FAMILIES = ("litert-ref", "litert-ruy", "litert-auto")

# (TFLite op, kernel family) -> the requantize rule (`mpq.ops.io.REQUANT_RULES`) of the kernel
# that requantizes its accumulator. `litert-auto` has two entries: `litert-auto` where XNNPACK
# takes the op (`mpq.export.litert_rules.xnnpack_takes`), `litert-auto/builtin` where it does not
# (the optimized kernels, as `litert-ruy`). Measured against LiteRT 2.3.0 on exported models
# (tests/test_tflite_target.py) and on single ops (tests/test_requant_rules.py).
REQUANT_RULES = {
    ("CONV_2D", "litert-ref"): "double",
    ("CONV_2D", "litert-ruy"): "double_up",
    ("CONV_2D", "litert-auto"): "float32_even",
    ("CONV_2D", "litert-auto/builtin"): "double_up",
    ("FULLY_CONNECTED", "litert-ref"): "single_away",
    ("FULLY_CONNECTED", "litert-ruy"): "double_up",
    ("FULLY_CONNECTED", "litert-auto"): "float32_even",
    ("FULLY_CONNECTED", "litert-auto/builtin"): "double_up",
    ("DEPTHWISE_CONV_2D", "litert-ref"): "double",
    ("DEPTHWISE_CONV_2D", "litert-ruy"): "double_up",
    ("DEPTHWISE_CONV_2D", "litert-auto"): "float32_even",
    ("DEPTHWISE_CONV_2D", "litert-auto/builtin"): "double_up",
    ("ADD", "litert-ref"): "double",  # reference ADD: MBQM of the raw sum (add.h)
    ("ADD", "litert-ruy"): "double",
    ("ADD", "litert-auto/builtin"): "double",
    # ("ADD", "litert-auto") where XNNPACK takes it: not a requantization of the ADD's
    # accumulator but XNNPACK's own qs8 add onto the output grid (`add_grid`, rule xnnpack)
}
# 16x8 mode (int16 activations, int8 weights, int64 bias; `sixteen_bit`): every family runs the
# builtin kernels (XNNPACK takes no int16 op) and they all round alike (measured against LiteRT
# 2.3.0: `litert_rules.linear_16x8`, `add_16x8`; tests/test_litert_rules.py). CONV_2D and
# DEPTHWISE_CONV_2D multiply the int64 accumulator by a 16-bit multiplier, `(M0 + 2^15) >> 16`, and
# round once (ties toward +inf): rule `exact` with that multiplier times 2^16 (`multiplier_16x8`);
# FULLY_CONNECTED rescales in double precision (`litert_rules.round_double`), which the int32
# executor does not emulate, so a 16x8 dense layer is written as a 1x1 CONV_2D
# (`DenseIR.tflite_op_16x8`); ADD with int16 inputs is the int8 ADD's fixed point with a left
# shift of 15 (rule `double`; its inputs' rescaling per family: `mpq.ops.add.AddIR.for_family`).
REQUANT_RULES.update({(f"{kind}/16x8", family): rule for family in FAMILIES
                      for kind, rule in (("CONV_2D", "exact"), ("DEPTHWISE_CONV_2D", "exact"),
                                         ("ADD", "double"))})
REDUCED_MULTIPLIER = ("CONV_2D", "DEPTHWISE_CONV_2D")  # 16x8 kernels with a 16-bit multiplier
ADD_SHIFT, ADD_SHIFT_16 = 20, 15  # ADD's left shift of int8 and of int16 inputs (add.cc Prepare)


def f32(x) -> float:
  return float(np.float32(x))


def requantizer(acc, s_out: float, out_max: float, out: dict | None = None,
                family: str = FAMILY):
  """The `requantize` op's rule and tensors for accumulator `acc` onto a grid of scale `s_out`, as
  LiteRT computes it in `family`: `QuantizeMultiplier(s_acc / s_out)` per channel, where `s_acc`
  is, in double, exactly what LiteRT forms from the file's float32 scales (`s_in s_w`: a product
  of two float32 values is exact in double; ADD's `2 max(s_a, s_b) / 2^20`), reduced to 16 bits
  where a 16x8 conv does so (`multiplier_16x8`)."""
  from mpq.export.targets import fixed_point  # pylint: disable=g-import-not-at-top
  del out_max
  out_bits = 8
  if out is not None:
    lo, hi = out["clamp"]
    if storage(lo, hi, out["zero_point"]) is None:
      raise ValueError(f"its output grid [{lo}, {hi}] (zero point {out['zero_point']}) fits "
                       "neither int8 nor int16 storage (TFLite's 16x8 mode: int16 tensors with "
                       "zero point 0); the tflite target takes activations of at most 8 bits, or "
                       "of 9-16 bits whose grid less its zero point fits int16 (signed, or "
                       "unsigned of at most 15 bits)")
    out_bits = out.get("bits", 8)
  producer = acc.producer or {}
  kind = tflite_kind(producer, out_bits) if "op" in producer else None
  if kind is None:
    what = producer.get("op", "this op")
    raise ValueError(f"the tflite target has no lowering yet for the output of {what!r}; "
                     "export with --target=mpq")
  rule = _rule(kind, family, producer, out_bits)
  wide = sixteen_bit(producer, out_bits)
  if wide and kind == "ADD" and producer["left_shift"] != ADD_SHIFT_16:
    raise ValueError(f"an addition lowered as TFLite's int8 ADD (left shift "
                     f"{producer['left_shift']}) cannot output onto a {out_bits}-bit grid; its "
                     "first consumer decides (Target.add_shift)")
  if wide and kind == "ADD" and all(_is_pot(v) for v in [*producer["input_scales"], s_out]):
    raise ValueError("an int16 ADD whose input and output scales are all powers of two takes "
                     "LiteRT's shift-only path, which mpq does not emulate; train the addition's "
                     "quantizers with another estimator than tqt, or at most 8 bits")
  pairs = [quantize_multiplier(float(m)) for m in np.ravel(acc.scale / s_out)]
  if wide and kind in REDUCED_MULTIPLIER:
    pairs = [multiplier_16x8(*p) for p in pairs]
  return rule, fixed_point(pairs, np.shape(acc.scale))


def sixteen_bit(op: dict, out_bits: int) -> bool:
  """Whether TFLite op of IR op `op` runs in 16x8 mode (int16 activations): where an input or its
  output grid has more than 8 bits (an 8-bit side is converted to or from int16 around it, exactly:
  `Writer.as_int16`, `Writer.fused_output`)."""
  bits = op.get("a_bits", 8)
  return max(bits if isinstance(bits, list) else [bits]) > 8 or out_bits > 8


def tflite_kind(op: dict, out_bits: int) -> str | None:
  """The TFLite op that IR op `op` (with an output grid of `out_bits`) becomes: in 16x8 mode
  `IROp.tflite_op_16x8` (a dense layer is a 1x1 CONV_2D), else `IROp.tflite_op`."""
  from mpq import ops  # pylint: disable=g-import-not-at-top
  ir = ops.ir_op(op["op"])
  return ir.tflite_op_16x8(op) if sixteen_bit(op, out_bits) else ir.tflite_op(op)


def multiplier_16x8(m0: int, shift: int) -> tuple[int, int]:
  """The multiplier of a 16x8 CONV_2D / DEPTHWISE_CONV_2D as rule `exact` takes it: LiteRT's int64
  `MultiplyByQuantizedMultiplier` keeps 16 bits, `r = (M0 + 2^15) >> 16` (0x7FFF from M0 >=
  0x7FFF0000), and computes `(x r + 2^(14 - shift)) >> (15 - shift)`, which is rule `exact` with
  `M0' = r 2^16` at the same shift."""
  r = (m0 + (1 << 15)) >> 16 if m0 < 0x7FFF0000 else 0x7FFF
  return r << 16, shift


def _is_pot(v) -> bool:
  m, _ = np.frexp(np.float32(v))
  return float(m) == 0.5


def weight_layout(g_w: dict, w_int, bias, options: dict):
  """`weights='compact'` (default): as trained, stored INT4 / INT2 where the op takes them
  (`weight_dtype`). `weights='exact'`: weights of b < 8 bits multiplied by `2^k` (the largest k
  keeping them within int8) and stored int8, the bias likewise, the weight scales divided by `2^k`:
  the same real weights and products, but every multiplier `M / 2^k` gets k more bits of right
  shift, which is where LiteRT's fixed-point kernels round twice (`SRDHM`, then a rounding shift):
  an intermediate rounded at `2^-(r+k)` of the output LSB instead of `2^-r`. On the tiny cnn at
  W2A2 this took litert-ref's accuracy from 58.7% to 70.3% (fake quant: 68.8%); see the README."""
  if g_w["bits"] > 8:
    raise ValueError(f"weights of {g_w['bits']} bits do not fit int8; the tflite target takes at "
                     "most 8-bit weights")
  if options.get("weights", "compact") != "exact" or g_w["bits"] >= 8:
    return g_w, w_int, bias
  lo, hi = int(w_int.min(initial=0)), int(w_int.max(initial=0))
  k = 0
  while lo * 2 ** (k + 1) >= -128 and hi * 2 ** (k + 1) <= 127 and k < 7:
    k += 1
  g = dict(g_w, scale=g_w["scale"] / 2.0 ** k, bits=8, w_bits_trained=g_w["bits"], weight_shift=k)
  return g, w_int * 2 ** k, bias * 2.0 ** k


INT16 = (-32768, 32767)


def storage(lo: int, hi: int, zero_point: int = 0) -> tuple[str, int] | None:
  """(dtype, offset) of a grid tensor whose values lie in [lo, hi]: what the file stores and what
  it adds to the integers. int8 where [lo, hi] spans at most 256 values, offset `127 - hi`, so the
  grid's top is int8's top and a fused activation (which clamps at 127) enforces it
  (shared/DEPLOY.md's construction for grids below 8 bits; an unsigned 8-bit grid moves by -128, a
  signed one stays). Otherwise int16 (TFLite's 16x8 mode, whose int16 tensors have zero point 0),
  offset `-zero_point`, where [lo, hi] less the zero point fits int16; else None."""
  if hi - lo <= 255:
    return "int8", 127 - hi
  if INT16[0] <= lo - zero_point and hi - zero_point <= INT16[1]:
    return "int16", -zero_point
  return None


def storage_offset(lo: int, hi: int, zero_point: int = 0) -> int | None:
  """The offset of `storage`, or None."""
  s = storage(lo, hi, zero_point)
  return None if s is None else s[1]


def weight_dtype(op: dict) -> str:
  """The .tflite storage type of a conv/dense IR op's weights: `INT4` for 3-4 bits on CONV_2D and
  FULLY_CONNECTED, `INT2` for 2 bits on FULLY_CONNECTED (CONV_2D rejects INT2: INT4), int8
  otherwise (depthwise convs, 5-8 bits)."""
  from mpq import ops  # pylint: disable=g-import-not-at-top
  kind, bits = ops.ir_op(op["op"]).tflite_op(op), op["w_bits"]
  if kind == "FULLY_CONNECTED" and bits <= 2:
    return "int2"
  if kind in ("CONV_2D", "FULLY_CONNECTED") and bits <= 4:
    return "int4"
  return "int8"


def _rule(kind: str, family: str, op: dict, out_bits: int = 8) -> str:
  """The requantize rule of TFLite op `kind` (from IR op `op`, onto a grid of `out_bits`) in
  `family`, or a ValueError."""
  key = family
  if sixteen_bit(op, out_bits):
    kind = f"{kind}/16x8"
  elif family == "litert-auto":
    from mpq.export.litert_rules import xnnpack_takes  # pylint: disable=g-import-not-at-top
    k = op["weight_shape"][0] if op["op"] == "dense" else None
    try:
      taken = xnnpack_takes(kind, weights=weight_dtype(op) if "w_bits" in op else "int8", k=k)
    except ValueError:
      raise ValueError(f"whether XNNPACK takes {kind}, and how it rounds, has not been measured "
                       "against LiteRT yet, so litert-auto cannot be emulated") from None
    if not taken:
      key = "litert-auto/builtin"
  if (kind, key) not in REQUANT_RULES:
    raise ValueError(f"the requantization of {kind} in {family} has not been measured against "
                     "LiteRT yet, so it cannot be emulated")
  return REQUANT_RULES[(kind, key)]


def _f32_ratio(a, b) -> float:
  return float(np.float32(np.float32(a) / np.float32(b)))


def emulate(manifest: dict, tensors: dict, family: str) -> tuple[dict, dict]:
  """(manifest, tensors) of a `tflite` export with the rules of LiteRT kernel family `family`:
  each requantization that a kernel performs takes that kernel's rule (`REQUANT_RULES`), with the
  multipliers LiteRT derives (the manifest's: the same for every fixed-point rule) or, for
  XNNPACK's float32 rule, the float32 scale `f32(f32(s_in s_w,c) / s_out)` it computes; every IR
  op with a family-dependent kernel of its own (`mean`, `requantize_grid`) takes the family's
  (`IROp.for_family`). Under `litert-auto` an ADD that XNNPACK takes becomes XNNPACK's qs8 add onto
  its output grid (`add_grid`, rule xnnpack; its requantize the identity) and a QUANTIZE int8 ->
  int8 that it takes XNNPACK's qs8 convert (`requantize_grid` rule xnnpack), each decided per op
  from the scales (`litert_rules.xnnpack_takes`). The returned copies run in mpq's executor
  (`mpq.intexec.build`) as the family runs the file."""
  from mpq import ops  # pylint: disable=g-import-not-at-top
  from mpq.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  from mpq.export.litert_rules import xnnpack_takes  # pylint: disable=g-import-not-at-top
  if family not in FAMILIES:
    raise ExportError(f"unknown LiteRT kernel family {family!r}; use one of {', '.join(FAMILIES)}")
  producer = {op["output"]: op for op in manifest["ops"]}
  new_ops, tensors = [], dict(tensors)
  index: dict[str, int] = {}  # op name -> position in new_ops
  auto = family == "litert-auto"
  for op in manifest["ops"]:
    try:
      op = ops.ir_op(op["op"]).for_family(op, family)
    except ValueError as e:
      raise ExportError(f"op {op['name']!r}: {e}") from None
    if auto and op["op"] == "requantize_grid" and max(op["bits"], op.get("input_bits", 8)) <= 8 \
        and xnnpack_takes(
        "QUANTIZE", ratios=[_f32_ratio(op["input_scale"], op["scale"])]):
      op = dict(op, rule="xnnpack")
    src = producer.get(op.get("input")) if op["op"] == "requantize" else None
    kind = tflite_kind(src, op["bits"]) if src is not None else None
    if kind is None:
      index[op["name"]] = len(new_ops)
      new_ops.append(op)
      continue
    if kind == "ADD" and auto and not sixteen_bit(src, op["bits"]):
      if xnnpack_takes("ADD", ratios=[_f32_ratio(v, op["output_scale"])
                                      for v in src["input_scales"]]):
        new_ops[index[src["name"]]] = _xnnpack_add(src, op, producer)
        tensors[f"{op['name']}/scale"] = np.ones(1, np.float32)
        op = {k: v for k, v in op.items() if k not in ("multiplier", "shift")}
        new_ops.append(dict(op, rule="float32_even", scale=f"{op['name']}/scale"))
        continue
      rule = REQUANT_RULES[("ADD", "litert-auto/builtin")]
    else:
      try:
        rule = _rule(kind, family, src, op["bits"])
      except ValueError as e:
        raise ExportError(f"op {op['name']!r}: {e}") from None
    # every fixed-point family derives the same (M0, shift): the exported ones stay
    op = dict(op, rule=rule)
    if rule == "float32_even":
      if "weight_scale" not in src:
        raise ExportError(f"op {op['name']!r}: XNNPACK's requantization of {kind} is not known")
      del op["multiplier"], op["shift"]
      s_w = np.asarray(src["weight_scale"], np.float32)
      scale = (np.float32(src["input_scale"]) * s_w).astype(np.float32) / np.float32(
          op["output_scale"])
      tensors[f"{op['name']}/scale"] = np.asarray(scale, np.float32).reshape(-1)
      op["scale"] = f"{op['name']}/scale"
    index[op["name"]] = len(new_ops)
    new_ops.append(op)
  return dict(manifest, ops=new_ops, family=family), tensors


def _xnnpack_add(add: dict, r: dict, producer: dict) -> dict:
  """The `add_grid` op (rule xnnpack) of a fixed-point `add` whose output requantize op `r` XNNPACK
  computes in its qs8 add kernel."""
  offsets = []
  for t in add["inputs"]:
    lo, hi = producer[t].get("clamp", (-128, 127))
    offsets.append(storage_offset(lo, hi))
  lo, hi = r["clamp"]
  return {"op": "add_grid", "rule": "xnnpack", "name": add["name"], "inputs": add["inputs"],
          "output": add["output"], "input_scales": add["input_scales"],
          "input_zero_points": add["input_zero_points"], "input_storage": offsets,
          "a_bits": add["a_bits"], "quantizers": add["quantizers"],
          "output_scale": r["output_scale"], "output_zero_point": r["zero_point"],
          "output_storage": storage_offset(lo, hi)}


def run_litert(model_dir: str, family: str, images: np.ndarray, batch_size: int = 500,
               num_threads: int = 1) -> np.ndarray:
  """The output of `model_dir/model.tflite` run by LiteRT with `family`'s kernels on uint8
  `images` [N, H, W, C], in batches (the input's batch dimension is dynamic)."""
  from mpq.export import tflite_builder as tb  # pylint: disable=g-import-not-at-top
  from mpq.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  path = os.path.join(model_dir, FILE)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ExportError(f"{model_dir} holds no {FILE}; export with --target=tflite") from None
  except OSError as e:
    raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    interp = tb.interpreter(data, family, num_threads)
  except (ValueError, RuntimeError) as e:
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    raise ExportError(f"{path} is not a valid .tflite model ({text}); re-export it") from None
  index = interp.get_input_details()[0]["index"]
  outs, size = [], None
  for i in range(0, len(images), batch_size):
    chunk = np.ascontiguousarray(images[i:i + batch_size], np.uint8)
    if chunk.shape[0] != size:
      interp.resize_tensor_input(index, list(chunk.shape))
      interp.allocate_tensors()
      size = chunk.shape[0]
    outs.append(tb.invoke(interp, [chunk])[0])
  return np.concatenate(outs)


class Writer:
  """The state shared while IR ops lower themselves into a .tflite graph (see the module
  docstring): `builder` (`mpq.export.tflite_builder.TFLiteBuilder`), the validated `manifest` and
  `tensors` (unpacked), each IR tensor's shape at batch 1 (`shapes`) and, once written, its
  .tflite tensor index (`ids`) and int8 storage offset (`offsets`)."""

  def __init__(self, builder, manifest: dict, tensors: dict, shapes: dict,
               float_twin: bool = False):
    self.builder, self.manifest, self.tensors, self.shapes = builder, manifest, tensors, shapes
    # the float twin (`to_float_tflite`): float32 tensors, dequantized weights, no requantization
    self.float = float_twin
    self.ids: dict[str, int] = {}
    self.offsets: dict[str, int] = {}
    self.dtypes: dict[str, str] = {}  # "int8" / "int16" (16x8 mode) of each grid tensor
    self.int16: dict[str, int] = {}  # int8 grid tensor -> its int16 copy (`as_int16`)
    self.grid_range: dict[str, tuple[int, int]] = {}  # IR range [lo, hi] of each grid tensor
    self.consumers: dict[str, list[dict]] = {}
    self.fused: set[str] = set()  # names of requantize ops lowered with their producer
    # grid tensor -> (the kernel's output, the tensor, [(op, constant or None)]): the ops that
    # complete a kernel's output after it (`fused_output`, `finish_output`)
    self.pending: dict[str, tuple[int, int, list]] = {}
    self.outputs: list[int] = []
    from mpq import ops  # pylint: disable=g-import-not-at-top
    self._ops = ops
    for op in manifest["ops"]:
      for t in ops.ir_op(op["op"]).inputs(op):
        self.consumers.setdefault(t, []).append(op)

  weight_dtype = staticmethod(weight_dtype)
  sixteen_bit = staticmethod(sixteen_bit)

  @staticmethod
  def add_shift(wide: bool) -> int:
    """ADD's left shift in LiteRT: 15 for int16 inputs (16x8 mode), 20 for int8."""
    return ADD_SHIFT_16 if wide else ADD_SHIFT

  def fail(self, op: dict, reason: str):
    from mpq.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
    raise ExportError(f"op {op['name']!r} ({op['op']}): {reason}")

  @staticmethod
  def signature(shape) -> list[int]:
    return [-1, *shape[1:]]

  # -- integer grid tensors
  storage_offset = staticmethod(storage_offset)

  def grid_tensor(self, name: str, scale: float, zero_point: int, lo: int, hi: int, op: dict) -> int:
    """A new activation tensor for IR grid tensor `name` (integers in [lo, hi], zero point
    `zero_point` on the IR grid), int8 or int16 (`storage`); returns its index."""
    shape = self.shapes[name]
    if self.float:
      self.ids[name] = self.builder.add_tensor(name, shape, "float32",
                                               signature=self.signature(shape))
      self.offsets[name], self.grid_range[name], self.dtypes[name] = 0, (lo, hi), "float32"
      return self.ids[name]
    st = storage(lo, hi, zero_point)
    if st is None:
      self.fail(op, f"its output grid [{lo}, {hi}] (zero point {zero_point}) fits neither int8 "
                "nor int16 storage; the tflite target takes activations of at most 8 bits, or of "
                "9-16 bits whose grid less its zero point fits int16")
    dtype, off = st
    self.ids[name] = self.builder.add_tensor(name, shape, dtype, scale=f32(scale),
                                             zero_point=zero_point + off,
                                             signature=self.signature(shape))
    self.offsets[name], self.dtypes[name] = off, dtype
    self.grid_range[name] = (lo, hi)
    return self.ids[name]

  def as_int16(self, op: dict, name: str) -> tuple[int, int]:
    """(tensor index, storage offset) of IR grid tensor `name` as a 16x8 kernel reads it: the
    tensor itself where it is int16; else its int16 copy at the same scale with zero point 0
    (stored `q - z`), a QUANTIZE int8 -> int16, exact in every kernel family (measured,
    `litert_rules.requantize` with equal scales), written once."""
    x, off = self.grid(op, name)
    if self.float or self.dtypes.get(name) == "int16":
      return x, off
    if name not in self.int16:
      q = self.builder.tensors[x].quantization
      shape = self.shapes[name]
      t = self.builder.add_tensor(f"{name}/int16", shape, "int16", scale=q.scale, zero_point=0,
                                  signature=self.signature(shape))
      self.builder.add_operator("QUANTIZE", [x], [t])
      self.int16[name] = t
    return self.int16[name], -self._zero_point(name)

  def like(self, t: int, tail) -> int:
    """A new int16 tensor with the quantization of .tflite tensor `t` (int16, a 16x8 kernel's
    input or output) and shape [batch, *tail], the batch dynamic."""
    q = self.builder.tensors[t].quantization
    return self.builder.add_tensor(f"{self.builder.tensors[t].name}/{len(tail) + 1}d",
                                   [1, *tail], "int16", scale=q.scale, zero_point=q.zeroPoint,
                                   signature=[-1, *tail])

  def reshape(self, src: int, dst: int) -> None:
    """RESHAPE of .tflite tensor `src` into `dst` (to `dst`'s shape, the batch dynamic)."""
    shape = [-1, *self.builder.tensors[dst].shape[1:]]
    new_shape = self.builder.add_tensor(f"{self.builder.tensors[dst].name}/shape", [len(shape)],
                                        "int32", data=np.asarray(shape, np.int32))
    self.builder.add_operator("RESHAPE", [src, new_shape], [dst],
                              self.builder.options("ReshapeOptions", newShape=shape))

  def _zero_point(self, name: str) -> int:
    """The IR zero point of grid tensor `name` (the stored one less the offset)."""
    return int(self.builder.tensors[self.ids[name]].quantization.zeroPoint[0]) - self.offsets[name]

  def alias(self, name: str, like: str, shape=None) -> int:
    """A new tensor for IR tensor `name` with the quantization of IR tensor `like` (pooling,
    reshape); `shape` defaults to `name`'s."""
    src = self.builder.tensors[self.ids[like]]
    shape = self.shapes[name] if shape is None else shape
    q = src.quantization
    if q is None:  # the float twin
      idx = self.builder.add_tensor(name, shape, "float32", signature=self.signature(shape))
    else:
      idx = self.builder.add_tensor(name, shape, self.dtypes.get(like, "int8"), scale=q.scale,
                                    zero_point=q.zeroPoint, signature=self.signature(shape))
    self.ids[name], self.offsets[name] = idx, self.offsets[like]
    self.dtypes[name] = self.dtypes.get(like, "int8")
    if like in self.grid_range:
      self.grid_range[name] = self.grid_range[like]
    return idx

  def grid(self, op: dict, name: str) -> tuple[int, int]:
    """(tensor index, storage offset) of an IR grid tensor already written (an op's input)."""
    if name not in self.ids:
      self.fail(op, f"its input {name!r} is not an int8 tensor of the .tflite graph (an int32 "
                "accumulator); the tflite target has no lowering for this graph yet")
    return self.ids[name], self.offsets[name]

  # -- a producer's requantization
  def requantize_of(self, op: dict) -> dict:
    """The `requantize` op that alone consumes `op`'s int32 output (fused into the .tflite op that
    `op` becomes: the kernel requantizes its accumulator itself); marked as lowered."""
    users = self.consumers.get(op["output"], [])
    if len(users) != 1 or users[0]["op"] != "requantize":
      self.fail(op, "its int32 output must feed exactly one requantize op (a .tflite "
                f"{self._ops.ir_op(op['op']).tflite_op(op) or 'op'} outputs int8); got "
                f"{', '.join(u['op'] for u in users) or 'none'}")
    self.fused.add(users[0]["name"])
    return users[0]

  def fused_output(self, r: dict, relu: bool = True, wide: bool = False) -> tuple[int, str]:
    """(the kernel's output tensor index, fused activation name) of requantize op `r` written as a
    kernel's output; `finish_output(r["output"])` after the kernel completes it. `relu`: whether
    the kernel has a fused RELU (a QUANTIZE has none; it passes True where its input was clamped
    at the same zero point). `wide`: the kernel runs in 16x8 mode and outputs int16.

    An int8 grid is stored at offset `127 - hi` (`storage`): the clamp's top is int8's; its
    bottom is int8's too (fused NONE), or the zero point (fused RELU, which clamps at it: every
    unsigned grid after a ReLU, any bits), or, for a signed grid below 8 bits, a MAXIMUM of the
    kernel's output (fused NONE) and the grid's bottom as a constant (shared/DEPLOY.md's
    construction; MAXIMUM compares raw stored values in every family, `litert_rules.maximum`).
    An int16 grid is stored at offset `-z` (zero point 0): its bottom likewise, its top int16's
    or a MINIMUM with it. A 16x8 kernel whose output grid is int8 writes an int16 tensor at the
    same scale with zero point 0 (the same rounding, before `+ z`), then a QUANTIZE int16 -> int8
    adds `z + offset` exactly (measured in every family) and saturates at int8's top."""
    lo, hi = r["clamp"]
    z = r["zero_point"]
    s = r.get("output_scale")
    if s is None:
      self.fail(r, "has no output_scale (re-export the model)")
    y = self.grid_tensor(r["output"], s, z, lo, hi, r)  # fails where [lo, hi] fits no storage
    if self.float:  # the float twin: a ReLU where the grid starts at its zero point
      return y, ("RELU" if lo == z else "NONE")
    off, dtype = self.offsets[r["output"]], self.dtypes[r["output"]]
    shape = self.shapes[r["output"]]
    q = self.builder.tensors[y].quantization
    steps, raw, kmin = [], y, (-128 if dtype == "int8" else INT16[0]) - off
    if wide and dtype == "int8":  # kernel -> int16 (zero point 0) -> QUANTIZE -> int8
      raw = self.builder.add_tensor(f"{r['output']}/int16", shape, "int16", scale=q.scale,
                                    zero_point=0, signature=self.signature(shape))
      steps.append(("QUANTIZE", None))
      kmin = max(kmin, INT16[0] + z)
    if lo <= kmin:
      act = "NONE"
    elif lo == z and relu:
      act = "RELU"
    else:
      act = "NONE"
      steps.append(("MAXIMUM", lo + off))
    if dtype == "int16" and hi + off < INT16[1]:
      steps.append(("MINIMUM", hi + off))
    if steps:
      if raw == y:
        raw = self.builder.add_tensor(f"{r['output']}/unclamped", shape, dtype, scale=q.scale,
                                      zero_point=q.zeroPoint, signature=self.signature(shape))
      self.pending[r["output"]] = (raw, y, steps)
    return raw, act

  def finish_output(self, tensor: str) -> None:
    """After the kernel writing `fused_output`'s tensor: the ops that complete it, where pending
    (QUANTIZE int16 -> int8, MAXIMUM with the grid's bottom, MINIMUM with its top)."""
    if tensor not in self.pending:
      return
    raw, y, steps = self.pending.pop(tensor)
    q, dtype, shape = self.builder.tensors[y].quantization, self.dtypes[tensor], self.shapes[tensor]
    x = raw
    for i, (kind, const) in enumerate(steps):
      last = i == len(steps) - 1
      out = y if last else self.builder.add_tensor(
          f"{tensor}/{kind.lower()}", shape, dtype, scale=q.scale, zero_point=q.zeroPoint,
          signature=self.signature(shape))
      if const is None:
        self.builder.add_operator(kind, [x], [out])
      else:
        k = self.builder.add_tensor(f"{tensor}/{kind.lower()}_bound", [1], dtype,
                                    data=np.asarray([const]), scale=q.scale,
                                    zero_point=q.zeroPoint)
        self.builder.add_operator(kind, [x, k], [out])
      x = out

  def run(self) -> bytes:
    for op in self.manifest["ops"]:
      if op["op"] == "requantize" and op["name"] in self.fused:
        continue
      self._ops.ir_op(op["op"]).tflite(op, self)
    inputs = [self.ids["input"]]
    self.builder.set_io(inputs, self.outputs)
    return self.builder.finish()


def to_tflite(manifest: dict, tensors: dict) -> bytes:
  """The .tflite model (bytes) of a validated manifest and its unpacked tensors."""
  from mpq.export import exporter  # pylint: disable=g-import-not-at-top
  from mpq.export.tflite_builder import TFLiteBuilder  # pylint: disable=g-import-not-at-top
  from mpq.export.tflite_builder import litert_version  # pylint: disable=g-import-not-at-top
  shapes = exporter.tensor_shapes(manifest, tensors)
  b = TFLiteBuilder(description=f"mpq {manifest.get('target', 'tflite')}")
  meta = exporter.file_metadata(manifest, "NHWC", f"ai-edge-litert {litert_version()} "
                                "(litert-ref, litert-ruy; litert-auto where emulated)")
  b.add_metadata(METADATA, json.dumps(meta).encode())
  return Writer(b, manifest, tensors, shapes).run()


def to_float_tflite(manifest: dict, tensors: dict) -> bytes:
  """The float twin of an exported model (bytes of a .tflite): the same graph with float32 tensors
  (float normalised NHWC input, float logits), dequantized weights and biases, a fused RELU where
  a grid starts at its zero point, and no quantization ops. Not the model's numerics: the
  reference for how fast the integer file runs (`benchmarks/deploy.py`)."""
  from mpq.export import exporter  # pylint: disable=g-import-not-at-top
  from mpq.export.tflite_builder import TFLiteBuilder  # pylint: disable=g-import-not-at-top
  shapes = exporter.tensor_shapes(manifest, tensors)
  return Writer(TFLiteBuilder(description="mpq float twin"), manifest, tensors, shapes,
                float_twin=True).run()


def read_metadata(data: bytes) -> dict[str, str]:
  """The `mpq` metadata of a .tflite written by this target (`exporter.file_metadata`)."""
  from mpq.export.tflite_builder import schema  # pylint: disable=g-import-not-at-top
  s = schema()
  m = s.ModelT.InitFromObj(s.Model.GetRootAs(data, 0))
  for entry in m.metadata or []:
    name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
    if name == METADATA:
      return json.loads(bytes(m.buffers[entry.buffer].data).decode())
  return {}


def _write(out_dir: str, manifest: dict, tensors: dict) -> None:
  """`out_dir/model.tflite` and the mpq manifest of the same model (`manifest.json`,
  `weights.npz`), which is written first and validated (`load`) before the .tflite is built."""
  from mpq.export import exporter, targets  # pylint: disable=g-import-not-at-top
  targets.write_mpq(out_dir, manifest, tensors)
  loaded, unpacked = exporter.load(out_dir)
  data = to_tflite(loaded, unpacked)
  with open(os.path.join(out_dir, FILE), "wb") as f:
    f.write(data)


def _register():
  from mpq.export import targets  # pylint: disable=g-import-not-at-top
  targets.register(targets.Target(
      "tflite", _write, ("manifest.json", "weights.npz", FILE),
      lambda m, out_max: quantize_multiplier(m),  # LiteRT's QuantizeMultiplier (ADD's inputs)
      {"*": "half_up"}, requantizer, output_dtype="int8", pixel_input=True, emulations=FAMILIES,
      add_shift=lambda bits, out_bits: ADD_SHIFT_16 if max(bits, out_bits or 0) > 8 else ADD_SHIFT,
      grid_transforms=True,
      emulate=emulate, runtimes=FAMILIES, run=run_litert,
      options={"weights": (("compact", "exact"), "compact")}, weight_layout=weight_layout,
      storage_offset=storage_offset))


_register()
