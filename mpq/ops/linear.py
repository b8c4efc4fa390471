"""Dense and convolution: `dense`, `conv` and `conv_bn` layers, lowered to the `dense` and `conv2d`
IR ops.

Integer form (what the fake-quant layer evaluates, `mpq.quant.layers.integer_form`): int32
accumulation of `(q_in - z_in) * w_int` over the kernel's fan-in plus the int32 bias
`round_half_up(b / (s_in s_w))`; the accumulator's real scale is `s_in s_w,c` per output channel.
`dense` flattens its input row-major to `[B, features]` first, unless `flatten=False` (a
per-token projection over the last axis; the IR op's `flatten` field, default true). Convolutions
take 'SAME' or 'VALID' padding; `conv` has an optional bias, `conv_bn` folds its BatchNorm.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mpq.ops.registry import IROp, OpKind, register
from mpq.packing import storage, unpack


# The onnx target stores weights as uint8 `w + WEIGHT_OFFSET` with that zero point (`LinearIR.onnx`).
WEIGHT_OFFSET = 128

# XLA CPU sends int8 convolutions with at most 16 input and 16 output channels to its generic
# emitter and larger ones to YNNPACK; measured on 256x28x28 inputs, 3x3, 16 -> 16 channels: 87 ms,
# the same with the output zero-padded to 17 channels: 12 ms (24: 13 ms, 32: 15 ms). Padded output
# channels (zero weights) are sliced off, so the result is unchanged.
_SMALL_CHANNELS, _PADDED_CHANNELS = 16, 17


def linear_cost(node, kernel_shape, params: int, flatten: bool) -> dict:
  """`{"params", "weights", "macs", "in", "out"}` of a layer whose every output element sums
  `prod(kernel_shape[:-1])` products (`in` flattened for a dense layer)."""
  x_shape = node.in_shapes[0][1:]
  macs = int(np.prod(node.out_shape[1:])) * int(np.prod(kernel_shape[:-1]))
  return {"params": int(params), "weights": int(np.prod(kernel_shape)), "macs": macs,
          "in": [int(np.prod(x_shape))] if flatten else list(x_shape),
          "out": list(node.out_shape[1:])}


class Linear(OpKind):
  """Shared lowering of layers that quantize their input (`aq`) and per-channel weights (`wq`) and
  accumulate products in int32 (see `lower`); `weights(layer)` gives the float (folded) weight and
  bias, `attrs(layer)` the IR op's extra fields."""
  ir: str
  quantizable = True

  def weights(self, layer):
    raise NotImplementedError

  def attrs(self, layer) -> dict:
    return {}

  def input_quantizers(self, layer) -> tuple:
    return (layer.aq,)

  def lower(self, lw, node) -> None:
    """`to_grid(input)`, then the IR op with the integer weights and int32 bias; the output is an
    accumulator at scale `s_in s_w,c` with a bound on its magnitude (for sums downstream)."""
    layer, name = lw.quantized_layer(node), node.name
    t_in, g_in = lw.to_grid(node.inputs[0], layer.aq, name)
    w, b = self.weights(layer)
    g_w, w_int, bias = lw.integer_weights(layer, w, b, name)
    extra = {k: g_w[k] for k in ("w_bits_trained", "weight_shift") if k in g_w}
    if np.any(np.abs(bias) > 2 ** 31 - 1):
      lw.fail(f"layer {name!r}: bias does not fit int32 at scale s_in * s_w")
    s_in, s_w = float(g_in["scale"][0]), g_w["scale"]
    t_acc = lw.new()
    lw.tensors[f"{name}/weight"] = lw.pack(w_int, g_w["bits"])
    lw.tensors[f"{name}/bias"] = bias.astype(np.int32)
    lw.emit({"op": self.ir, **self.attrs(layer), "name": name, "input": t_in, "output": t_acc,
             "weight": f"{name}/weight", "weight_shape": list(w_int.shape),
             "w_bits": g_w["bits"], "bias": f"{name}/bias",
             "input_zero_point": int(g_in["zero_point"][0]), "a_bits": g_in["bits"],
             "input_range": [g_in["qmin"], g_in["qmax"]],
             "input_scale": s_in, "weight_scale": [float(v) for v in s_w], **extra})
    z = g_in["zero_point"][0]
    x_max = max(abs(g_in["qmin"] - z), abs(g_in["qmax"] - z))
    k = int(np.prod(w_int.shape[:-1]))  # products summed per output (conv: kh kw cin/groups)
    bound = float(k * np.max(np.abs(w_int)) * x_max + np.max(np.abs(bias)))
    per_out = np.abs(w_int).reshape(-1, w_int.shape[-1]).sum(axis=0)
    peak = float(np.max(per_out * x_max + np.abs(np.broadcast_to(bias, per_out.shape))))
    lw.accumulator(node.output, name, t_acc, s_in * s_w, bound, peak)


