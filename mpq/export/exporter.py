"""Exporter and manifest validation for the `mpq-int` format (see `mpq.export`)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq import models
from mpq.errors import UserError
from mpq.intexec.fixedpoint import quantize_multipliers, requant_multiplier
from mpq.layers import record_graph
from mpq.quant import core

FORMAT, VERSION = "mpq-int", 1
OP_KINDS = ("quantize", "conv2d", "dense", "requantize", "add", "clamp", "shift", "max_pool",
            "sum_pool", "dequantize")


class ExportError(UserError):
  """The model or manifest cannot be exported / loaded; the message names the op and field."""


# ------------------------------------------------------------------------------------------ packing
def _field(bits: int) -> int:
  return 2 if bits <= 2 else 4 if bits <= 4 else 8 if bits <= 8 else 16 if bits <= 16 else 32


def pack(values: np.ndarray, bits: int) -> np.ndarray:
  """Signed integers of `bits` bits -> storage. Fields of 2 bits (bits <= 2) or 4 bits (3-4 bits)
  are packed into uint8, element i at byte i // (8 / field), bit offset (i % (8 / field)) * field,
  lowest bits first, two's complement within the field; 5-8 bits are int8, 9-16 bits int16."""
  v = np.asarray(values, np.int64).ravel()
  f = _field(bits)
  if f >= 8:
    return v.astype({8: np.int8, 16: np.int16, 32: np.int32}[f])
  per = 8 // f
  pad = (-len(v)) % per
  u = (np.concatenate([v, np.zeros(pad, np.int64)]) & ((1 << f) - 1)).reshape(-1, per)
  return np.sum(u << (np.arange(per) * f), axis=1).astype(np.uint8)


def unpack(stored: np.ndarray, bits: int, shape) -> np.ndarray:
  """The inverse of `pack`: int32 array of `shape`."""
  n = int(np.prod(shape))
  f = _field(bits)
  if f >= 8:
    return np.asarray(stored, np.int32).reshape(shape)
  per = 8 // f
  u = (np.asarray(stored, np.int64)[:, None] >> (np.arange(per) * f)) & ((1 << f) - 1)
  u = u.ravel()[:n]
  return np.where(u >= (1 << (f - 1)), u - (1 << f), u).astype(np.int32).reshape(shape)


# ------------------------------------------------------------------------------------------- grids
def grid(q, tensor=None) -> dict:
  """The integer grid a quantizer evaluates on (`Quantizer.integer_grid`) in NumPy: scale, zero
  point, bits, signed, qmin, qmax."""
  g = q.integer_grid(tensor)
  if g is None:
    raise ExportError(f"{q.name}/{q.role} does not evaluate on an integer grid (estimator "
                      f"{q.method.name!r}{', bypassed' if q.bypass else ''}); integer export needs "
                      "every dense/conv layer quantized with ste, lsq, noise, tqt or dbits")
  bits = int(g["bits"])
  qmin, qmax = (int(v) for v in core.qrange(bits, g["signed"], g["narrow"]))
  return {"scale": np.asarray(g["scale"], np.float64).reshape(-1),
          "zero_point": np.asarray(g["zero_point"]).reshape(-1), "bits": bits,
          "signed": g["signed"], "qmin": qmin, "qmax": qmax}


# --------------------------------------------------------------------------------------- exporting
def _capture(model, image_shape):
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  holder = {}

  def fwd(s, x):
    holder["x"] = x
    y = nnx.merge(graphdef, s)(x, train=False)
    holder["y"] = y
    return y

  with record_graph() as ops:
    jax.eval_shape(fwd, state, x)
  return ops, holder


