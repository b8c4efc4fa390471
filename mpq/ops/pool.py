"""Pooling: `max_pool` (non-overlapping windows) and `avg_pool` (average over chosen axes, by
default the global average over H, W).

Both sit between an accumulator and the next quantizer (`Transform`):
  max_pool  commutes with the monotone requantization, so it runs on the requantized integers (or on
            the accumulator, when a later op needs the accumulator); IR `max_pool`
  avg_pool  is an integer sum over its axes (default H, W; IR `sum_pool`, after a rounding right
            `shift` where the sum of n accumulators could overflow int32); `1 / n` joins the next
            multiplier. Every
            transform before it runs on the accumulator too (ReLU does not commute with a sum).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mpq.fixedpoint import rounding_divide_by_pot
from mpq.ops.registry import IROp, Transform, register


def max_pool(x, w: int):
  """Max over non-overlapping `w` x `w` windows of NHWC `x` (VALID: the remainder is cropped)."""
  b, h, wd, c = x.shape
  h, wd = h // w, wd // w
  return x[:, :h * w, :wd * w].reshape(b, h, w, wd, w, c).max(axis=(2, 4))


class MaxPool(Transform):
  name = "max_pool"

  def on_accumulator(self, lw, acc, node):
    out = lw.new()
    lw.emit({"op": "max_pool", "name": f"{acc.name}/max_pool", "input": acc.tensor, "output": out,
             "window": int(node.layer.window)})
    return acc._replace(tensor=out)

  def after_requantize(self, lw, tensor, node):
    out = lw.new()
    lw.emit({"op": "max_pool", "name": f"{lw.consumer}/pool", "input": tensor, "output": out,
             "window": int(node.layer.window)})
    return out


class AvgPool(Transform):
  name = "avg_pool"
  requires_accumulator = True

  def on_accumulator(self, lw, acc, node):
    axes = node.layer.axes
    channel_axis = len(node.in_shapes[0]) - 1
    if channel_axis in axes and np.size(acc.scale) > 1:
      lw.fail(f"layer {node.name!r}: average pooling over the channel axis sums accumulators of "
              "different per-channel scales; pool over other axes, or export per-tensor weights")
    n = math.prod(int(node.in_shapes[0][a]) for a in axes)
    tensor, scale, bound = acc.tensor, acc.scale, acc.bound
    # the sum of n accumulators must fit int32: shift right first where the bound says so
    k = math.ceil(math.log2(bound * n / (2 ** 31 - 1))) if bound * n >= 2 ** 31 else 0
    if k:
      out = lw.new()
      lw.emit({"op": "shift", "name": f"{acc.name}/shift", "input": tensor, "output": out,
               "right": k})
      tensor, scale, bound = out, scale * 2 ** k, bound / 2 ** k + 1
    out = lw.new()
    op = {"op": "sum_pool", "name": f"{acc.name}/sum_pool", "input": tensor, "output": out}
    if axes != (1, 2):
      op["axes"] = list(axes)
    lw.emit(op)
    return acc._replace(tensor=out, scale=scale / n, bound=bound * n)  # mean = sum / (H W)


  def after_requantize(self, lw, tensor, node):
    """On a requantized tensor (a target whose ops take int8 tensors): the `mean` of the grid's
    integers over `axes`, on the same grid, rounded by the kernel family's rule."""
    g = lw.grids[tensor]
    lo, hi = g["clamp"]
    out = lw.new()
    lw.emit({"op": "mean", "name": f"{lw.consumer}/mean", "input": tensor, "output": out,
             "axes": list(node.layer.axes), "scale": g["scale"], "zero_point": g["zero_point"],
             "clamp": [lo, hi], "bits": g["bits"],
             "storage_offset": lw.target.storage_offset(lo, hi, g["zero_point"])})
    lw.grids[out] = g
    return out