class Dense(Linear):
  name, ir = "dense", "dense"

  def weights(self, layer):
    return layer.linear.kernel.value, layer.linear.bias.value

  def attrs(self, layer):
    return {} if layer.flatten else {"flatten": False}

  def cost(self, node):
    k = node.layer.linear.kernel.value
    b = node.layer.linear.bias.value
    return linear_cost(node, k.shape, k.size + b.size, flatten=node.layer.flatten)


def _conv_attrs(layer) -> dict:
  c = layer.conv
  strides = (c.strides,) * 2 if isinstance(c.strides, int) else tuple(c.strides)
  return {"stride": list(strides), "padding": layer.padding, "groups": int(c.feature_group_count)}


class Conv(Linear):
  name, ir = "conv", "conv2d"

  def weights(self, layer):
    return layer.weights()

  def attrs(self, layer):
    return _conv_attrs(layer)

  def cost(self, node):
    c = node.layer.conv
    return linear_cost(node, c.kernel.value.shape,
                       c.kernel.value.size + (c.bias.value.size if c.use_bias else 0),
                       flatten=False)


class ConvBN(Linear):
  name, ir = "conv_bn", "conv2d"

  def weights(self, layer):
    w, b, _ = layer.folded()
    return w, b

  def attrs(self, layer):
    return _conv_attrs(layer)

  def cost(self, node):
    k = node.layer.conv.kernel.value
    return linear_cost(node, k.shape, k.size, flatten=False)


