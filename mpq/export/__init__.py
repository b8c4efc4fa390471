"""Integer export of a quantized model: `OUT/manifest.json` + `OUT/weights.npz`.

Format `mpq-int`, version 1. The op graph comes from one abstract forward pass (`mpq.graph.capture`)
and each op kind lowers itself (`mpq.ops`) to these integer IR ops:

  quantize     the float input onto the first layer's input grid: clip(round(x / s) + z, lo, hi)
  conv2d       int32 accumulation of (q_in - z_in) * w_int over a conv (stride, 'SAME' or 'VALID'
               padding, groups), plus the int32 bias `round(b / (s_in s_w))` (b: the bias, or the
               BatchNorm-folded bias)
  dense        the same as a matrix product over the row-major flattened input, or over the last
               axis with `flatten: false` (a per-token projection)
  add          TFLite's ADD: each input `(q - z) << L` (L = 31 - max input bits) multiplied by
               `s_i / (2 max(s_a, s_b))` (MultiplyByQuantizedMultiplier), summed: an int32
               accumulator at scale `2 max(s_a, s_b) / 2^L`
  requantize   accumulator -> the next quantizer's grid: MultiplyByQuantizedMultiplier(acc, M0_c,
               shift_c) + z_out, clamped to [lo, hi] (M_c = s_acc,c / s_out per channel); a ReLU
               before that grid is this clamp (lo = z_out), ReLU6 clamps hi at round(6 / s_out) + z_out
  clamp        ReLU/ReLU6 applied to an accumulator (before average pooling: ReLU does not commute
               with the sum); `hi` is an int or a per-channel tensor round(6 / s_acc,c)
  shift        rounding right shift (RoundingDivideByPOT) of an accumulator, so that a sum fits int32
  max_pool     max over non-overlapping windows (max commutes with the monotone requantization)
  sum_pool     average pooling as an int32 sum over `axes` (default [1, 2]: H, W); 1 / n joins the
               next multiplier
  dequantize   the last layer's accumulator to float logits: acc * s_in * s_w,c

Rounding is half up everywhere (`mpq.rounding.half_up`, the `mpq` target's rule), and multipliers
are chosen by `mpq.fixedpoint.requant_multiplier`, which avoids TFLite's double rounding where that is more
precise; evaluation of the fake-quant model sums on the integers with the same int32 bias
(`mpq.quant.layers.integer_form`). Together these make the integer model reproduce the fake-quant
model bit for bit on dense/conv/ReLU/max-pool graphs (tested); additions and average pooling agree
up to float rounding of values that lie within ~1e-7 of a rounding boundary.

Weights are per-output-channel symmetric integers (BatchNorm folded); weights of 4 bits or fewer
are packed into uint8 (`pack`).
"""

from mpq.export.exporter import ExportError, export, load, pack, unpack
from mpq.export.targets import TARGETS

__all__ = ["ExportError", "TARGETS", "export", "load", "pack", "unpack"]