def export(model: nnx.Module, image_shape, out_dir: str, meta: dict | None = None) -> dict:
  """Writes `out_dir/manifest.json` and `out_dir/weights.npz`; returns the manifest. `meta`
  (e.g. dataset, model, source checkpoint) is stored under "source"."""
  lowering = _Lowering(model, image_shape)
  manifest = lowering.run(meta)
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, "weights.npz"), **lowering.tensors)
  tmp = os.path.join(out_dir, "manifest.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, "manifest.json"))
  return manifest


class _Lowering:
  """Walks the recorded graph once. Every dense/conv/add output is an int32 accumulator with a real
  scale per channel ("acc" nodes); ReLU/ReLU6/pooling between an accumulator and the next
  quantizer are "transforms", lowered when a quantizer consumes the tensor (`_to_grid`)."""

  def __init__(self, model, image_shape):
    self.table = models.layer_table(model)
    self.image_shape = image_shape
    self.recorded, holder = _capture(model, image_shape)
    self.x, self.y = holder["x"], holder["y"]
    self.producer = {id(self.x): ("input",)}
    self.ops, self.tensors, self.input_spec, self._n = [], {}, None, 0

  def _new(self):
    self._n += 1
    return f"t{self._n}"

  def _chain(self, t):
    """(source node, [transforms from the source to t]) for a recorded tensor."""
    transforms = []
    while True:
      node = self.producer.get(id(t))
      if node is None:
        raise ExportError("an op between two layers was not recorded (use mpq.layers.relu/relu6 "
                          "and factory layers only)")
      if node[0] in ("input", "acc"):
        return node, transforms[::-1]
      transforms.append(node)
      t = node[1]

  def _to_grid(self, t, q, consumer: str) -> tuple[str, dict]:
    """Emits the ops that bring recorded tensor `t` onto quantizer `q`'s integer grid; returns the
    integer tensor's name and the grid."""
    g = grid(q)
    source, transforms = self._chain(t)
    if source[0] == "input":
      if transforms:
        raise ExportError(f"{consumer}: an op between the model input and the first layer cannot "
                          "be lowered")
      if self.input_spec is not None:
        raise ExportError(f"{consumer}: the model input feeds more than one quantized layer")
      t_in = self._new()
      self.input_spec = {"tensor": t_in, "shape": list(self.image_shape),
                         "scale": float(g["scale"][0]), "zero_point": int(g["zero_point"][0]),
                         "qmin": g["qmin"], "qmax": g["qmax"], "bits": g["bits"]}
      self.ops.append({"op": "quantize", "name": f"{consumer}/input", "input": "input",
                       "output": t_in, **{k: self.input_spec[k] for k in
                                          ("scale", "zero_point", "qmin", "qmax", "bits")}})
      return t_in, g
    src = source[1]
    acc, scale, bound = src["acc"], np.asarray(src["scale"], np.float64), src["bound"]
    # Transforms up to the last average pool run on the accumulator (pooling is linear, ReLU is
    # not: it must come first); the rest fold into the requantization clamp, then max pooling.
    pools = [i for i, tr in enumerate(transforms) if tr[0] == "avg_pool"]
    split = pools[-1] + 1 if pools else 0
    for tr in transforms[:split]:
      out = self._new()
      if tr[0] in ("relu", "relu6"):
        op = {"op": "clamp", "name": f"{src['name']}/{tr[0]}", "input": acc, "output": out,
              "lo": 0, "hi": 2 ** 31 - 1}
        if tr[0] == "relu6":
          hi = np.minimum(core.round_half_up(6.0 / scale), 2 ** 31 - 1).astype(np.int32)
          op["hi"] = f"{src['name']}/relu6_hi"
          self.tensors[op["hi"]] = np.broadcast_to(hi, scale.shape).copy()
      elif tr[0] == "max_pool":
        op = {"op": "max_pool", "name": f"{src['name']}/max_pool", "input": acc, "output": out,
              "window": int(tr[2])}
      else:
        # the sum of n accumulators must fit int32: shift right first where the bound says so
        k = math.ceil(math.log2(bound * tr[2] / (2 ** 31 - 1))) if bound * tr[2] >= 2 ** 31 else 0
        if k:
          self.ops.append({"op": "shift", "name": f"{src['name']}/shift", "input": acc,
                           "output": out, "right": k})
          acc, out, scale, bound = out, self._new(), scale * 2 ** k, bound / 2 ** k + 1
        op = {"op": "sum_pool", "name": f"{src['name']}/sum_pool", "input": acc, "output": out}
        scale, bound = scale / tr[2], bound * tr[2]  # mean = sum / (H W): 1 / (H W) joins M
      self.ops.append(op)
      acc = out
    lo, hi = g["qmin"], g["qmax"]
    z_out = int(g["zero_point"][0])
    s_out = float(g["scale"][0])
    for tr in transforms[split:]:
      if tr[0] in ("relu", "relu6"):
        lo = max(lo, z_out)
      if tr[0] == "relu6":
        hi = min(hi, int(core.round_half_up(6.0 / s_out)) + z_out)
    key = f"{src['name']}->{consumer}"
    m0, shift = quantize_multipliers(scale / s_out, out_max=max(abs(lo - z_out), abs(hi - z_out)) + 1)
    self.tensors[f"{key}/multiplier"], self.tensors[f"{key}/shift"] = m0, shift
    t_in = self._new()
    self.ops.append({"op": "requantize", "name": key, "input": acc, "output": t_in,
                     "multiplier": f"{key}/multiplier", "shift": f"{key}/shift",
                     "zero_point": z_out, "clamp": [lo, hi], "bits": g["bits"]})
    for tr in transforms[split:]:
      if tr[0] == "max_pool":
        out = self._new()
        self.ops.append({"op": "max_pool", "name": f"{consumer}/pool", "input": t_in, "output": out,
                         "window": int(tr[2])})
        t_in = out
    return t_in, g

  def _layer(self, name, layer, inputs, output):
    from mpq.quant.layers import QuantConvBN, integer_form  # pylint: disable=g-import-not-at-top
    t_in, g_in = self._to_grid(inputs[0], layer.aq, name)
    if isinstance(layer, QuantConvBN):
      w, b, _ = layer.folded()
      c = layer.conv
      strides = (c.strides,) * 2 if isinstance(c.strides, int) else tuple(c.strides)
      extra = {"op": "conv2d", "stride": list(strides), "padding": "SAME",
               "groups": int(c.feature_group_count)}
    else:
      w, b = layer.linear.kernel.value, layer.linear.bias.value
      extra = {"op": "dense"}
    g_w = grid(layer.wq, w)  # raises unless both grids exist (the input's: in `_to_grid`)
    _, _, w_int, bias = integer_form(layer.aq, layer.wq, w, layer.wq(w), b)
    w_int, bias = np.asarray(w_int, np.int64), np.asarray(bias, np.float64)
    if np.any(np.abs(bias) > 2 ** 31 - 1):
      raise ExportError(f"layer {name!r}: bias does not fit int32 at scale s_in * s_w")
    s_in, s_w = float(g_in["scale"][0]), g_w["scale"]
    t_acc = self._new()
    self.tensors[f"{name}/weight"] = pack(w_int, g_w["bits"])
    self.tensors[f"{name}/bias"] = bias.astype(np.int32)
    self.ops.append({**extra, "name": name, "input": t_in, "output": t_acc,
                     "weight": f"{name}/weight", "weight_shape": list(w_int.shape),
                     "w_bits": g_w["bits"], "bias": f"{name}/bias",
                     "input_zero_point": int(g_in["zero_point"][0]), "a_bits": g_in["bits"],
                     "input_range": [g_in["qmin"], g_in["qmax"]],
                     "input_scale": s_in, "weight_scale": [float(v) for v in s_w]})
    x_max = max(abs(g_in["qmin"] - g_in["zero_point"][0]), abs(g_in["qmax"] - g_in["zero_point"][0]))
    k = int(np.prod(w_int.shape[:-1]))  # products summed per output (conv: kh kw cin/groups)
    bound = float(k * np.max(np.abs(w_int)) * x_max + np.max(np.abs(bias)))
    self.producer[id(output)] = ("acc", {"name": name, "acc": t_acc, "scale": s_in * s_w,
                                         "bound": bound})

  def _add(self, name, layer, inputs, output):
    """`y = s_a q_a + s_b q_b` as TFLite's ADD does it: both inputs shifted left by `L` and
    rescaled to the common scale `2 max(s_a, s_b) / 2^L`, then summed in int32."""
    ins = [self._to_grid(t, q, f"{name}/{k}") for t, q, k in
           zip(inputs, (layer.aq_a, layer.aq_b), ("a", "b"))]
    scales = [float(g["scale"][0]) for _, g in ins]
    s_max = max(scales)
    left = 31 - max(g["bits"] for _, g in ins)  # |q| << left stays below 2^30
    s_acc = 2 * s_max / 2 ** left
    mults = [requant_multiplier(s / (2 * s_max), 2.0 ** 30) for s in scales]
    t_acc = self._new()
    self.ops.append({"op": "add", "name": name, "inputs": [t for t, _ in ins], "output": t_acc,
                     "left_shift": left, "multipliers": [m for m, _ in mults],
                     "shifts": [s for _, s in mults],
                     "input_zero_points": [int(g["zero_point"][0]) for _, g in ins],
                     "input_scales": scales, "a_bits": [g["bits"] for _, g in ins],
                     "quantizers": [layer.aq_a.name, layer.aq_b.name]})
    self.producer[id(output)] = ("acc", {"name": name, "acc": t_acc, "scale": np.asarray([s_acc]),
                                         "bound": 2.0 ** 31 - 1})

  def run(self, meta) -> dict:
    from mpq.quant.layers import QuantAdd, QuantConvBN, QuantDense  # pylint: disable=g-import-not-at-top
    for kind, name, inputs, output in self.recorded:
      if kind in ("relu", "relu6"):
        self.producer[id(output)] = (kind, inputs[0])
      elif kind == "max_pool":
        self.producer[id(output)] = ("max_pool", inputs[0], self.table[name].window)
      elif kind == "avg_pool":
        self.producer[id(output)] = ("avg_pool", inputs[0],
                                     int(inputs[0].shape[1]) * int(inputs[0].shape[2]))
      elif kind in ("conv_bn", "dense", "add"):
        layer = self.table[name]
        if not isinstance(layer, (QuantConvBN, QuantDense, QuantAdd)):
          raise ExportError(f"layer {name!r} is not quantized; export a quantized (QAT or PTQ) "
                            "model")
        (self._add if kind == "add" else self._layer)(name, layer, inputs, output)
      else:
        raise ExportError(f"op {name!r} of kind {kind!r} is not supported by the {FORMAT} "
                          f"v{VERSION} exporter (supported: conv, dense, add, ReLU/ReLU6, max and "
                          "global average pooling)")
    final = self.producer.get(id(self.y))
    if final is None or final[0] != "acc":
      raise ExportError("the model output must be a dense/conv layer's output (logits)")
    src = final[1]
    self.ops.append({"op": "dequantize", "name": f"{src['name']}/output", "input": src["acc"],
                     "output": "logits", "scale": [float(v) for v in np.ravel(src["scale"])]})
    return {"format": FORMAT, "version": VERSION, "input": self.input_spec, "output": "logits",
            "num_classes": int(self.y.shape[-1]), "source": meta or {}, "ops": self.ops}


# ----------------------------------------------------------------------------------------- loading
def _need(op, field, cond, what):
  if not cond:
    raise ExportError(f"manifest op {op.get('name', '?')!r} ({op.get('op', '?')}): field {field!r} "
                      f"{what}")


def load(model_dir: str) -> tuple[dict, dict]:
  """Reads and validates an exported model; returns (manifest, {name: unpacked int32 array})."""
  path = os.path.join(model_dir, "manifest.json")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
    raw = dict(np.load(os.path.join(model_dir, "weights.npz")))
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read the exported model in {model_dir}: {e}") from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ExportError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}"
                      f" is not {FORMAT!r} version {VERSION}")
  tensors = {}
  for op in manifest.get("ops", []):
    kind = op.get("op")
    _need(op, "op", kind in OP_KINDS, f"must be one of {OP_KINDS}")
    if kind in ("conv2d", "dense"):
      _need(op, "w_bits", isinstance(op.get("w_bits"), int) and 2 <= op["w_bits"] <= 16,
            "must be an integer from 2 to 16")
      _need(op, "a_bits", isinstance(op.get("a_bits"), int) and 2 <= op["a_bits"] <= 16,
            "must be an integer from 2 to 16")
      _need(op, "weight", op.get("weight") in raw, "names no tensor in weights.npz")
      _need(op, "bias", op.get("bias") in raw, "names no tensor in weights.npz")
      shape = op.get("weight_shape")
      w = unpack(raw[op["weight"]], op["w_bits"], shape)
      lim = 2 ** (op["w_bits"] - 1)
      _need(op, "weight", w.min() >= -lim and w.max() < lim, f"holds values outside {op['w_bits']} bits")
      b = raw[op["bias"]]
      _need(op, "bias", b.dtype == np.int32 and b.shape == (shape[-1],),
            f"must be int32 of shape ({shape[-1]},)")
      rng = op.get("input_range")
      _need(op, "input_range", isinstance(rng, list) and len(rng) == 2
            and all(isinstance(v, int) for v in rng) and rng[0] < rng[1]
            and rng[1] - rng[0] < 2 ** op["a_bits"], f"must be [qmin, qmax] of an {op['a_bits']}-bit grid")
      if kind == "conv2d":
        _need(op, "weight_shape", len(shape) == 4, "must be [kh, kw, cin/groups, cout]")
      else:
        _need(op, "weight_shape", len(shape) == 2, "must be [in, out]")
      tensors[op["weight"]], tensors[op["bias"]] = w, b
    if kind == "requantize":
      for field in ("multiplier", "shift"):
        _need(op, field, op.get(field) in raw, "names no tensor in weights.npz")
      m0, sh = raw[op["multiplier"]], raw[op["shift"]]
      _need(op, "multiplier", m0.dtype == np.int32 and np.all(m0 >= 0), "must be int32 >= 0")
      _need(op, "shift", np.all((sh >= -31) & (sh <= 30)), "must lie in [-31, 30]")
      lo, hi = op.get("clamp", [None, None])
      _need(op, "clamp", isinstance(lo, int) and isinstance(hi, int) and lo <= hi,
            "must be [lo, hi] integers with lo <= hi")
      tensors[op["multiplier"]], tensors[op["shift"]] = m0, sh
    if kind == "add":
      _need(op, "inputs", isinstance(op.get("inputs"), list) and len(op["inputs"]) == 2,
            "must list two tensors")
      _need(op, "left_shift", isinstance(op.get("left_shift"), int) and 0 <= op["left_shift"] <= 30,
            "must be an integer in [0, 30]")
      for field, ok, what in (("multipliers", lambda v: 0 <= v <= 2 ** 31 - 1, "int32 >= 0"),
                              ("shifts", lambda v: -31 <= v <= 30, "in [-31, 30]"),
                              ("input_zero_points", lambda v: True, "integers")):
        vals = op.get(field)
        _need(op, field, isinstance(vals, list) and len(vals) == 2
              and all(isinstance(v, int) and ok(v) for v in vals), f"must be two {what}")
    if kind == "shift":
      _need(op, "right", isinstance(op.get("right"), int) and 0 <= op["right"] <= 31,
            "must be an integer in [0, 31]")
    if kind == "clamp":
      lo, hi = op.get("lo"), op.get("hi")
      if isinstance(hi, str):
        _need(op, "hi", hi in raw and raw[hi].dtype == np.int32, "names no int32 tensor")
        tensors[hi] = raw[hi]
        hi = int(raw[hi].min())
      _need(op, "lo", isinstance(lo, int) and isinstance(hi, int) and lo <= hi,
            "must be an integer <= hi")
  defined = {"input"}
  for op in manifest.get("ops", []):
    for t in op.get("inputs", [op.get("input")]):
      _need(op, "input", t in defined, f"names tensor {t!r}, which no earlier op produces")
    defined.add(op.get("output"))
  return manifest, tensors
