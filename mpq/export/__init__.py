"""Integer export of a quantized model: `OUT/manifest.json` + `OUT/weights.npz`.

Format `mpq-int`, version 1. The op graph comes from one abstract forward pass
(`mpq.layers.record_graph` under `jax.eval_shape`) and is lowered to integer ops:

  quantize     the float input onto the first layer's input grid: clip(round(x / s) + z, lo, hi)
  conv2d       int32 accumulation of (q_in - z_in) * w_int over a conv (stride, SAME padding, groups),
               plus the int32 bias `round(b_fold / (s_in s_w))`
  dense        the same as a matrix product over the row-major flattened input
  requantize   acc -> the next layer's input grid: MultiplyByQuantizedMultiplier(acc, M0_c, shift_c)
               + z_out, clamped to [lo, hi] (M_c = s_in s_w,c / s_out per output channel); a ReLU
               before that grid is this clamp (lo = z_out), ReLU6 clamps hi at round(6 / s_out) + z_out
  max_pool     max over non-overlapping windows, on the integers (max commutes with the quantizer)
  dequantize   the last layer's accumulator to float logits: acc * s_in * s_w,c

Weights are per-output-channel symmetric integers (BatchNorm folded); weights of 4 bits or fewer
are packed into uint8 (`pack`). Residual additions and average pooling are not lowered by this
version: exporting such a model is an `ExportError` naming the op.
"""

from mpq.export.exporter import ExportError, export, load, pack, unpack

__all__ = ["ExportError", "export", "load", "pack", "unpack"]
