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
               before that grid is this clamp (lo = z_out), ReLU6 clamps hi at round(6 / s_out) + z_out.
               An optional `rule` names another kernel family's arithmetic
               (`mpq.ops.io.REQUANT_RULES`: `double`, the default above; `exact`, one rounding
               of the exact product, half up (the mpq target's); `double_up`, LiteRT's
               optimized kernels; `single_away`, LiteRT's reference FULLY_CONNECTED;
               `float32_even`, XNNPACK and ONNX Runtime, with a float32 `scale` tensor instead of
               M0 and shift), each tested against its runtime
  clamp        ReLU/ReLU6 applied to an accumulator (before average pooling: ReLU does not commute
               with the sum); `hi` is an int or a per-channel tensor round(6 / s_acc,c)
  shift        rounding right shift (RoundingDivideByPOT) of an accumulator, so that a sum fits int32
  max_pool     max over non-overlapping windows (max commutes with the monotone requantization)
  sum_pool     average pooling as an int32 sum over `axes` (default [1, 2]: H, W); 1 / n joins the
               next multiplier
  dequantize   the last layer's accumulator to float logits: acc * s_in * s_w,c

Rounding is half up everywhere (`mpq.rounding.half_up`, the `mpq` target's rule): requantization
takes rule `exact`, one rounding of the exact 64-bit product `acc M0 / 2^(31 - shift)` with TFLite's
normalised 31-bit multiplier (manifests written before it name no rule: TFLite's double rounding,
which can round values within `2^-(r+1)` of a tie the wrong way at right shift `r`); evaluation of
the fake-quant model sums on the integers with the same int32 bias
(`mpq.quant.layers.integer_form`). Together these make the integer model reproduce the fake-quant
model bit for bit on dense/conv/ReLU/max-pool graphs except where the fake-quant model's float32
value lies within float32 error of a rounding tie (tested); additions and average pooling agree
up to float rounding of values that lie within ~1e-7 of a rounding boundary.

Weights are per-output-channel symmetric integers (BatchNorm folded); weights of 4 bits or fewer
are packed into uint8 (`pack`).

`load` validates every field before anything runs: the manifest's keys, types and input spec, the
ops' fields (each IR op's `validate`: finite positive scales, bits 2-16, integers on their grids,
tensors of the dtype and element count their shapes and bits imply), that each grid tensor lies on
the grid its consumer declares, and that the shapes fit from the input to the logits; weights.npz
is read without pickle. Every defect is one `ExportError` line naming the file, op and field.
`check_input(manifest, image_shape)` refuses a dataset whose images do not fit the model.

`check_out_dir(out)` runs before any work: `out` must be new, empty, or an earlier export (an
`mpq-int` manifest and only files that registered targets write, `Target.files`); `export` then
writes into a temporary sibling directory and swaps it in (`write`), so an unrelated directory is
never touched and a failed export leaves the earlier one intact.
"""

from mpq.export.exporter import (ExportError, check_input, check_out_dir, export, load, pack,
                                 unpack, write)
from mpq.export.targets import TARGETS

__all__ = ["ExportError", "TARGETS", "check_input", "check_out_dir", "export", "load", "pack",
           "unpack", "write"]
