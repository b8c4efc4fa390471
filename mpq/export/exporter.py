"""Exporter and manifest validation for the `mpq-int` format (see `mpq.export`).

The exporter captures the model's op graph (`mpq.graph.capture`) and walks it once; each node's
op kind lowers itself (`mpq.ops`) through the `Lowering` below, which holds what every lowering
shares: tensor names, the integer grids of quantizers, accumulators and the transforms between an
accumulator and the next quantizer, and the target's multiplier rule (`mpq.export.targets`).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from mpq import graph as graph_lib
from mpq import ops
from mpq import rounding
from mpq.errors import UserError
from mpq.export import targets as targets_lib
from mpq.packing import pack, unpack  # noqa: F401  (re-exported by mpq.export)
from mpq.quant import core
from mpq.quant.layers import integer_form

FORMAT, VERSION = "mpq-int", 1


class ExportError(UserError):
  """The model or manifest cannot be exported / loaded; the message names the op and field."""


def grid(q, tensor=None) -> dict:
  """The integer grid a quantizer evaluates on (`Quantizer.integer_grid`) in NumPy: scale, zero
  point, bits, signed, qmin, qmax."""
  g = q.integer_grid(tensor)
  if g is None:
    raise ExportError(f"{q.name}/{q.role} does not evaluate on an integer grid (estimator "
                      f"{q.method.name!r}{', bypassed' if q.bypass else ''}); integer export needs "
                      "every dense/conv layer quantized with ste, lsq, noise, tqt or dbits")
  if q.role == "act" and np.size(g["scale"]) > 1:
    raise ExportError(f"{q.name}/{q.role} quantizes per channel; integer kernels (mpq, TFLite, ONNX "
                      "Runtime) take one input scale per tensor: export needs a_per_channel=False")
  bits = int(g["bits"])
  qmin, qmax = (int(v) for v in core.qrange(bits, g["signed"], g["narrow"]))
  return {"scale": np.asarray(g["scale"], np.float64).reshape(-1),
          "zero_point": np.asarray(g["zero_point"]).reshape(-1), "bits": bits,
          "signed": g["signed"], "qmin": qmin, "qmax": qmax}


def export(model, image_shape, out_dir: str, meta: dict | None = None, target: str = "mpq") -> dict:
  """Lowers `model` and writes it with `target`'s writer (`mpq`: `out_dir/manifest.json` and
  `out_dir/weights.npz`); returns the manifest. `meta` (e.g. dataset, model, source checkpoint) is
  stored under "source"."""
  t = targets_lib.get(target)
  lowering = Lowering(graph_lib.capture(model, image_shape), image_shape, t)
  manifest = lowering.run(meta)
  t.write(out_dir, manifest, lowering.tensors)
  return manifest


class Acc(NamedTuple):
  """An int32 accumulator: the producing layer's `name`, its IR `tensor`, its real `scale` (per
  output channel) and a bound on its magnitude."""
  name: str
  tensor: str
  scale: np.ndarray
  bound: float


class Lowering:
  """Walks the captured graph once (`run`). A graph tensor is produced by the input, by a layer
  (an accumulator, `accumulator`) or by a transform (`transform`: ReLU, pooling between an
  accumulator and the next quantizer), lowered when a quantizer consumes it (`to_grid`)."""

  def __init__(self, graph, image_shape, target):
    self.graph, self.image_shape, self.target = graph, image_shape, target
    self.producer: dict[str, tuple] = {"input": ("input",)}
    self.ops, self.tensors, self.input_spec, self._n = [], {}, None, 0
    self.consumer = ""

  # -- helpers for op kinds
  def new(self) -> str:
    self._n += 1
    return f"t{self._n}"

  def emit(self, op: dict) -> None:
    self.ops.append(op)

  def fail(self, message: str):
    raise ExportError(message)

  def pack(self, values, bits: int):
    return pack(values, bits)

  def multiplier(self, m: float, out_max: float) -> tuple[int, int]:
    return self.target.multiplier(m, out_max)

  def round(self, op: str, values):
    """`values` rounded by the target's rule for IR op `op` (`mpq.rounding.RULES`)."""
    return rounding.RULES[self.target.rounding_of(op)](values)

  def quantized_layer(self, node):
    """The node's layer, or an error if it has no quantizers (a float model)."""
    if not node.layer.quantized:
      self.fail(f"layer {node.name!r} is not quantized; export a quantized (QAT or PTQ) model")
    return node.layer

  def integer_weights(self, layer, w, b):
    """(weight grid, integer weights int64, integer bias float64) of a dense/conv layer, the
    integers its evaluation uses (`mpq.quant.layers.integer_form`)."""
    g_w = grid(layer.wq, w)  # raises unless the weight grid exists
    _, _, w_int, bias = integer_form(layer.aq, layer.wq, w, layer.wq(w), b)
    return g_w, np.asarray(w_int, np.int64), np.asarray(bias, np.float64)

  def accumulator(self, tensor: str, name: str, acc_tensor: str, scale, bound: float) -> None:
    self.producer[tensor] = ("acc", Acc(name, acc_tensor, np.asarray(scale, np.float64), bound))

  def transform(self, node) -> None:
    self.producer[node.output] = ("transform", node)

  # -- the walk
  def _chain(self, t, consumer):
    """(source, [transform nodes from the source to t]) for a graph tensor."""
    transforms = []
    while True:
      if t == graph_lib.UNRECORDED or t not in self.producer:
        self.fail(f"{consumer}: its input comes from an operation that is not a registered op "
                  "kind (build models from mpq.layers factories; activations are a layer's "
                  f"`activation=`, one of {', '.join(sorted(k for k, v in ops.KINDS.items() if isinstance(v, ops.Activation)))})")
      node = self.producer[t]
      if node[0] in ("input", "acc"):
        return node, transforms[::-1]
      transforms.append(node[1])
      t = node[1].inputs[0]

  def to_grid(self, t: str, q, consumer: str) -> tuple[str, dict]:
    """Emits the ops that bring graph tensor `t` onto quantizer `q`'s integer grid; returns the
    integer tensor's name and the grid."""
    g = grid(q)
    self.consumer = consumer
    source, transforms = self._chain(t, consumer)
    if source[0] == "input":
      if transforms:
        self.fail(f"{consumer}: an op between the model input and the first layer cannot be lowered")
      if self.input_spec is not None:
        self.fail(f"{consumer}: the model input feeds more than one quantized layer")
      t_in = self.new()
      self.input_spec = {"tensor": t_in, "shape": list(self.image_shape),
                         "scale": float(g["scale"][0]), "zero_point": int(g["zero_point"][0]),
                         "qmin": g["qmin"], "qmax": g["qmax"], "bits": g["bits"]}
      self.emit({"op": "quantize", "name": f"{consumer}/input", "input": "input",
                 "output": t_in, **{k: self.input_spec[k] for k in
                                    ("scale", "zero_point", "qmin", "qmax", "bits")}})
      return t_in, g
    acc = source[1]
    entries = [ops.kind(n.kind) for n in transforms]
    # Transforms up to the last one that needs the accumulator run on it; the rest fold into the
    # requantization clamp or run on the requantized integers.
    last = [i for i, e in enumerate(entries) if e.requires_accumulator]
    split = last[-1] + 1 if last else 0
    for node, entry in zip(transforms[:split], entries[:split]):
      acc = entry.on_accumulator(self, acc, node)
    lo, hi = g["qmin"], g["qmax"]
    z_out, s_out = int(g["zero_point"][0]), float(g["scale"][0])
    for entry in entries[split:]:
      lo, hi = entry.clamp(lo, hi, z_out, s_out)
    key = f"{acc.name}->{consumer}"
    out_max = max(abs(lo - z_out), abs(hi - z_out)) + 1
    pairs = [self.multiplier(m, out_max) for m in np.ravel(acc.scale / s_out)]
    shape = np.shape(acc.scale)
    m0 = np.asarray([p[0] for p in pairs], np.int32).reshape(shape)
    shift = np.asarray([p[1] for p in pairs], np.int32).reshape(shape)
    self.tensors[f"{key}/multiplier"], self.tensors[f"{key}/shift"] = m0, shift
    t_in = self.new()
    self.emit({"op": "requantize", "name": key, "input": acc.tensor, "output": t_in,
               "multiplier": f"{key}/multiplier", "shift": f"{key}/shift",
               "zero_point": z_out, "clamp": [lo, hi], "bits": g["bits"]})
    for node, entry in zip(transforms[split:], entries[split:]):
      t_in = entry.after_requantize(self, t_in, node)
    return t_in, g

  def run(self, meta) -> dict:
    for node in self.graph.nodes:
      try:
        entry = ops.kind(node.kind, where=f"layer {node.name!r}: ")
      except ops.UnknownOpError as e:
        raise ExportError(f"{e}; the {FORMAT} v{VERSION} exporter lowers registered op kinds "
                          "only") from None
      if graph_lib.UNRECORDED in node.inputs:
        self.fail(f"layer {node.name!r} ({node.kind}): its input comes from an operation that is "
                  "not a registered op kind (build models from mpq.layers factories)")
      entry.lower(self, node)
    final = self.producer.get(self.graph.output)
    if final is None or final[0] != "acc":
      self.fail("the model output must be a dense/conv layer's output (logits)")
    acc = final[1]
    self.emit({"op": "dequantize", "name": f"{acc.name}/output", "input": acc.tensor,
               "output": "logits", "scale": [float(v) for v in np.ravel(acc.scale)]})
    return {"format": FORMAT, "version": VERSION, "input": self.input_spec, "output": "logits",
            "num_classes": int(self.graph.out_shape[-1]), "source": meta or {}, "ops": self.ops}


def _need(op, field, cond, what):
  if not cond:
    raise ExportError(f"manifest op {op.get('name', '?')!r} ({op.get('op', '?')}): field {field!r} "
                      f"{what}")


def load(model_dir: str) -> tuple[dict, dict]:
  """Reads and validates an exported model; returns (manifest, {name: unpacked int32 array}).
  Generic checks here (format, version, known ops, inputs defined before use); each IR op's
  fields are checked by its registry entry (`mpq.ops`)."""
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
  defined = {"input"}
  for op in manifest.get("ops", []):
    kind = op.get("op")
    _need(op, "op", kind in ops.IR_OPS, f"must be one of {tuple(sorted(ops.IR_OPS))}")
    entry = ops.ir_op(kind)
    entry.validate(op, raw, tensors, _need)
    for t in entry.inputs(op):
      _need(op, "input", t in defined, f"names tensor {t!r}, which no earlier op produces")
    defined.add(op.get("output"))
  return manifest, tensors
