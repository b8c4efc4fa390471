"""ONNX Runtime's integer rules (CPU execution provider), one NumPy function per rule (no runtime
imports).

Each function transcribes the kernel named in its docstring (ONNX Runtime 1.32.0 sources: MLAS under
`onnxruntime/core/mlas/lib/`, the kernels under `onnxruntime/core/providers/cpu/` and
`onnxruntime/contrib_ops/cpu/`) and was checked against the real runtime, at optimization levels
ORT_DISABLE_ALL and ORT_ENABLE_ALL with 1 and 2 intra-op threads, with 0 mismatches
(`benchmarks/ort_rules.py`, `tests/test_ort_rules.py`). Which rule each op follows is `RULES`.

ONNX Runtime's quantized ops round in float32, never with a fixed-point multiplier: the rescale is a
float32 product or quotient of the float32 scales in the file, the int32 accumulator is converted to
float32 and multiplied, and `cvtps2dq` rounds half to even (the x86 default rounding mode). Float32
steps are written `f32(...)` and are exact IEEE float32 operations in NumPy; `fma_f32` is a fused
multiply-add (one rounding), as the AVX2 kernels compute.

The integer products are exact only where the kernel cannot saturate: on x86 without VNNI, MLAS
computes uint8 x int8 products with VPMADDUBSW, which saturates the int16 sum of two adjacent
products (measured on AVX-512BW without VNNI: most outputs of a QGemm with full-range int8 weights
wrong); uint8 x uint8 kernels widen first and are exact on every CPU, so the onnx target stores
weights as uint8 `w + 128` with zero point 128 (the accumulators below are the same integers).

Notation: NCHW tensors, `q` stored integers (uint8 activations, weights `w - z_w`), `z` zero points,
`s` float32 scales. The activation layout the onnx target plans is uint8 with zero point
`z_u8 = z_i8 + 128` for mpq's signed grid: the stored byte is `q_i8 + 128` (`to_uint8`), which every
rule below treats exactly (they use only `q - z`).
"""

from __future__ import annotations

import numpy as np

from mpq.float32 import f32, fma_f32, rint_f32  # noqa: F401  (the rules' float32 steps)

U8 = (0, 255)
I8 = (-128, 127)


def to_uint8(q_i8):
  """mpq's int8 grid value -> the stored uint8 byte with zero point + 128 (exact: `q + 128`)."""
  return (np.asarray(q_i8, np.int64) + 128).astype(np.uint8)


# -- QuantizeLinear / DequantizeLinear (core/providers/cpu/quantization/quantize_linear.cc) -----------
def quantize_linear(x, scale, zero_point, out_range=U8):
  """QuantizeLinear float32 -> uint8 / int8, per tensor: MLAS `MlasQuantizeLinear`
  (mlas/lib/quantize.cpp, `MlasQuantizeLinearVector` and its scalar tail): a float32 *division*
  (not a multiplication by 1 / s), clamped to `[lo - z, hi - z]` in float, rounded half to even,
  plus z: `clip(rint(f32(x / s)), lo - z, hi - z) + z`."""
  v = f32(f32(x) / f32(scale))
  lo, hi = out_range
  v = np.clip(v, f32(lo - zero_point), f32(hi - zero_point))
  return rint_f32(v) + int(zero_point)


def dequantize_linear(q, scale, zero_point=0, axis=None):
  """DequantizeLinear uint8 / int8 / INT4 -> float32: `f32(f32(q - z) * s)` (the integer
  difference is exact in float32; one rounding for the product). `axis`: per-axis scales and zero
  points along that axis."""
  q = np.asarray(q, np.int64)
  s, z = np.asarray(scale, np.float32), np.asarray(zero_point, np.int64)
  if axis is not None and s.ndim == 1:
    shape = [1] * q.ndim
    shape[axis] = -1
    s, z = s.reshape(shape), z.reshape(shape)
  return f32(f32(q - z) * s)


# -- QLinearConv / QLinearMatMul / QGemm ------------------------------------------------------------
def output_scale(s_x, s_w, s_y):
  """The float32 rescale per output channel, `f32(f32(s_x s_w) / s_y)` (qlinearconv.cc
  `output_scales`; QLinearMatMul and QGemm `ComputeOutputScale` with alpha = 1)."""
  return f32(f32(f32(s_x) * np.asarray(s_w, np.float32)) / f32(s_y))


