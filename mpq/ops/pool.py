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


register(MaxPool(), AvgPool(), MaxPoolIR(), SumPoolIR(), ShiftIR())