class LinearIR(IROp):
  """Shared validation and int32 kernel of the IR ops of `Linear` kinds; `apply(op, a, b)` is the
  op itself (a dot or a convolution with int32 accumulation)."""
  conv: bool
  flatten: bool = False  # dense: the input is flattened row-major to [B, -1] first

  def validate(self, op, raw, tensors, need):
    """Bits 2-16; `weight_shape` positive integers ([in, out], or [kh, kw, cin/groups, cout]);
    the stored weights of exactly the dtype and size `pack` writes for that shape and `w_bits`
    (checked before unpacking) and values within `w_bits`; an int32 bias of shape (cout,); the
    input grid (`input_range`, `input_zero_point` on it, `input_scale`), per-channel
    `weight_scale`; conv `stride`, `padding`, `groups`, dense `flatten`."""
    w_bits, a_bits = self.bits(op, "w_bits", need), self.bits(op, "a_bits", need)
    shape = op.get("weight_shape")
    rank = 4 if self.conv else 2
    need(op, "weight_shape", isinstance(shape, list) and len(shape) == rank
         and all(self.is_int(v) and v >= 1 for v in shape),
         ("must be [kh, kw, cin/groups, cout]" if self.conv else "must be [in, out]")
         + f" positive integers{self.got(op, 'weight_shape')}")
    n = math.prod(shape)
    dtype, size = storage(w_bits, n)
    how = (f"packed {8 // (2 if w_bits <= 2 else 4)} per byte" if dtype == np.uint8 else
           "one per element")
    what = (f"{self.article(dtype.name)} tensor of shape ({size},): {n} weights of {w_bits} bits "
            f"({'x'.join(map(str, shape))}), {how}")
    stored = self.tensor(op, "weight", raw, need, dtype, shape=(size,), what=what)
    w = unpack(stored, w_bits, shape)
    lim = 2 ** (w_bits - 1)
    need(op, "weight", w.min() >= -lim and w.max() < lim, f"holds values outside {w_bits} bits")
    cout = shape[-1]
    b = self.tensor(op, "bias", raw, need, np.int32, shape=(cout,))
    qmin, qmax = self.grid_range(op, "input_range", a_bits, need)
    self.integer(op, "input_zero_point", need, qmin, qmax)
    self.scale(op, "input_scale", need)
    self.scales(op, "weight_scale", need, sizes=sorted({1, cout}))
    if self.conv:
      self.integers(op, "stride", need, 2, 1, 2 ** 16)
      need(op, "padding", op.get("padding") in ("SAME", "VALID"),
           f"must be 'SAME' or 'VALID'{self.got(op, 'padding')}")
      groups = self.integer(op, "groups", need, 1, cout)
      need(op, "groups", cout % groups == 0,
           f"must divide the output channels ({cout}){self.got(op, 'groups')}")
    else:
      need(op, "flatten", isinstance(op.get("flatten", True), bool),
           f"must be true or false{self.got(op, 'flatten')}")
    tensors[op["weight"]], tensors[op["bias"]] = w, b

  def value_range(self, op, ranges, need):
    """The input is a grid tensor whose integers lie in `input_range` (the int8 kernel relies on
    it)."""
    r = ranges.get(op["input"])
    need(op, "input", r is not None, f"names {op['input']!r}, which is no integer grid tensor (an "
         "accumulator); requantize it first")
    qmin, qmax = op["input_range"]
    need(op, "input_range", qmin <= r[0] and r[1] <= qmax,
         f"[{qmin}, {qmax}] does not contain the range {list(r)} of its input "
         f"{op['input']!r}")
    return None

  def apply(self, op, a, b):
    raise NotImplementedError

  def kernel(self, op, env, tensors):
    """`sum (x - z_in) w + bias` accumulated in int32.

    When the weights have at most 8 bits and the input grid spans at most 256 values, the operands
    go in as int8 (XLA CPU runs int8 x int8 -> int32 convolutions through oneDNN, about 60x faster
    than int32 ones): `x - z_in = u + off` with `u = x - qmin - 128` in [-128, 127] and
    `off = qmin + 128 - z_in`, so the sum is `sum u w + off * sum_valid w`, the second term the
    same op on a tensor of ones (zero padding included) computed on one example. Exact: every term
    is an integer and the accumulation is int32 either way. Small convolutions get zero output
    channels (see `_SMALL_CHANNELS`)."""
    x, w = env[op["input"]], tensors[op["weight"]]
    if self.flatten and op.get("flatten", True):
      x = x.reshape(x.shape[0], -1)
    z = int(op["input_zero_point"])
    qmin, qmax = op.get("input_range", (None, None))
    if op["w_bits"] <= 8 and qmin is not None and qmax - qmin <= 255:
      w8 = jnp.asarray(w, jnp.int8)
      cout = w8.shape[-1]
      if self.conv and op["groups"] == 1 and max(w8.shape[-2], cout) <= _SMALL_CHANNELS:
        w8 = jnp.pad(w8, ((0, 0),) * 3 + ((0, _PADDED_CHANNELS - cout),))
      acc = self.apply(op, (x - jnp.int32(qmin + 128)).astype(jnp.int8), w8)
      off = qmin + 128 - z
      if off:
        acc = acc + jnp.int32(off) * self.apply(op, jnp.ones((1, *x.shape[1:]), jnp.int8), w8)
      acc = acc[..., :cout]
    else:
      acc = self.apply(op, x - jnp.int32(z), jnp.asarray(w, jnp.int32))
    return acc + jnp.asarray(tensors[op["bias"]], jnp.int32)

  # -- the tflite target
  def tflite_layout(self, op, w_int, w, kind):
    """(weights in the layout of TFLite op `kind`, their quantized dimension, the op's options
    given the fused activation): per op kind."""
    raise NotImplementedError

  def tflite_input(self, op, w) -> str:
    """The IR tensor whose .tflite tensor the op reads (dense: flattened first)."""
    return op["input"]

  def tflite(self, op, w):
    """The TFLite op with int8 (INT4, INT2: `weight_dtype`) weights (per-channel scales), the int32
    bias at scale `f32(s_in) f32(s_w,c)`, and the consuming requantization fused: its output grid
    and clamp (as a fused activation). In 16x8 mode (an input or output grid over 8 bits:
    `tflite_target.sixteen_bit`) int16 input and output (converted from and to int8 around it
    where a side is 8-bit, exactly), int8 weights and an int64 bias. LiteRT derives the
    multipliers from these float32 scales, as the manifest's (`tflite_target.requantizer`)."""
    r = w.requantize_of(op)
    wide = not w.float and w.sixteen_bit(op, r["bits"])
    kind = self.tflite_op_16x8(op) if wide else self.tflite_op(op)
    if kind is None:
      w.fail(op, "grouped convolutions other than depthwise (groups = input channels, one filter "
             "each) have no TFLite op")
    if op["w_bits"] > 8:
      w.fail(op, f"weights of {op['w_bits']} bits do not fit int8; the tflite target takes at "
             "most 8-bit weights")
    x, off = (w.as_int16 if wide else w.grid)(op, self.tflite_input(op, w))
    w_int = np.asarray(w.tensors[op["weight"]])
    cout = w_int.shape[-1]
    s_w = np.asarray(op["weight_scale"], np.float32)
    s_in = np.float32(op["input_scale"])
    weights, qdim, options = self.tflite_layout(op, w_int, w, kind)
    b = w.builder
    bias_scale = (s_in * s_w).astype(np.float32)
    if w.float:  # the float twin: dequantized weights and bias
      per = [-1 if i == qdim else 1 for i in range(weights.ndim)]
      wt = b.add_tensor(f"{op['name']}/weight", weights.shape, "float32",
                        data=weights * np.broadcast_to(s_w, (cout,)).reshape(per))
      bt = b.add_tensor(f"{op['name']}/bias", [cout], "float32",
                        data=np.asarray(w.tensors[op["bias"]]) * bias_scale)
      y, act = w.fused_output(r)
      b.add_operator(kind, [x, wt, bt], [y], options(act))
      return
    wt = b.add_tensor(f"{op['name']}/weight", weights.shape,
                      "int8" if wide else w.weight_dtype(op), data=weights,
                      scale=s_w, zero_point=0, quantized_dimension=qdim)
    # 16x8 mode: int64 bias (the int32 one is misread by the reference kernels, measured)
    bt = b.add_tensor(f"{op['name']}/bias", [cout], "int64" if wide else "int32",
                      data=w.tensors[op["bias"]], scale=bias_scale, zero_point=0)
    y, act = w.fused_output(r, wide=wide)
    if op["input_zero_point"] + off != b.tensors[x].quantization.zeroPoint[0]:
      w.fail(op, "its input zero point differs from its input tensor's")
    if kind == self.tflite_op(op):
      b.add_operator(kind, [x, wt, bt], [y], options(act))
    else:  # a dense layer as a 1x1 CONV_2D on [-1, 1, 1, K] (`DenseIR.tflite_op_16x8`)
      x4, y4 = w.like(x, [1, 1, weights.shape[-1]]), w.like(y, [1, 1, cout])
      w.reshape(x, x4)
      b.add_operator(kind, [x4, wt, bt], [y4], options(act))
      w.reshape(y4, y)
    w.finish_output(r["output"])


  # -- the onnx target
  def onnx_requantizer(self, op, s_out, out):
    """QLinearConv / QGemm (`mpq.export.ort_rules`): rule `float32_even` with ORT's per-channel
    float32 scale `f32(f32(f32(s_in) f32(s_w,c)) / f32(s_out))`."""
    f32 = np.float32
    s_w = np.asarray(op["weight_scale"], f32).reshape(-1)
    scale = (f32(op["input_scale"]) * s_w).astype(f32) / f32(s_out)
    return "float32_even", {"scale": np.asarray(scale, f32).reshape(-1)}

  def onnx_node(self, op, w, x, xq, w_int, wq, bias, yq, y) -> None:
    """Emits the QLinear node (per op kind)."""
    raise NotImplementedError

  def onnx(self, op, w):
    """The QLinear op with uint8 weights (any bits up to 8, stored as `w + 128` with zero point
    128 in every channel: QLinearConv and QGemm take no INT4), per-channel float32 weight scales,
    the int32 bias, and the consuming requantization's grid as its output (then a Clip where that
    grid is narrower than uint8).

    Why uint8 and not int8 weights: on x86 CPUs without VNNI, MLAS runs uint8 x int8 products
    with VPMADDUBSW, whose int16 sums of adjacent product pairs saturate (255 * 127 * 2 > 2^15):
    measured on AVX-512BW without VNNI, 1647 of 2048 QGemm outputs wrong with full-range int8
    weights. Its uint8 x uint8 kernels widen to int16 before multiplying and are exact on every
    CPU; `(x - z_x)(w + 128 - 128)` is the same integer."""
    if op["w_bits"] > 8:
      w.fail(op, f"weights of {op['w_bits']} bits do not fit int8; the onnx target takes at most "
             "8-bit weights")
    r = w.requantize_of(op)
    x, _ = w.grid(op, op["input"])
    w.check_zero_point(op, op["input"], op["input_zero_point"])
    w_int = np.asarray(w.tensors[op["weight"]], np.int64) + WEIGHT_OFFSET  # uint8 storage
    cout = w_int.shape[-1]
    b, name = w.builder, op["name"]
    wq = (b.const(f"{name}/weight_scale", np.broadcast_to(
        np.asarray(op["weight_scale"], np.float32).reshape(-1), (cout,))),
          b.const(f"{name}/weight_zero_point", np.full(cout, WEIGHT_OFFSET, np.uint8), "uint8"))
    bias = b.const(f"{name}/bias", w.tensors[op["bias"]], "int32")
    y, ys, yz = w.output_of(r)
    self.onnx_node(op, w, x, w.qparams[op["input"]], w_int, wq, bias, (ys, yz), y)
    w.clamp(r["output"])