def requantize(acc, scale, z_out, out_range=U8):
  """MLAS `MlasRequantizeOutput` (mlas/lib/quantize.cpp; the ConvSym and QGEMM kernels' requant
  step computes the same): the int32 accumulator (bias included) to float32, times the float32
  scale, clamped to `[lo - z, hi - z]`, rounded half to even, plus z:
  `clip(rint(f32(f32(acc) * scale)) + z)`. `scale` broadcasts over the channel axis (axis 1 of
  NCHW, the last axis of a matrix product: pass it shaped accordingly)."""
  v = f32(f32(np.asarray(acc, np.int64)) * np.asarray(scale, np.float32))
  return np.clip(rint_f32(v) + int(z_out), *out_range)


def conv_accumulator(q, z_x, w, bias=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                     group=1):
  """The int32 accumulator of QLinearConv (NCHW input `q`, OIHW weights `w` symmetric int8 / INT4,
  ONNX `pads` = [top, left, bottom, right], `group` groups: depthwise when group = C):
  `sum (q - z_x) w + bias`, the padding contributing 0 (ORT pads with the input zero point).
  Computed in float64, exact here: |q - z_x| <= 255, |w| <= 128 and K < 2^30 keep every partial
  sum below 2^53."""
  x = np.asarray(q, np.float64) - float(z_x)
  w = np.asarray(w, np.float64)
  n, c, h, wd = x.shape
  o, cg, kh, kw = w.shape
  sh, sw = strides
  dh, dw = dilations
  pt, pl, pb, pr = pads
  x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
  oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
  ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
  cols = np.stack([x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                   for i in range(kh) for j in range(kw)], axis=2)  # N, C, kh kw, oh, ow
  cols = cols.reshape(n, group, cg * kh * kw, oh * ow)
  wg = w.reshape(group, o // group, cg * kh * kw)
  acc = np.matmul(wg[None], cols).reshape(n, o, oh, ow)
  if bias is not None:
    acc = acc + np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
  return np.rint(acc).astype(np.int64)


def matmul_accumulator(q, z_a, w, z_w=0, bias=None):
  """The int32 accumulator of QLinearMatMul / QGemm: `(q - z_a) @ (w - z_w) + bias` for `q [M, K]`,
  `w [K, N]` (float64, exact as in `conv_accumulator`)."""
  acc = (np.asarray(q, np.float64) - float(z_a)) @ (np.asarray(w, np.float64)
                                                    - np.asarray(z_w, np.float64))
  if bias is not None:
    acc = acc + np.asarray(bias, np.float64)
  return np.rint(acc).astype(np.int64)


def qlinear_conv(q, z_x, s_x, w, s_w, s_y, z_y, bias=None, out_range=U8, **conv):
  """QLinearConv (core/providers/cpu/nn/qlinearconv.cc; MLAS ConvSym / QGEMM / depthwise kernels,
  all requantizing with `requantize`): `requantize(conv_accumulator, output_scale(s_x, s_w[c],
  s_y), z_y)` with per-output-channel `s_w`. The rule of shared/DEPLOY.md."""
  acc = conv_accumulator(q, z_x, w, bias, **conv)
  scale = np.broadcast_to(output_scale(s_x, s_w, s_y), (acc.shape[1],)).reshape(1, -1, 1, 1)
  return requantize(acc, scale, z_y, out_range)


def qlinear_matmul(q, z_a, s_a, w, s_w, s_y, z_y, bias=None, z_w=0, out_range=U8):
  """QLinearMatMul (quantize_linear_matmul.cc, no bias) and com.microsoft QGemm (quant_gemm.cc, int32
  bias C, alpha = 1): `requantize(matmul_accumulator, output_scale(s_a, s_w[n], s_y), z_y)` with
  per-column `s_w`."""
  acc = matmul_accumulator(q, z_a, w, z_w, bias)
  scale = np.broadcast_to(output_scale(s_a, s_w, s_y), (acc.shape[-1],))
  return requantize(acc, scale, z_y, out_range)


# -- com.microsoft QLinearAdd (contrib_ops/cpu/quantization/qlinear_binary_op.cc) --------------------
def qlinear_add(a, z_a, s_a, b, z_b, s_b, s_c, z_c, out_range=U8):
  """QLinearAdd of two same-shape tensors on x86-64 with AVX2 (MLAS `MlasQLinearAddKernelAvx2Helper`,
  mlas/lib/intrinsics/avx2/qladd_avx2.cpp). Float32 throughout, the zero points folded into one
  constant, the raw stored values (not q - z) scaled, two fused multiply-adds:

    r_a = f32(s_a / s_c);  r_b = f32(s_b / s_c)
    k   = f32(z_c - fma(r_a, z_a, f32(r_b z_b)))             (the kernel's `VectorFixedPart`)
    out = clip(rint(fma(a, r_a, fma(b, r_b, k))))            (rint: half to even)

  The documented formula `rint((s_a (a - z_a) + s_b (b - z_b)) / s_c) + z_c` (MLAS's non-SIMD
  fallback) differs from the runtime on 2.8% of outputs (exact ties resolved after, not before, the
  zero point is added); the SSE2 kernel's order (no FMA) on 10 of 9.4M. The compiler contracted
  `k`'s sum of products into one FMA, the first product fused: on 80 random models (4.8M outputs)
  `k` without contraction missed 4 outputs, with the second product fused 6, this rule none.
  Elementwise, so the thread split does not matter. Same-shape tensors of two or more elements: a
  one-element input takes ORT's scalar-broadcast path, which folds the constant differently."""
  r_a = f32(f32(s_a) / f32(s_c))
  r_b = f32(f32(s_b) / f32(s_c))
  k = f32(f32(z_c) - fma_f32(r_a, f32(z_a), f32(r_b * f32(z_b))))
  v = fma_f32(f32(np.asarray(a)), r_a, fma_f32(f32(np.asarray(b)), r_b, k))
  return np.clip(rint_f32(v), *out_range)


# -- com.microsoft QLinearGlobalAveragePool (contrib_ops/cpu/quantization/qlinear_global_average_pool.cc)
def qlinear_global_average_pool(q, z_x, s_x, s_y, z_y, channels_last=False, out_range=U8):
  """QLinearGlobalAveragePool uint8 (MLAS `MlasQLinearGlobalAveragePoolNchw` / `...Nhwc`,
  mlas/lib/qlgavgpool.cpp, SSE2 path): the int32 sum of the raw stored values over the `n` spatial
  positions plus the bias `-z_x n`, times one float32 scale `f32(s_x / f32(s_y f32(n)))`, then
  `MlasRequantizeOutput`'s clamp, half-to-even rounding and `+ z_y`. Output keeps the reduced axes
  as 1 (NCHW `[N, C, 1, 1]`, or `[N, 1, 1, C]` with `channels_last`). MLAS rejects a scale outside
  [2^-32, 256) and n >= 2^24."""
  q = np.asarray(q, np.int64)
  axes = (1, 2) if channels_last else (2, 3)
  n = int(np.prod([q.shape[a] for a in axes]))
  scale = f32(f32(s_x) / f32(f32(s_y) * f32(n)))
  acc = q.sum(axis=axes, keepdims=True) - int(z_x) * n
  return requantize(acc, scale, z_y, out_range)


# -- MaxPool / Clip / Reshape / Flatten on uint8 ----------------------------------------------------
def max_pool(q, kernel, strides=None, pads=(0, 0, 0, 0)):
  """MaxPool on uint8 NCHW (core/providers/cpu/nn/pool.cc, `MaxPool8` / MLAS pooling): the largest
  stored value over each window's in-bounds elements (padding never wins). Exact."""
  q = np.asarray(q, np.int64)
  kh, kw = kernel
  sh, sw = strides or (1, 1)
  pt, pl, pb, pr = pads
  x = np.pad(q, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=-1)
  oh = (q.shape[2] + pt + pb - kh) // sh + 1
  ow = (q.shape[3] + pl + pr - kw) // sw + 1
  out = np.full(q.shape[:2] + (oh, ow), -1, np.int64)
  for i in range(kh):
    for j in range(kw):
      out = np.maximum(out, x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw])
  return out


def clip(q, lo, hi):
  """Clip on uint8 with uint8 bounds (opset 12+): `min(max(q, lo), hi)` on the stored values, the
  explicit clamp that puts a QLinear op's output onto a low-bit grid. Exact."""
  return np.clip(np.asarray(q, np.int64), int(lo), int(hi))


def reshape(q, shape):
  """Reshape / Flatten: the same bytes in row-major order under the new shape."""
  return np.asarray(q).reshape(shape)


# which rule each op follows (the same at every optimization level and thread count measured)
RULES = {
    "QuantizeLinear": "quantize_linear",
    "DequantizeLinear": "dequantize_linear",
    "QLinearConv": "qlinear_conv",
    "QLinearMatMul": "qlinear_matmul",
    "com.microsoft.QGemm": "qlinear_matmul",
    "com.microsoft.QLinearAdd": "qlinear_add",
    "com.microsoft.QLinearGlobalAveragePool": "qlinear_global_average_pool",
    "MaxPool": "max_pool",
    "Clip": "clip",
    "Reshape": "reshape",
    "Flatten": "reshape",
    "QDQ Conv (uint8, fused)": "qlinear_conv",
}
