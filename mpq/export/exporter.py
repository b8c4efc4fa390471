"""Exporter and manifest validation for the `mpq-int` format (see `mpq.export`)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq import models
from mpq.errors import UserError
from mpq.intexec.fixedpoint import quantize_multipliers
from mpq.layers import record_graph
from mpq.quant import core
from mpq.quant import estimators as est
from mpq.quant import quantizer as qz

FORMAT, VERSION = "mpq-int", 1
OP_KINDS = ("quantize", "conv2d", "dense", "requantize", "max_pool", "dequantize")


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
  """The integer grid a quantizer evaluates on: scale, zero point, bits, signed, qmin, qmax."""
  if q.estimator == "none" or q.bypass:
    raise ExportError(f"{q.name}/{q.role} is not quantized (estimator 'none'); integer export "
                      "needs every dense/conv layer quantized")
  bits = int(q.int_bits())
  e = q.estimator
  if e == "ste" and q.role == "weight":
    w = np.asarray(tensor)
    amax = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)))
    scale, zp = np.asarray(core.symmetric_scale(amax, bits)), np.zeros_like(amax)
    signed, narrow = True, True
  elif e == "ste":
    s, z = core.affine_params(q.lo.value, q.hi.value, bits)
    scale, zp, signed, narrow = np.asarray(s), np.asarray(z), False, False
  elif e in ("lsq", "noise") or (e == "lsq+" and not hasattr(q, "offset")):
    scale, zp, signed, narrow = np.asarray(qz._positive(q.step_size.value)), 0.0, q.signed, False
  elif e == "tqt":
    scale, zp, signed, narrow = np.asarray(est.tqt_scale(q.log2_t.value, bits, q.signed)), 0.0, \
        q.signed, False
  elif e == "dbits":
    _, p = core.qrange(bits, q.signed, narrow=q.signed)
    scale, zp, signed, narrow = np.asarray(qz._positive(q.amax.value) / p), 0.0, q.signed, q.signed
  else:
    raise ExportError(f"{q.name}/{q.role}: estimator {e!r} (a learned offset) has no integer grid")
  qmin, qmax = (float(v) for v in core.qrange(bits, signed, narrow))
  return {"scale": np.asarray(scale, np.float64).reshape(-1), "zero_point": np.asarray(zp).reshape(-1),
          "bits": bits, "signed": bool(signed), "qmin": int(qmin), "qmax": int(qmax)}


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
  from mpq.quant.layers import QuantConvBN, QuantDense  # pylint: disable=g-import-not-at-top
  table = models.layer_table(model)
  ops, holder = _capture(model, image_shape)
  producer = {id(holder["x"]): ("input",)}
  out_ops, tensors, n_t = [], {}, [0]

  def new_tensor():
    n_t[0] += 1
    return f"t{n_t[0]}"

  def chain(t):
    """(source, [transforms]) for a recorded tensor: the producing layer or the input."""
    transforms = []
    while True:
      node = producer.get(id(t))
      if node is None:
        raise ExportError("an op between two layers was not recorded (use mpq.layers.relu/relu6 "
                          "and factory layers only)")
      if node[0] in ("input", "acc"):
        return node, transforms[::-1]
      transforms.append(node)
      t = node[1]

  input_spec = None
  for kind, name, inputs, output in ops:
    if kind in ("relu", "relu6"):
      producer[id(output)] = (kind, inputs[0])
      continue
    if kind == "max_pool":
      producer[id(output)] = ("max_pool", inputs[0], table[name].window)
      continue
    if kind not in ("conv_bn", "dense"):
      raise ExportError(f"op {name!r} of kind {kind!r} is not supported by the {FORMAT} "
                        f"v{VERSION} exporter (supported: conv, dense, ReLU/ReLU6, max pooling)")
    layer = table[name]
    if not isinstance(layer, (QuantConvBN, QuantDense)):
      raise ExportError(f"layer {name!r} is not quantized; export a quantized (QAT or PTQ) model")
    g_in = grid(layer.aq)
    source, transforms = chain(inputs[0])
    if source[0] == "input":
      t_in = new_tensor()
      input_spec = {"tensor": t_in, "shape": list(image_shape), "scale": float(g_in["scale"][0]),
                    "zero_point": int(g_in["zero_point"][0]), "qmin": g_in["qmin"],
                    "qmax": g_in["qmax"], "bits": g_in["bits"]}
      out_ops.append({"op": "quantize", "name": f"{name}/input", "input": "input",
                      "output": t_in, **{k: input_spec[k] for k in ("scale", "zero_point", "qmin",
                                                                     "qmax", "bits")}})
    else:
      src = source[1]
      lo, hi = g_in["qmin"], g_in["qmax"]
      z_out = int(g_in["zero_point"][0])
      for tr in transforms:
        if tr[0] == "relu":
          lo = max(lo, z_out)
        elif tr[0] == "relu6":
          lo = max(lo, z_out)
          hi = min(hi, int(round(6.0 / float(g_in["scale"][0]))) + z_out)
      m = src["s_in"] * src["s_w"] / float(g_in["scale"][0])
      m0, shift = quantize_multipliers(m)
      t_in = new_tensor()
      tensors[f"{src['name']}->{name}/multiplier"] = m0
      tensors[f"{src['name']}->{name}/shift"] = shift
      out_ops.append({"op": "requantize", "name": f"{src['name']}->{name}", "input": src["acc"],
                      "output": t_in, "multiplier": f"{src['name']}->{name}/multiplier",
                      "shift": f"{src['name']}->{name}/shift", "zero_point": z_out,
                      "clamp": [lo, hi], "bits": g_in["bits"]})
      for tr in transforms:
        if tr[0] == "max_pool":
          t2 = new_tensor()
          out_ops.append({"op": "max_pool", "name": f"{name}/pool", "input": t_in, "output": t2,
                          "window": int(tr[2])})
          t_in = t2
    # the layer itself
    if isinstance(layer, QuantConvBN):
      w, b, _ = layer.folded()
      c = layer.conv
      strides = (c.strides,) * 2 if isinstance(c.strides, int) else tuple(c.strides)
      extra = {"op": "conv2d", "stride": list(strides), "padding": "SAME",
               "groups": int(c.feature_group_count)}
    else:
      w, b = layer.linear.kernel.value, layer.linear.bias.value
      extra = {"op": "dense"}
    g_w = grid(layer.wq, w)
    w_int = np.asarray(core.quantize(w, g_w["scale"], 0, g_w["bits"], True,
                                     narrow=g_w["qmin"] == -g_w["qmax"]))
    s_in = float(g_in["scale"][0])
    s_w = g_w["scale"]
    bias = np.asarray(np.round(np.asarray(b, np.float64) / (s_in * s_w)), np.int64)
    if np.any(np.abs(bias) > 2 ** 31 - 1):
      raise ExportError(f"layer {name!r}: bias does not fit int32 at scale s_in * s_w")
    t_acc = new_tensor()
    tensors[f"{name}/weight"] = pack(w_int, g_w["bits"])
    tensors[f"{name}/bias"] = bias.astype(np.int32)
    out_ops.append({**extra, "name": name, "input": t_in, "output": t_acc,
                    "weight": f"{name}/weight", "weight_shape": list(w_int.shape),
                    "w_bits": g_w["bits"], "bias": f"{name}/bias",
                    "input_zero_point": int(g_in["zero_point"][0]), "a_bits": g_in["bits"],
                    "input_scale": s_in, "weight_scale": [float(v) for v in s_w]})
    producer[id(output)] = ("acc", {"name": name, "acc": t_acc, "s_in": s_in, "s_w": s_w})
  final = producer.get(id(holder["y"]))
  if final is None or final[0] != "acc":
    raise ExportError("the model output must be a dense/conv layer's output (logits)")
  src = final[1]
  out_ops.append({"op": "dequantize", "name": f"{src['name']}/output", "input": src["acc"],
                  "output": "logits", "scale": [float(src["s_in"] * v) for v in src["s_w"]]})
  manifest = {"format": FORMAT, "version": VERSION, "input": input_spec, "output": "logits",
              "num_classes": int(len(src["s_w"])), "source": meta or {}, "ops": out_ops}
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, "weights.npz"), **tensors)
  tmp = os.path.join(out_dir, "manifest.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, "manifest.json"))
  return manifest


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
  return manifest, tensors