class DenseIR(LinearIR):
  name, conv, flatten = "dense", False, True

  def apply(self, op, a, b):
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)

  def tflite_op(self, op):
    return "FULLY_CONNECTED"

  def tflite_op_16x8(self, op):
    """A 1x1 CONV_2D: LiteRT's 16x8 FULLY_CONNECTED rescales its int64 accumulator in double
    precision (`litert_rules.round_double`), which mpq's int32 executor does not emulate; its
    16x8 CONV_2D has the 16-bit fixed point that rule `exact` emulates (`litert_rules.
    mbqm64_reduced`), and on a [-1, 1, 1, K] input computes the same sums."""
    return "CONV_2D"

  def tflite_input(self, op, w) -> str:
    """A flattening dense layer on a [B, ...] input: RESHAPE to [-1, features] first (row-major,
    as the executor flattens)."""
    shape = w.shapes[op["input"]]
    if not op.get("flatten", True) or len(shape) == 2:
      return op["input"]
    k = math.prod(shape[1:])
    name = f"{op['input']}/flat"
    if name in w.ids:
      return name
    x, _ = w.grid(op, op["input"])
    w.shapes[name] = (shape[0], k)
    y = w.alias(name, op["input"])
    new_shape = w.builder.add_tensor(f"{name}/shape", [2], "int32",
                                     data=np.asarray([-1, k], np.int32))
    w.builder.add_operator("RESHAPE", [x, new_shape], [y],
                           w.builder.options("ReshapeOptions", newShape=[-1, k]))
    return name

  def tflite_layout(self, op, w_int, w, kind):
    if kind == "CONV_2D":  # 1x1, OHWI
      return w_int.T.reshape(w_int.shape[1], 1, 1, w_int.shape[0]), 0, lambda act: \
          w.builder.options("Conv2DOptions", fusedActivationFunction=act, padding="VALID",
                            strideH=1, strideW=1, dilationHFactor=1, dilationWFactor=1)
    keep = not op.get("flatten", True) and len(w.shapes[op["input"]]) > 2
    return w_int.T, 0, lambda act: w.builder.options(
        "FullyConnectedOptions", fusedActivationFunction=act, keepNumDims=keep)


  def onnx_node(self, op, w, x, xq, w_int, wq, bias, yq, y):
    """com.microsoft QGemm (uint8 A, uint8 B per column, int32 bias C). A flattening layer on an
    NCHW tensor flattens it with Flatten, in C, H, W order: its weight rows, in the executor's
    (NHWC) H, W, C order, are permuted to match."""
    shape = w.shapes[op["input"]]
    b = w.builder
    if len(shape) == 4:
      if not op.get("flatten", True):
        w.fail(op, "a dense layer applied per position of a 4-d tensor has no onnx lowering")
      _, h, wd, c = shape
      w_int = w_int.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(h * wd * c, -1)
      x = b.node("Flatten", [x], [f"{x}/flat"], axis=1)
    elif len(shape) != 2:
      w.fail(op, f"a dense layer on a {len(shape)}-d input has no onnx lowering")
    wt = b.const(f"{op['name']}/weight", w_int, "uint8")
    b.node("QGemm", [x, *xq, wt, *wq, bias, *yq], [y])


