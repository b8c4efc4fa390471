"""The IR ops at a quantized tensor's boundaries: `quantize` (float input -> the first grid),
`requantize` (int32 accumulator -> the next quantizer's grid) and `dequantize` (the last
accumulator -> float logits). They belong to no op kind: the exporter emits them around every op."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from mpq.fixedpoint import (multiply_by_float32_even, multiply_by_quantized_multiplier,
                            multiply_by_quantized_multiplier_exact,
                            multiply_by_quantized_multiplier_single_away,
                            multiply_by_quantized_multiplier_up)
from mpq.ops.registry import IROp, register
from mpq.rounding import half_up


class Quantize(IROp):
  """`clip(round_half_up(x / s) + z, qmin, qmax)` of the float input. `pixels: true`: the grid is
  the pixel grid (8 bits, [0, 255]), and the model also takes the uint8 image itself, which passes
  as int32 (the normalised float image `(p - z) s` quantizes to the same integers, `p`)."""
  name = "quantize"

  def validate(self, op, raw, tensors, need):
    bits = self.bits(op, "bits", need)
    self.scale(op, "scale", need)
    lo, hi = self.bits_range(bits)
    qmin = self.integer(op, "qmin", need, lo, hi - 1)
    qmax = self.integer(op, "qmax", need, qmin + 1, min(hi, qmin + 2 ** bits - 1))
    self.integer(op, "zero_point", need, qmin, qmax)
    pixels = op.get("pixels", False)
    need(op, "pixels", isinstance(pixels, bool), f"must be true or false{self.got(op, 'pixels')}")
    need(op, "pixels", not pixels or (bits, qmin, qmax) == (8, 0, 255),
         "is true, so the grid must be the uint8 pixels' (bits 8, qmin 0, qmax 255)")

  def value_range(self, op, ranges, need):
    return op["qmin"], op["qmax"]

  def tflite_op(self, op):
    return "QUANTIZE"

  def tflite(self, op, w):
    """The uint8 image input ([batch, H, W, C], the batch dynamic) and QUANTIZE to int8: equal
    scales, zero point - 128, so every value moves by -128 exactly."""
    if not op.get("pixels", False):
      w.fail(op, "the tflite target takes the uint8 image; the first quantizer must be the pixel "
             "grid (train with --config.input_norm=pixel)")
    shape = w.shapes["input"]
    if w.float:  # the float twin takes the normalised float image
      w.ids["input"] = w.ids[op["output"]] = w.builder.add_tensor(
          "input", shape, "float32", signature=w.signature(shape))
      w.offsets["input"] = w.offsets[op["output"]] = 0
      return
    x = w.builder.add_tensor("input", shape, "uint8", scale=float(np.float32(op["scale"])),
                             zero_point=op["zero_point"], signature=w.signature(shape))
    w.ids["input"], w.offsets["input"] = x, 0
    y = w.grid_tensor(op["output"], op["scale"], op["zero_point"], op["qmin"], op["qmax"], op)
    w.builder.add_operator("QUANTIZE", [x], [y])

  def onnx(self, op, w):
    """The uint8 image input ([batch, C, H, W], the batch dynamic), read directly by the first
    QLinear op: the pixel grid is the stored uint8 (offset 0)."""
    if not op.get("pixels", False):
      w.fail(op, "the onnx target takes the uint8 image; the first quantizer must be the pixel "
             "grid (train with --config.input_norm=pixel)")
    w.names[op["output"]] = "input"
    w.builder.input("input", w.shape("input"), "uint8")
    w.grid_tensor(op["output"], op["scale"], op["zero_point"], op["qmin"], op["qmax"], op)

  def kernel(self, op, env, tensors):
    x = jnp.asarray(env[op["input"]])
    if op.get("pixels", False) and jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.clip(x.astype(jnp.int32), op["qmin"], op["qmax"])
    x = half_up(jnp.asarray(env[op["input"]], jnp.float32) / op["scale"]) + op["zero_point"]
    return jnp.clip(x, op["qmin"], op["qmax"]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RequantRule:
  """How a `requantize` op turns an int32 accumulator into `y` (before `+ z_out` and the clamp):
  the kernel family's arithmetic. `fields` are the op's tensor fields with their dtype (each a
  1-d tensor, one value or one per output channel, all of one shape); `apply(x, *tensors)`;
  `check(*tensors)` -> None or (field, what it must be); `monotone(*tensors)`: non-decreasing in
  `x`."""
  name: str
  fields: tuple
  apply: Callable
  check: Callable
  monotone: Callable


def _fixed_point_check(shift_lo, shift_hi):
  def check(m0, sh):
    if not np.all(m0 >= 0):
      return "multiplier", "must hold integers >= 0"
    if not np.all((sh >= shift_lo) & (sh <= shift_hi)):
      return "shift", f"must hold integers in [{shift_lo}, {shift_hi}]"
    return None
  return check


def _nonneg_no_left_shift(m0, sh):
  # M0 >= 0 and no left shift (which could wrap): the high multiply, the rounding shift and the
  # clamp are then all monotone
  return bool(np.all(m0 >= 0) and np.all(sh <= 0))


_FIXED = (("multiplier", np.int32), ("shift", np.int32))
REQUANT_RULES = {r.name: r for r in (
    # TFLite's MultiplyByQuantizedMultiplier (SRDHM, then RoundingDivideByPOT, ties away): mpq's
    # own rule, LiteRT reference convs (the default when a manifest names no rule)
    RequantRule("double", _FIXED, lambda x, m0, sh: multiply_by_quantized_multiplier(
        x, jnp.asarray(m0, jnp.int32), jnp.asarray(sh, jnp.int32), nonneg=bool(np.all(m0 >= 0))),
                _fixed_point_check(-31, 30), _nonneg_no_left_shift),
    # LiteRT's optimized (ruy) kernels: SRDHM, then a shift rounding ties toward +inf
    RequantRule("double_up", _FIXED, lambda x, m0, sh: multiply_by_quantized_multiplier_up(
        x, jnp.asarray(m0, jnp.int32), jnp.asarray(sh, jnp.int32)),
                _fixed_point_check(-31, 30), _nonneg_no_left_shift),
    # LiteRT's reference FULLY_CONNECTED: one rounding of x M0 / 2^(31 - shift), ties away from 0
    RequantRule("single_away", _FIXED, lambda x, m0, sh: multiply_by_quantized_multiplier_single_away(
        x, jnp.asarray(m0, jnp.int32), jnp.asarray(sh, jnp.int32)),
                _fixed_point_check(-31, 30), _nonneg_no_left_shift),
    # mpq's own format: one rounding of the exact product x M0 / 2^(31 - shift), ties toward +inf
    # (the fake-quant model's half up; no double rounding at large right shifts)
    RequantRule("exact", _FIXED, lambda x, m0, sh: multiply_by_quantized_multiplier_exact(
        x, jnp.asarray(m0, jnp.int32), jnp.asarray(sh, jnp.int32)),
                _fixed_point_check(-31, 30), _nonneg_no_left_shift),
    # XNNPACK (LiteRT auto) and ONNX Runtime's QLinear ops: rint_half_even(f32(x) * scale), scale
    # the float32 f32(f32(s_in s_w) / s_out)
    RequantRule("float32_even", (("scale", np.float32),), multiply_by_float32_even,
                lambda sc: None if np.all(np.isfinite(sc) & (sc >= 0)) else
                ("scale", "must hold finite numbers >= 0"),
                lambda sc: bool(np.all(sc >= 0))),
)}


def requant_rule(op) -> RequantRule:
  return REQUANT_RULES[op.get("rule", "double")]


def requantize(op, x, tensors):
  """The rule's `y(acc)` (`op["rule"]`, default "double": `MultiplyByQuantizedMultiplier(acc,
  M0_c, shift_c)`) + z_out, clamped to `op["clamp"]`."""
  rule = requant_rule(op)
  y = rule.apply(x, *(np.asarray(tensors[op[f]]) for f, _ in rule.fields))
  lo, hi = op["clamp"]
  return jnp.clip(y + jnp.int32(op["zero_point"]), jnp.int32(lo), jnp.int32(hi))


class Requantize(IROp):
  """An int32 accumulator onto the next quantizer's grid, by the kernel family's rule
  (`REQUANT_RULES`, named by the optional field `rule`)."""
  name = "requantize"

  def monotone(self, op, tensors) -> bool:
    rule = requant_rule(op)
    return rule.monotone(*(np.asarray(tensors[op[f]]) for f, _ in rule.fields))

  def validate(self, op, raw, tensors, need):
    """`rule` (optional) one of `REQUANT_RULES`; its tensors: 1-d, non-empty, of one shape (per
    output channel, or one) and dtype, within the rule's ranges; the output grid: `bits` 2-16,
    `zero_point` and `clamp` on it."""
    need(op, "rule", op.get("rule", "double") in REQUANT_RULES,
         f"must be one of {', '.join(REQUANT_RULES)}{self.got(op, 'rule')}")
    rule = requant_rule(op)
    arrays, shape = [], None
    for field, dtype in rule.fields:
      first = rule.fields[0][0]
      a = self.tensor(op, field, raw, need, dtype, ndim=1, shape=shape,
                      what=(f"a non-empty 1-d {np.dtype(dtype).name} tensor (one value or one per "
                            "output channel)" if shape is None else
                            f"{self.article(np.dtype(dtype).name)} tensor of the {first}'s shape "
                            f"{shape}"))
      need(op, field, a.size >= 1, "must name a non-empty tensor")
      shape = a.shape
      arrays.append(a)
    problem = rule.check(*arrays)
    if problem is not None:
      field, what = problem
      need(op, field, False, f"{what} (rule {rule.name!r})")
    bits = self.bits(op, "bits", need)
    self.grid_range(op, "clamp", bits, need, strict=False)
    self.integer(op, "zero_point", need, *self.bits_range(bits))
    if "output_scale" in op:  # the output grid's scale (informative; a .tflite stores it)
      self.scale(op, "output_scale", need)
    for (field, _), a in zip(rule.fields, arrays):
      tensors[op[field]] = a

  def value_range(self, op, ranges, need):
    return tuple(op["clamp"])

  def kernel(self, op, env, tensors):
    return requantize(op, env[op["input"]], tensors)

  def tflite(self, op, w):
    w.fail(op, "a requantization that no kernel performs (of an addition or an average pooling) "
           "has no tflite lowering yet; export with --target=mpq")

  def onnx(self, op, w):
    w.fail(op, "a requantization that no QLinear op performs has no onnx lowering; export with "
           "--target=mpq")


def _requantize_grid_double(x, m0, e):
  return multiply_by_quantized_multiplier(x, jnp.int32(m0), jnp.int32(e), nonneg=True)


def _requantize_grid_optimized(x, m0, e):
  """Over the flattened tensor, whole blocks of 16 from the start take the vector rule (ties toward
  +inf at the last shift), the last `size % 16` the scalar one (optimized_ops::Requantize)."""
  flat = x.reshape(-1)
  n_vec = 16 * (flat.size // 16)
  up = multiply_by_quantized_multiplier_up(flat, jnp.int32(m0), jnp.int32(e))
  y = jnp.where(jnp.arange(flat.size) < n_vec, up, _requantize_grid_double(flat, m0, e))
  return y.reshape(x.shape)


def _fixed_point_grid_rule(rule):
  def apply(op, x):
    m0, e = RequantizeGrid.multiplier(op)
    return rule(x - jnp.int32(op["input_zero_point"]), m0, e) + jnp.int32(op["zero_point"])
  return apply


def _requantize_grid_ort(op, x):
  """ONNX Runtime's DequantizeLinear then QuantizeLinear (the float path; `mpq.export.ort_rules`):
  `rint_even(f32(f32(f32(q - z_in) s_in) / s_out)) + z_out`. Tabulated on the host in exact
  float32 over every input a uint8 tensor can hold (`q - z_in` in [-255, 255]): no float
  arithmetic runs in the executor, so nothing depends on how XLA compiles a division."""
  from mpq.float32 import f32, rint_f32  # pylint: disable=g-import-not-at-top
  d = np.arange(-255, 256)
  table = rint_f32(f32(f32(f32(d) * f32(op["input_scale"])) / f32(op["scale"])))
  table = np.clip(table, -2 ** 24, 2 ** 24).astype(np.int32)
  idx = jnp.clip(x - jnp.int32(op["input_zero_point"]) + 255, 0, 510)
  return jnp.asarray(table)[idx] + jnp.int32(op["zero_point"])


def _requantize_grid_xnnpack(op, x):
  """XNNPACK's qs8 convert (LiteRT `litert-auto` where XNNPACK takes the QUANTIZE; measured against
  LiteRT, `tests/test_requant_rules.py`): `m = lrintf(256 f32(s_in / s_out))`, then
  `((q - z_in) m + 128) >> 8` (an arithmetic shift: ties toward +inf) `+ z_out`."""
  f32 = np.float32
  m = int(np.rint(f32(256.0) * f32(f32(op["input_scale"]) / f32(op["scale"]))))
  d = x - jnp.int32(op["input_zero_point"])
  return jnp.right_shift(d * jnp.int32(m) + jnp.int32(128), jnp.int32(8)) + jnp.int32(
      op["zero_point"])


GRID_RULES = {"double": _fixed_point_grid_rule(_requantize_grid_double),
              "optimized": _fixed_point_grid_rule(_requantize_grid_optimized),
              "ort": _requantize_grid_ort, "xnnpack": _requantize_grid_xnnpack}
# the rule of each family's kernel; under litert-auto the builtin one (the tflite target's
# emulation puts `xnnpack` where XNNPACK takes the op)
GRID_FAMILIES = {"litert-ref": "double", "litert-ruy": "optimized", "litert-auto": "optimized",
                 "ort": "ort"}


class RequantizeGrid(IROp):
  """A grid tensor onto another grid (TFLite's QUANTIZE between int8 tensors): `clamp(MBQM(q -
  z_in, M0, e) + z_out)` with `M0, e = QuantizeMultiplier(double(f32 s_in) / double(f32 s_out))`
  (derived from the fields); `rule` (`GRID_RULES`) `double` (the reference kernel, default),
  `optimized`, `xnnpack` (XNNPACK's qs8 convert) or `ort` (ONNX Runtime's DequantizeLinear +
  QuantizeLinear in float32). A target
  whose ops have one output emits it where an accumulator feeds two
  grids (`mpq.export.exporter.Lowering.requantize_grid`)."""
  name = "requantize_grid"

  def validate(self, op, raw, tensors, need):
    need(op, "rule", op.get("rule", "double") in GRID_RULES,
         f"must be one of {', '.join(GRID_RULES)}{self.got(op, 'rule')}")
    self.scale(op, "input_scale", need)
    self.scale(op, "scale", need)
    self.integer(op, "input_zero_point", need, -2 ** 16, 2 ** 16)
    if "input_bits" in op:  # the input grid's bits (manifests since 16x8 mode; default 8)
      self.bits(op, "input_bits", need)
    bits = self.bits(op, "bits", need)
    self.grid_range(op, "clamp", bits, need, strict=False)
    self.integer(op, "zero_point", need, *self.bits_range(bits))

  def value_range(self, op, ranges, need):
    need(op, "input", op["input"] in ranges, f"names {op['input']!r}, which is no integer grid "
         "tensor")
    return tuple(op["clamp"])

  @staticmethod
  def multiplier(op) -> tuple[int, int]:
    from mpq.fixedpoint import quantize_multiplier  # pylint: disable=g-import-not-at-top
    return quantize_multiplier(float(np.float32(op["input_scale"])) /
                               float(np.float32(op["scale"])))

  def for_family(self, op, family):
    """The family's kernel (`GRID_FAMILIES`); with an int16 side (TFLite's 16x8 mode: a grid over
    8 bits) the reference one in every LiteRT family (measured: `litert_rules.requantize`)."""
    if family not in GRID_FAMILIES:
      raise ValueError(f"the requantization of an integer tensor onto another grid in {family} has "
                       "not been measured against the runtime yet, so it cannot be emulated")
    if family.startswith("litert-") and max(op["bits"], op.get("input_bits", 8)) > 8:
      return dict(op, rule="double")
    return dict(op, rule=GRID_FAMILIES[family])

  def kernel(self, op, env, tensors):
    y = GRID_RULES[op.get("rule", "double")](op, env[op["input"]])
    lo, hi = op["clamp"]
    return jnp.clip(y, jnp.int32(lo), jnp.int32(hi))

  def tflite_op(self, op):
    return "QUANTIZE"

  def tflite(self, op, w):
    """QUANTIZE int8 -> int8. LiteRT clamps to int8 only: the grid's top is int8's (the storage
    offset); its bottom is int8's, or the zero point with an input that the same ReLU clamped
    (then no value falls below it), or else a MAXIMUM with the bottom (a signed grid below 8
    bits)."""
    x, _ = w.grid(op, op["input"])
    if w.float:  # the float twin: one tensor
      w.ids[op["output"]], w.offsets[op["output"]] = x, 0
      w.grid_range[op["output"]] = tuple(op["clamp"])
      return
    lo, hi = op["clamp"]
    src_lo = w.grid_range.get(op["input"], (None, None))[0]
    as_relu = lo == op["zero_point"] and src_lo == op["input_zero_point"]
    y, _ = w.fused_output(dict(op, output_scale=op["scale"]), relu=as_relu)
    w.builder.add_operator("QUANTIZE", [x], [y])
    w.finish_output(op["output"])

  def onnx(self, op, w):
    """DequantizeLinear then QuantizeLinear (ORT runs both in float32; rule `ort`), and the Clip of a
    grid narrower than uint8."""
    if op.get("rule") != "ort":
      w.fail(op, f"its rule {op.get('rule', 'double')!r} is not ONNX Runtime's ('ort')")
    x, _ = w.grid(op, op["input"])
    w.check_zero_point(op, op["input"], op["input_zero_point"])
    xs, xz = w.qparams[op["input"]]
    y, ys, yz = w.output_grid(op, op["output"], op["scale"], op["zero_point"], *op["clamp"])
    b = w.builder
    f = b.node("DequantizeLinear", [x, xs, xz], [f"{y}/float"])
    b.node("QuantizeLinear", [f, ys, yz], [y])
    w.clamp(op["output"])


class Dequantize(IROp):
  """The logits as float: `(x - z) * scale_c` of the last accumulator (z = 0), or of the int8
  logits on their calibrated grid (`zero_point` z; a target with int8 outputs)."""
  name = "dequantize"

  def validate(self, op, raw, tensors, need):
    """`scale`: finite numbers > 0, one or one per class (the loader checks the count);
    `zero_point` (optional) an integer."""
    self.scales(op, "scale", need)
    if "zero_point" in op:
      self.integer(op, "zero_point", need, -(2 ** 31), 2 ** 31 - 1)

  def tflite(self, op, w):
    """The int8 logits are the graph's output (dequantizing is the caller's)."""
    x, _ = w.grid(op, op["input"])
    w.outputs.append(x)

  def onnx(self, op, w):
    """The uint8 logits (on a grid stored at offset 0) are the graph's output."""
    x, off = w.grid(op, op["input"])
    if off != 0:
      w.fail(op, "the logits' grid must be unsigned 8-bit (the onnx target outputs uint8)")
    w.check_zero_point(op, op["input"], op.get("zero_point", 0))
    w.outputs.append((x, w.shape(op["input"])))

  def kernel(self, op, env, tensors):
    x = env[op["input"]] - jnp.int32(op.get("zero_point", 0))
    return x.astype(jnp.float32) * jnp.asarray(np.asarray(op["scale"], np.float32))


register(Quantize(), Requantize(), RequantizeGrid(), Dequantize())