def _mean_reference(total, n, z, s, off):
  """reference_ops::QuantizedMeanOrSum with equal input and output scales: `M0, e` of
  `s / s`, `k = min(floor(log2 n), 32, 31 + e)`, `MBQM(sum - z n, (M0 << k) // n, e - k) + z`."""
  from mpq.fixedpoint import multiply_by_quantized_multiplier, quantize_multiplier  # pylint: disable=g-import-not-at-top
  del off
  m0, e = quantize_multiplier(float(np.float32(s)) / float(np.float32(s)))
  k = min(n.bit_length() - 1, 32, 31 + e)
  y = multiply_by_quantized_multiplier(total - jnp.int32(z * n), jnp.int32((m0 << k) // n),
                                       jnp.int32(e - k), nonneg=True)
  return y + jnp.int32(z)


def _mean_optimized(total, n, z, s, off):
  """optimized_integer_ops::Mean (4-D, axes 1, 2, keep_dims; one thread): on the stored values
  (`q + off`), the zero points folded into a float32 bias, the raw sum rescaled by
  `QuantizeMultiplier(f32(s / f32(n s)))`, channels in whole blocks of 16 by the vector rule
  (ties toward +inf at the last shift), the rest by the scalar rule (`litert_rules.mean_optimized_hw`)."""
  from mpq.fixedpoint import (multiply_by_quantized_multiplier,  # pylint: disable=g-import-not-at-top
                              multiply_by_quantized_multiplier_up, quantize_multiplier)
  f32 = np.float32
  zs = z + off
  t = f32(f32(f32(zs) * f32(s)) / f32(s))
  t = f32(t + f32(0.5)) if t > 0 else f32(t - f32(0.5))
  bias = int(zs) - int(np.trunc(t))
  m0, e = quantize_multiplier(float(f32(f32(s) / f32(f32(n) * f32(s)))))
  raw = total + jnp.int32(off * n)
  c = total.shape[-1]
  vec = jnp.arange(c) < 16 * (c // 16)
  y = jnp.where(vec, multiply_by_quantized_multiplier_up(raw, jnp.int32(m0), jnp.int32(e)),
                multiply_by_quantized_multiplier(raw, jnp.int32(m0), jnp.int32(e)))
  return y + jnp.int32(bias) - jnp.int32(off)


def _mean_xnnpack(total, n, z, s, off):
  """XNNPACK's qs8 mean (`litert-auto`): float32 throughout, `rint_even(f32(f32(sum) * scale) +
  bias)` with `scale = f32(f32(s / s) * f32(1 / n))`, `bias = f32(z - f32(f32(n z) * scale))`, on
  the stored values (`litert_rules.mean_xnnpack`)."""
  f32 = np.float32
  zs = z + off
  scale = f32(f32(f32(s) / f32(s)) * f32(f32(1.0) / f32(n)))
  bias = f32(f32(zs) - f32(f32(n * zs) * scale))
  raw = (total + jnp.int32(off * n)).astype(jnp.float32)
  y = jnp.round(raw * jnp.float32(scale) + jnp.float32(bias)).astype(jnp.int32)
  return y - jnp.int32(off)


def _mean_ort(total, n, z, s, off):
  """ONNX Runtime's com.microsoft QLinearGlobalAveragePool (`ort_rules.qlinear_global_average_pool`):
  the integer sum minus `z n` (independent of the storage offset), times the float32 scale
  `f32(s / f32(s f32(n)))`, rounded half to even, plus z."""
  f32 = np.float32
  del off
  scale = f32(f32(s) / f32(f32(s) * f32(n)))
  acc = (total - jnp.int32(z * n)).astype(jnp.float32)
  return jnp.round(acc * jnp.float32(scale)).astype(jnp.int32) + jnp.int32(z)


MEAN_RULES = {"reference": _mean_reference, "optimized": _mean_optimized,
              "xnnpack": _mean_xnnpack, "ort": _mean_ort}
MEAN_FAMILIES = {"litert-ref": "reference", "litert-ruy": "optimized", "litert-auto": "xnnpack",
                 "ort": "ort"}


class MeanIR(IROp):
  """The mean of a grid tensor over `axes` on the same grid (TFLite's MEAN, keep_dims), rounded
  by `rule` (`MEAN_RULES`: each LiteRT kernel family's, measured in `mpq.export.litert_rules`);
  `storage_offset`: what the runtime adds to the integers it stores (its rules round the raw
  stored sum). A target whose ops take int8 tensors lowers average pooling to it (TFLite's MEAN,
  ONNX Runtime's QLinearGlobalAveragePool)."""
  name = "mean"

  def validate(self, op, raw, tensors, need):
    need(op, "rule", op.get("rule", "reference") in MEAN_RULES,
         f"must be one of {', '.join(MEAN_RULES)}{self.got(op, 'rule')}")
    need(op, "axes", op.get("axes") == [1, 2], f"must be [1, 2] (H, W){self.got(op, 'axes')}")
    self.scale(op, "scale", need)
    bits = self.bits(op, "bits", need)
    self.grid_range(op, "clamp", bits, need, strict=False)
    self.integer(op, "zero_point", need, *self.bits_range(bits))
    self.integer(op, "storage_offset", need, -2 ** 16, 2 ** 16)

  def value_range(self, op, ranges, need):
    need(op, "input", op["input"] in ranges, f"names {op['input']!r}, which is no integer grid "
         "tensor")
    return tuple(op["clamp"])

  def for_family(self, op, family):
    """The family's kernel (`MEAN_FAMILIES`); on an int16 grid (TFLite's 16x8 mode, over 8 bits)
    the reference one in every LiteRT family (measured: `litert_rules.mean_reference`)."""
    if family.startswith("litert-") and op["bits"] > 8:
      return dict(op, rule="reference")
    return dict(op, rule=MEAN_FAMILIES[family])

  def kernel(self, op, env, tensors):
    x = env[op["input"]]
    n = int(x.shape[1] * x.shape[2])
    total = jnp.sum(x, axis=(1, 2), keepdims=True, dtype=jnp.int32)
    y = MEAN_RULES[op.get("rule", "reference")](total, n, op["zero_point"], op["scale"],
                                                 op["storage_offset"])
    lo, hi = op["clamp"]
    return jnp.clip(y, jnp.int32(lo), jnp.int32(hi))

  def tflite_op(self, op):
    return "MEAN"

  def tflite(self, op, w):
    x, off = w.grid(op, op["input"])
    if not w.float and off != op["storage_offset"]:  # the float twin stores no integers
      w.fail(op, f"its storage_offset {op['storage_offset']} is not its input tensor's ({off})")
    y = w.alias(op["output"], op["input"])
    axes = w.builder.add_tensor(f"{op['name']}/axes", [2], "int32", data=np.asarray([1, 2]))
    w.builder.add_operator("MEAN", [x, axes], [y], w.builder.options("ReducerOptions",
                                                                      keepDims=True))

  def onnx(self, op, w):
    """com.microsoft QLinearGlobalAveragePool (NCHW), the output quantized as its input."""
    if op.get("rule") != "ort":
      w.fail(op, f"its rule {op.get('rule', 'reference')!r} is not ONNX Runtime's ('ort')")
    x, _ = w.grid(op, op["input"])
    w.check_zero_point(op, op["input"], op["zero_point"])
    xs, xz = w.qparams[op["input"]]
    y = w.alias(op["output"], op["input"])
    w.builder.node("QLinearGlobalAveragePool", [x, xs, xz, xs, xz], [y], channels_last=0)


class MaxPoolIR(IROp):
  name = "max_pool"
  commutes_with_monotone = True  # max(f(a), f(b)) == f(max(a, b)) for a non-decreasing f

  def validate(self, op, raw, tensors, need):
    self.integer(op, "window", need, 1, 2 ** 16)

  def value_range(self, op, ranges, need):
    return ranges.get(op["input"])  # the max of grid integers stays on the grid

  def kernel(self, op, env, tensors):
    return max_pool(env[op["input"]], op["window"])

  def tflite_op(self, op):
    return "MAX_POOL_2D"

  def tflite(self, op, w):
    """MAX_POOL_2D over non-overlapping windows (VALID), the output quantized as its input."""
    x, _ = w.grid(op, op["input"])
    y = w.alias(op["output"], op["input"])
    win = op["window"]
    w.builder.add_operator("MAX_POOL_2D", [x], [y], w.builder.options(
        "Pool2DOptions", padding="VALID", strideW=win, strideH=win, filterWidth=win,
        filterHeight=win, fusedActivationFunction="NONE"))

  def onnx(self, op, w):
    """MaxPool over non-overlapping windows on the stored uint8 values (order-preserving)."""
    x, _ = w.grid(op, op["input"])
    y = w.alias(op["output"], op["input"])
    win = op["window"]
    w.builder.node("MaxPool", [x], [y], kernel_shape=[win, win], strides=[win, win])


class SumPoolIR(IROp):
  """Average pooling's sum in int32 over `axes` (default [1, 2]: H, W)."""
  name = "sum_pool"

  def validate(self, op, raw, tensors, need):
    axes = op.get("axes", [1, 2])
    need(op, "axes", isinstance(axes, list) and axes and len(set(axes)) == len(axes)
         and all(self.is_int(a) and 1 <= a <= 8 for a in axes),
         f"must be a list of distinct positive axes (axis 0 is the batch){self.got(op, 'axes')}")

  def kernel(self, op, env, tensors):
    return jnp.sum(env[op["input"]], axis=tuple(op.get("axes", (1, 2))), dtype=jnp.int32)


class ShiftIR(IROp):
  """Rounding right shift (RoundingDivideByPOT): headroom before a sum."""
  name = "shift"

  def validate(self, op, raw, tensors, need):
    self.integer(op, "right", need, 0, 31)

  def kernel(self, op, env, tensors):
    return rounding_divide_by_pot(env[op["input"]], jnp.int32(op["right"]))


register(MaxPool(), AvgPool(), MaxPoolIR(), SumPoolIR(), ShiftIR(), MeanIR())