class Conv2dIR(LinearIR):
  name, conv = "conv2d", True

  def apply(self, op, a, b):
    return jax.lax.conv_general_dilated(
        a, b, tuple(op["stride"]), op["padding"], feature_group_count=op["groups"],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32)

  def tflite_op(self, op):
    kh, kw, cin_g, cout = op["weight_shape"]
    if op["groups"] == 1:
      return "CONV_2D"
    if cin_g == 1 and op["groups"] == cout:
      return "DEPTHWISE_CONV_2D"
    return None

  def tflite_layout(self, op, w_int, w, kind):
    """CONV_2D: [cout, kh, kw, cin] (OHWI), per-channel on axis 0; DEPTHWISE_CONV_2D: [1, kh,
    kw, cout], per-channel on axis 3, one filter per input channel."""
    sh, sw = op["stride"]
    common = {"padding": op["padding"], "strideH": sh, "strideW": sw,
              "dilationHFactor": 1, "dilationWFactor": 1}
    if self.tflite_op(op) == "CONV_2D":
      return w_int.transpose(3, 0, 1, 2), 0, lambda act: w.builder.options(
          "Conv2DOptions", fusedActivationFunction=act, **common)
    return w_int.transpose(2, 0, 1, 3), 3, lambda act: w.builder.options(
        "DepthwiseConv2DOptions", fusedActivationFunction=act, depthMultiplier=1, **common)


  def onnx_node(self, op, w, x, xq, w_int, wq, bias, yq, y):
    """QLinearConv (OIHW weights, `group` groups: depthwise when it equals the channels), with
    TensorFlow's SAME padding written as explicit pads (ORT pads with the input zero point)."""
    kh, kw, _, _ = op["weight_shape"]
    _, h, wd, _ = w.shapes[op["input"]]
    pads = [0, 0, 0, 0]
    if op["padding"] == "SAME":
      for i, (n, k, s) in enumerate(zip((h, wd), (kh, kw), op["stride"])):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads[i], pads[i + 2] = total // 2, total - total // 2
    b = w.builder
    wt = b.const(f"{op['name']}/weight", w_int.transpose(3, 2, 0, 1), "uint8")
    b.node("QLinearConv", [x, *xq, wt, *wq, *yq, bias], [y], kernel_shape=[kh, kw],
           strides=list(op["stride"]), pads=pads, group=op["groups"], dilations=[1, 1])


register(Dense(), Conv(), ConvBN(), DenseIR(), Conv2dIR())
