"""Exporter and manifest validation for the `mpq-int` format (see `mpq.export`).

The exporter captures the model's op graph (`mpq.graph.capture`) and walks it once; each node's
op kind lowers itself (`mpq.ops`) through the `Lowering` below, which holds what every lowering
shares: tensor names, the integer grids of quantizers, accumulators and the transforms between an
accumulator and the next quantizer, and the target's multiplier rule (`mpq.export.targets`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import stat
import tempfile
import zipfile
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


def export(model, image_shape, out_dir: str, meta: dict | None = None, target: str = "mpq",
           calibration=None, options: dict | None = None) -> dict:
  """Lowers `model` and writes it with `target`'s writer (`mpq`: `out_dir/manifest.json` and
  `out_dir/weights.npz`); returns the manifest. `meta` (e.g. dataset, model, source checkpoint) is
  stored under "source". `calibration`: model inputs (float, normalised) from which a target with
  integer outputs (`Target.output_dtype`) calibrates its output grid. `out_dir` is checked first
  (`check_out_dir`: new, empty, or an earlier export, which is replaced as a whole; anything else
  is refused before any work) and written through a temporary sibling directory (`write`), so a
  failure leaves it as it was. `options`: the target's export options (`Target.options`, e.g.
  tflite's `weights`), checked first."""
  t = targets_lib.get(target)
  options = t.check_options(options or {})
  check_out_dir(out_dir)
  manifest, tensors = lower(model, image_shape, t.name, calibration, options, meta)
  write(out_dir, t, manifest, tensors)
  return manifest


def lower(model, image_shape, target: str = "mpq", calibration=None, options: dict | None = None,
          meta: dict | None = None) -> tuple[dict, dict]:
  """The integer model of `model` for `target`, in memory: (manifest, tensors) as `export` writes
  them (see there for `calibration`, `options` and `meta`)."""
  t = targets_lib.get(target)
  options = t.check_options(options or {})
  output_grid = None
  if t.output_dtype is not None:
    if calibration is None:
      raise ExportError(f"export target {t.name!r} outputs {t.output_dtype} logits, whose grid is "
                        "calibrated: pass calibration images")
    output_grid = calibrate_output(model, calibration, signed=t.output_dtype == "int8")
  lowering = Lowering(graph_lib.capture(model, image_shape), image_shape, t, output_grid, options)
  return lowering.run(meta), lowering.tensors


def fake_quant_logits(model, images, batch_size: int = 500) -> np.ndarray:
  """The (fake-quant) model's logits at evaluation for float `images`, in batches of
  `batch_size` through one jitted forward; float64."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, train=False))
  return np.concatenate([
      np.asarray(call(state, np.asarray(images[i:i + batch_size], np.float32)), np.float64)
      for i in range(0, len(images), batch_size)])


def calibrate_output(model, images, batch_size: int = 500, signed: bool = True) -> dict:
  """The 8-bit grid of the logits (per tensor, affine) from their range over `images` (the
  fake-quant model at evaluation): `s = float32((hi - lo) / 255)` with `lo <= 0 <= hi`,
  `z = round(qmin - lo / s)` in [qmin, qmin + 255] (qmin -128 `signed`, int8; else 0, uint8)."""
  qmin = -128 if signed else 0
  y = fake_quant_logits(model, images, batch_size)
  lo, hi = min(0.0, float(y.min())), max(0.0, float(y.max()))
  if hi - lo <= 0 or not math.isfinite(hi - lo):
    raise ExportError(f"cannot calibrate the output grid: the logits' range is [{lo}, {hi}]")
  scale = float(np.float32((hi - lo) / 255.0))
  zero_point = int(np.clip(np.floor(qmin - lo / scale + 0.5), qmin, qmin + 255))
  return {"scale": np.asarray([scale]), "zero_point": np.asarray([zero_point]), "bits": 8,
          "signed": signed, "qmin": qmin, "qmax": qmin + 255}


def layer_bits(manifest: dict) -> dict[str, dict]:
  """{op name: {"w_bits", "a_bits"}} of every dense/conv op, the weight bits as trained (a
  `weights='exact'` export stores them in int8)."""
  return {op["name"]: {"w_bits": op.get("w_bits_trained", op["w_bits"]), "a_bits": op["a_bits"]}
          for op in manifest["ops"] if "w_bits" in op}


def file_metadata(manifest: dict, layout: str, verified_with: str) -> dict[str, str]:
  """What a deployment needs to feed an exported file and read it, as {str: str} (a .tflite's
  `mpq` metadata buffer holds it as JSON, an .onnx's `metadata_props` entry by entry): the input
  normalisation (`layout`: "NHWC" / "NCHW"), the output grid, class names, per-layer bits, the
  mpq version and the runtime version the export was verified against."""
  import mpq  # pylint: disable=g-import-not-at-top
  from mpq.data import sources  # pylint: disable=g-import-not-at-top
  src = manifest.get("source") or {}
  spec = manifest["input"]
  last = manifest["ops"][-1]
  bits = layer_bits(manifest)
  names = sources.class_names(str(src.get("dataset", ""))) if src.get("dataset") else None
  return {
      "mpq_version": mpq.__version__,
      "verified_with": verified_with,
      "input": (f"uint8 pixels, {layout}; the model normalises them itself: x = (p - zero_point) "
                f"scale with zero_point {spec['zero_point']}, scale {spec['scale']!r}"),
      "output": (f"logits q on the grid (q - {last.get('zero_point', 0)}) * {last['scale'][0]!r}; "
                 "argmax ties go to the lowest index"),
      "dataset": str(src.get("dataset", "")),
      "class_names": json.dumps(list(names) if names else []),
      "bits": json.dumps(bits),
  }


# -- the output directory

def _export_files() -> set[str]:
  """The file names that some registered target writes (`Target.files`)."""
  return {f for t in targets_lib.TARGETS.values() for f in t.files}


def _is_mpq_manifest(path: str) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      m = json.load(f)
  except (OSError, ValueError, RecursionError):
    return False
  return isinstance(m, dict) and m.get("format") == FORMAT


def _names(names, limit: int = 5) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_out_dir(out_dir: str) -> str:
  """Checks that an export may write `out_dir`, before any work; returns what it is: "new" (it
  does not exist; the nearest existing ancestor is a writable directory), "empty" (an empty
  writable directory) or "export" (an earlier export: a `manifest.json` of format `mpq-int` and
  only files that registered targets write (`Target.files`), in a directory whose parent is
  writable, so it can be replaced as a whole). Anything else (a file, a directory holding other
  files, a path that cannot be created) is an ExportError, with nothing touched."""
  path = os.path.realpath(out_dir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ExportError(f"export directory {out_dir} is a file; pass a directory (new, empty, or an "
                      "earlier export)")
  if not os.path.exists(path):
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
      raise ExportError(f"cannot create export directory {out_dir}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
      raise ExportError(f"cannot create export directory {out_dir}: {ancestor} is not writable")
    return "new"
  entries = os.listdir(path)
  if not entries:
    if not os.access(path, os.W_OK | os.X_OK):
      raise ExportError(f"cannot export into {out_dir}: the directory is not writable")
    return "empty"
  refuse = (f"{out_dir} is not empty and holds no earlier mpq export ({{}}); export into a new "
            "or empty directory (nothing was written)")
  if "manifest.json" not in entries or not _is_mpq_manifest(os.path.join(path, "manifest.json")):
    what = ("its manifest.json is not an mpq-int manifest" if "manifest.json" in entries else
            "no manifest.json")
    raise ExportError(refuse.format(f"{what}; it holds {_names(entries)}"))
  known = _export_files()
  other = [e for e in entries if e not in known or os.path.isdir(os.path.join(path, e))]
  if other:
    raise ExportError(refuse.format(f"besides the export's files it holds {_names(other)}"))
  parent = os.path.dirname(path)
  if path == parent:
    raise ExportError(f"cannot replace {out_dir}: it is the filesystem root")
  for d, what in ((parent, f"its parent {parent}"), (path, "the directory")):
    if not os.access(d, os.W_OK | os.X_OK):
      raise ExportError(f"cannot replace the earlier export in {out_dir}: {what} is not writable")
  return "export"


def _default_mode() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return 0o777 & ~mask


def write(out_dir: str, target, manifest: dict, tensors: dict) -> None:
  """Writes an exported model with `target`'s writer (a `Target` or its name) into a fresh
  temporary sibling of `out_dir` (same parent, `.NAME.tmp-*`), then puts it in place: a new
  directory is renamed into place, an empty one receives the files, an earlier export is swapped
  out (renamed aside, the new directory renamed in, the old one removed). If anything fails
  before that, the temporary directory is removed and `out_dir` is as it was."""
  t = targets_lib.get(target) if isinstance(target, str) else target
  state = check_out_dir(out_dir)
  path = os.path.realpath(out_dir)
  parent, base = os.path.split(path)
  created, d = [], parent  # missing ancestors, deepest first (removed again if the export fails)
  while not os.path.exists(d):
    created.append(d)
    d = os.path.dirname(d)
  os.makedirs(parent, exist_ok=True)
  tmp, moved = None, []
  try:
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.tmp-")
    t.write(tmp, manifest, tensors)
    extra = set(os.listdir(tmp)) - set(t.files)
    if extra:  # a later export could not tell them from a user's files
      raise RuntimeError(f"export target {t.name!r} wrote {_names(extra)}, which are not in its "
                         f"declared files {t.files}")
    if state == "empty":
      for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
        moved.append(name)
      os.rmdir(tmp)
      return
    os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if state == "export" else _default_mode())
    if state == "new":
      os.rename(tmp, path)
      return
    old = os.path.join(parent, f".{base}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, old)
    try:
      os.rename(tmp, path)
    except BaseException:
      os.rename(old, path)
      raise
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    for name in moved:  # an empty directory stays empty
      with contextlib.suppress(OSError):
        os.remove(os.path.join(path, name))
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    for d in created:
      with contextlib.suppress(OSError):
        os.rmdir(d)
    raise


def check_input(manifest: dict, image_shape, model_dir: str | None = None) -> None:
  """Raises an ExportError unless the manifest's input shape is `image_shape` (the dataset's
  images, [H, W, C]); `model_dir` names the model in the message."""
  shape = list(manifest["input"]["shape"])
  if shape != [int(v) for v in image_shape]:
    where = os.path.join(model_dir, "manifest.json") if model_dir else "the exported model"
    dataset = (manifest.get("source") or {}).get("dataset")
    raise ExportError(f"{where}: input shape {shape} does not fit the dataset's images "
                      f"{tuple(int(v) for v in image_shape)}; evaluate it on the dataset it was "
                      f"exported for{f' ({dataset})' if dataset else ''}")


class Acc(NamedTuple):
  """An int32 accumulator: the producing layer's `name`, its IR `tensor`, its real `scale` (per
  output channel, float64: for float32 scales `s_in s_w` is exact), a bound on its magnitude,
  `producer`, the IR op that produced it (a target's rule may depend on it), and `peak`, where
  known, the largest magnitude it reaches over its input grid (a dense/conv layer: `max_c sum_k
  |w_kc| max|x - z| + |b_c|`), which must fit int32."""
  name: str
  tensor: str
  scale: np.ndarray
  bound: float
  producer: dict | None = None
  peak: float | None = None


class Lowering:
  """Walks the captured graph once (`run`). A graph tensor is produced by the input, by a layer
  (an accumulator, `accumulator`) or by a transform (`transform`: ReLU, pooling between an
  accumulator and the next quantizer), lowered when a quantizer consumes it (`to_grid`)."""

  def __init__(self, graph, image_shape, target, output_grid: dict | None = None,
               options: dict | None = None):
    self.graph, self.image_shape, self.target = graph, image_shape, target
    self.output_grid, self.options = output_grid, options or {}
    self.grids: dict[str, dict] = {}  # requantized tensor -> its grid (scale, zero point, clamp)
    self.requantized: dict[str, str] = {}  # accumulator tensor -> its first requantized tensor
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

  def integer_weights(self, layer, w, b, name: str):
    """(weight grid, integer weights int64, integer bias float64) of a dense/conv layer, the
    integers its evaluation uses (`mpq.quant.layers.integer_form`)."""
    g_w = grid(layer.wq, w)  # raises unless the weight grid exists
    _, _, w_int, bias = integer_form(layer.aq, layer.wq, w, layer.wq(w), b)
    try:
      return self.target.weight_layout(g_w, np.asarray(w_int, np.int64),
                                       np.asarray(bias, np.float64), self.options)
    except ValueError as e:
      self.fail(f"layer {name!r}: {e}")

  def accumulator(self, tensor: str, name: str, acc_tensor: str, scale, bound: float,
                  peak: float | None = None) -> None:
    """Records graph tensor `tensor` as the int32 accumulator `acc_tensor` (produced by the last op
    emitted) at real `scale` (per channel); `peak`: see `Acc`."""
    if peak is not None and peak > 2 ** 31 - 1:
      self.fail(f"layer {name!r}: its accumulator can reach {peak:.4g} over its input grid (the "
                f"largest sum of |weights| of an output times the largest |input - zero point|), "
                "beyond int32, in which the integer executor accumulates; use fewer input bits "
                "(a_bits) or fewer weight bits")
    self.producer[tensor] = ("acc", Acc(name, acc_tensor, np.asarray(scale, np.float64), bound,
                                        self.ops[-1] if self.ops else None, peak))

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
      pixels = {"pixels": True} if q.method.pixels else {}
      if not pixels and self.target.pixel_input:
        self.fail(f"{consumer}: export target {self.target.name!r} takes the uint8 image, so the "
                  "first layer's input quantizer must be the pixel grid; train with "
                  "--config.input_norm=pixel (the default for runs started since it exists)")
      self.input_spec.update(pixels)
      self.emit({"op": "quantize", "name": f"{consumer}/input", "input": "input",
                 "output": t_in, **{k: self.input_spec[k] for k in
                                    ("scale", "zero_point", "qmin", "qmax", "bits")}, **pixels})
      return t_in, g
    acc = source[1]
    entries = [ops.kind(n.kind) for n in transforms]
    # Transforms up to the last one that needs the accumulator run on it; the rest fold into the
    # requantization clamp or run on the requantized integers (all of them, for a target whose
    # ops take int8 tensors only: `Target.grid_transforms`).
    last = [i for i, e in enumerate(entries) if e.requires_accumulator]
    split = last[-1] + 1 if last and not self.target.grid_transforms else 0
    for node, entry in zip(transforms[:split], entries[:split]):
      acc = entry.on_accumulator(self, acc, node)
    lo, hi = g["qmin"], g["qmax"]
    z_out, s_out = int(g["zero_point"][0]), float(g["scale"][0])
    for entry in entries[split:]:
      lo, hi = entry.clamp(lo, hi, z_out, s_out)
    first = self.requantized.get(acc.tensor) if self.target.grid_transforms else None
    if first is None:
      t_in = self.requantize(acc, consumer, g, lo, hi)
      self.requantized[acc.tensor] = t_in
    else:  # one int8 tensor per accumulator: requantize the first one onto this grid
      t_in = self.requantize_grid(first, consumer, g, lo, hi)
    for node, entry in zip(transforms[split:], entries[split:]):
      t_in = entry.after_requantize(self, t_in, node)
    return t_in, g

  def requantize(self, acc, consumer: str, g: dict, lo: int, hi: int) -> str:
    """Emits the `requantize` of accumulator `acc` onto grid `g` clamped to [lo, hi], with the
    target's rule and multipliers (`Target.requantizer`); returns the output tensor."""
    key = f"{acc.name}->{consumer}"
    z_out, s_out = int(g["zero_point"][0]), float(g["scale"][0])
    out_max = max(abs(lo - z_out), abs(hi - z_out)) + 1
    try:
      rule, fields = self.target.requantizer(acc, s_out, out_max,
                                             {"zero_point": z_out, "clamp": [lo, hi],
                                              "bits": g["bits"]})
    except ValueError as e:
      self.fail(f"layer {acc.name!r}: {e}")
    op = {"op": "requantize", "name": key, "input": acc.tensor}
    if rule is not None:
      op["rule"] = rule
    for field, values in fields.items():
      self.tensors[f"{key}/{field}"] = values
      op[field] = f"{key}/{field}"
    t_out = self.new()
    op.update(output=t_out, zero_point=z_out, clamp=[lo, hi], bits=g["bits"], output_scale=s_out)
    self.emit(op)
    self.grids[t_out] = {"scale": s_out, "zero_point": z_out, "clamp": [lo, hi], "bits": g["bits"]}
    return t_out

  def requantize_grid(self, tensor: str, consumer: str, g: dict, lo: int, hi: int) -> str:
    """Grid tensor `tensor` onto grid `g` clamped to [lo, hi] (`requantize_grid`; the same tensor
    where the grids are equal)."""
    src = self.grids[tensor]
    z_out, s_out = int(g["zero_point"][0]), float(g["scale"][0])
    if (src["scale"], src["zero_point"], src["clamp"]) == (s_out, z_out, [lo, hi]):
      return tensor
    t_out = self.new()
    self.emit({"op": "requantize_grid", "name": f"{tensor}->{consumer}", "input": tensor,
               "output": t_out, "input_scale": src["scale"], "input_zero_point": src["zero_point"],
               "input_bits": src["bits"], "scale": s_out, "zero_point": z_out, "clamp": [lo, hi],
               "bits": g["bits"]})
    self.grids[t_out] = {"scale": s_out, "zero_point": z_out, "clamp": [lo, hi], "bits": g["bits"]}
    return t_out

  def consumer_bits(self, node) -> int | None:
    """The bits of the grid onto which the first quantized consumer of `node`'s output (through
    transforms: ReLU, pooling) takes it, which is where its accumulator is requantized (consumers
    lower in node order; later ones requantize from that grid where the target has one int8
    tensor per accumulator); the output grid's for the model output; None where neither exists."""
    nodes = self.graph.nodes
    start = next(i for i, n in enumerate(nodes) if n is node)
    reach = {node.output}
    for n in nodes[start + 1:]:
      hit = [i for i, t in enumerate(n.inputs) if t in reach]
      if not hit:
        continue
      entry = ops.KINDS.get(n.kind)  # an unknown kind fails when `run` reaches it
      if isinstance(entry, ops.Transform):
        reach.add(n.output)
        continue
      qs = entry.input_quantizers(n.layer) if entry is not None and n.layer.quantized else ()
      if qs:
        g = qs[hit[0]].integer_grid(None)
        return None if g is None else int(g["bits"])
    if self.graph.output in reach and self.output_grid is not None:
      return int(self.output_grid["bits"])
    return None

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
    if self.output_grid is None:
      self.emit({"op": "dequantize", "name": f"{acc.name}/output", "input": acc.tensor,
                 "output": "logits", "scale": [float(v) for v in np.ravel(acc.scale)]})
    else:  # int8 logits on the calibrated grid, then dequantized
      g = self.output_grid
      t_out = self.requantize(acc, "output", g, g["qmin"], g["qmax"])
      self.emit({"op": "dequantize", "name": f"{acc.name}/output", "input": t_out,
                 "output": "logits", "scale": [float(g["scale"][0])],
                 "zero_point": int(g["zero_point"][0])})
    manifest = {"format": FORMAT, "version": VERSION, "input": self.input_spec, "output": "logits",
                "num_classes": int(self.graph.out_shape[-1]), "source": meta or {}, "ops": self.ops}
    if self.target.name != "mpq":
      manifest["target"] = self.target.name
    if self.options:
      manifest["target_options"] = dict(self.options)
    return manifest


# -- loading

_TOP = {"format": (str, "a string"), "version": (int, "an integer"),
        "input": (dict, "an object (the input spec)"), "output": (str, "a tensor name"),
        "num_classes": (int, "an integer"), "ops": (list, "a list of op objects")}


def _read_manifest(model_dir: str, path: str) -> dict:
  if not os.path.isdir(model_dir):
    raise ExportError(f"{model_dir} is not a directory; pass the directory an export wrote "
                      "(manifest.json and weights.npz)" if os.path.exists(model_dir) else
                      f"exported model {model_dir} does not exist")
  try:
    with open(path, "rb") as f:
      text = f.read()
  except FileNotFoundError:
    raise ExportError(f"{model_dir} holds no manifest.json; it is not an exported model (written "
                      "by eval.py --export)") from None
  except OSError as e:
    raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    manifest = json.loads(text.decode("utf-8"))
  except UnicodeDecodeError:
    raise ExportError(f"{path} is not valid JSON (not UTF-8 text)") from None
  except json.JSONDecodeError as e:
    raise ExportError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                      f"{e.colno})") from None
  except RecursionError:
    raise ExportError(f"{path} is not valid JSON (nested too deeply)") from None
  if not isinstance(manifest, dict):
    raise ExportError(f"{path} is not a JSON object (an {FORMAT} manifest is one); it holds "
                      f"{type(manifest).__name__ if manifest is not None else 'null'}")
  return manifest


def _check_top(manifest: dict, path: str) -> None:
  """The top-level keys, their types, and the input spec."""
  missing = [k for k in _TOP if k not in manifest]
  if missing:
    raise ExportError(f"{path}: missing top-level key{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(map(repr, missing))} (an {FORMAT} v{VERSION} manifest has "
                      f"{', '.join(_TOP)})")
  if manifest["format"] != FORMAT or manifest["version"] != VERSION or isinstance(
      manifest["version"], bool):
    raise ExportError(f"{path}: format {manifest['format']!r} version {manifest['version']!r} is "
                      f"not {FORMAT!r} version {VERSION}")
  for key, (typ, what) in _TOP.items():
    v = manifest[key]
    if not isinstance(v, typ) or isinstance(v, bool):
      raise ExportError(f"{path}: top-level key {key!r} must be {what}, not {_json_type(v)}")
  if manifest["num_classes"] < 1:
    raise ExportError(f"{path}: top-level key 'num_classes' must be >= 1 (got "
                      f"{manifest['num_classes']})")
  if not manifest["output"]:
    raise ExportError(f"{path}: top-level key 'output' must name the logits tensor (got '')")
  if len(manifest["ops"]) < 2:
    raise ExportError(f"{path}: top-level key 'ops' must list at least a quantize and a dequantize "
                      f"op (got {len(manifest['ops'])})")
  if not isinstance(manifest.get("source", {}), dict):
    raise ExportError(f"{path}: top-level key 'source' must be an object, not "
                      f"{_json_type(manifest['source'])}")
  spec = manifest["input"]

  def need(_, field, ok, what):
    if not ok:
      raise ExportError(f"{path}: input field {field!r} {what}")

  IROp = ops.IROp  # pylint: disable=invalid-name
  need(spec, "tensor", isinstance(spec.get("tensor"), str) and spec["tensor"],
       f"must name the quantized input tensor{IROp.got(spec, 'tensor')}")
  shape = spec.get("shape")
  need(spec, "shape", isinstance(shape, list) and len(shape) == 3
       and all(IROp.is_int(v) and v >= 1 for v in shape),
       f"must be [H, W, C], positive integers{IROp.got(spec, 'shape')}")
  IROp.scale(spec, "scale", need)
  bits = IROp.bits(spec, "bits", need)
  lo, hi = IROp.bits_range(bits)
  qmin = IROp.integer(spec, "qmin", need, lo, hi - 1)
  qmax = IROp.integer(spec, "qmax", need, qmin + 1, min(hi, qmin + 2 ** bits - 1))
  IROp.integer(spec, "zero_point", need, qmin, qmax)


def _json_type(v) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
          float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _read_weights(path: str) -> dict:
  """{name: array} of weights.npz, read without pickle; any defect is one ExportError line."""

  def invalid(reason):
    return ExportError(f"{path} is not a valid .npz file ({reason}); re-export the model")

  try:
    with open(path, "rb") as f:
      head = f.read(4)
  except FileNotFoundError:
    raise ExportError(f"{path} is missing (an exported model is manifest.json and weights.npz); "
                      "re-export the model") from None
  except OSError as e:
    raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
  if not head:
    raise invalid("the file is empty")
  if head not in (b"PK\x03\x04", b"PK\x05\x06"):
    raise invalid("not a zip archive")
  raw, name = {}, None
  try:
    with np.load(path, allow_pickle=False) as z:
      for name in z.files:
        a = z[name]
        if not isinstance(a, np.ndarray):
          raise invalid(f"entry {name!r} is not a .npy array")
        if a.dtype.hasobject:
          raise invalid(f"entry {name!r} holds Python objects, not numbers")
        raw[name] = a
  except ExportError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (zip, zlib, npy header: all one defect)
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "pickle" in text.lower() or "object arr" in text.lower():
      reason = f"entry {name!r} holds Python objects, not numbers"
    elif isinstance(e, (zipfile.BadZipFile, EOFError)):
      reason = f"truncated or corrupt zip archive: {text}"
    else:
      reason = f"entry {name!r}: {text}" if name is not None else text
    raise invalid(reason[:200]) from None
  return raw


def load(model_dir: str) -> tuple[dict, dict]:
  """Reads and validates an exported model; returns (manifest, {name: unpacked int32 array}).
  Every defect is an ExportError of one line naming the file, op and field. Checked here: the
  manifest is a JSON object with the top-level keys and input spec of format `mpq-int` v1
  (`_check_top`); weights.npz is a valid .npz of numeric arrays (read without pickle); the ops
  are registered IR ops, the first a `quantize` of the float "input" matching the input spec, the
  last a `dequantize` producing `output` with 1 or `num_classes` scales, each reading tensors an
  earlier op produced and producing a new one; grid inputs lie on the grids their consumers
  declare (`IROp.value_range`); and the shapes fit from the input to the logits (`_check_shapes`).
  Each IR op's own fields are checked by its registry entry (`IROp.validate`, `mpq.ops`)."""
  path = os.path.join(model_dir, "manifest.json")
  manifest = _read_manifest(model_dir, path)
  _check_top(manifest, path)
  raw = _read_weights(os.path.join(model_dir, "weights.npz"))
  return manifest, validate(manifest, raw, path)


def validate(manifest: dict, raw: dict, path: str = "the lowered model") -> dict:
  """The checks of `load` after reading (see there) on a manifest and its stored tensors `raw`
  (as `lower` returns them: weights of 4 bits or fewer packed); returns the tensors as the
  executor takes them ({name: unpacked int32 array}). `path` names the model in errors."""

  def need(op, field, cond, what):
    if not cond:
      name, kind = op.get("name", "?"), op.get("op", "?")
      raise ExportError(f"{path}: op {name!r} ({kind}): field {field!r} {what}")

  ir_ops, n = manifest["ops"], len(manifest["ops"])
  tensors, ranges, defined = {}, {}, set()
  for i, op in enumerate(ir_ops):
    if not isinstance(op, dict):
      raise ExportError(f"{path}: ops[{i}] must be an object, not {_json_type(op)}")
    kind = op.get("op")
    need(op, "op", isinstance(kind, str) and kind in ops.IR_OPS,
         f"must be one of {tuple(sorted(ops.IR_OPS))}{ops.IROp.got(op, 'op')}")
    need(op, "name", isinstance(op.get("name"), str) and op["name"],
         f"must be a non-empty string{ops.IROp.got(op, 'name')}")
    if i == 0:
      need(op, "op", kind == "quantize", "must be 'quantize': the first op quantizes the input")
    elif i == n - 1:
      need(op, "op", kind == "dequantize", "must be 'dequantize': the last op gives the logits")
    else:
      need(op, "op", kind not in ("quantize", "dequantize"),
           f"{kind!r} may only be the {'first' if kind == 'quantize' else 'last'} op")
    entry = ops.ir_op(kind)
    for t in entry.inputs(op):
      if i == 0:
        need(op, "input", t == "input",
             f"must be 'input' (the float model input){ops.IROp.got(op, 'input')}")
      else:
        need(op, entry.input_field, isinstance(t, str) and t in defined,
             f"names tensor {t!r}, which no earlier op produces")
    out = op.get("output")
    need(op, "output", isinstance(out, str) and out and out != "input" and out not in defined,
         f"must name a new tensor{ops.IROp.got(op, 'output')}")
    entry.validate(op, raw, tensors, need)
    r = entry.value_range(op, ranges, need)
    if r is not None:
      ranges[out] = r
    defined.add(out)
  first, last, spec = ir_ops[0], ir_ops[-1], manifest["input"]
  for field in ("scale", "zero_point", "qmin", "qmax", "bits"):
    need(first, field, first[field] == spec[field],
         f"is {first[field]!r}, but the input spec says {spec[field]!r}")
  need(first, "pixels", first.get("pixels", False) == spec.get("pixels", False),
       f"is {first.get('pixels', False)!r}, but the input spec says {spec.get('pixels', False)!r}")
  need(first, "output", first["output"] == spec["tensor"],
       f"is {first['output']!r}, but the input spec's tensor is {spec['tensor']!r}")
  need(last, "output", last["output"] == manifest["output"],
       f"is {last['output']!r}, but the manifest's output is {manifest['output']!r}")
  need(last, "scale", len(last["scale"]) in (1, manifest["num_classes"]),
       f"must have 1 or num_classes = {manifest['num_classes']} entries, not {len(last['scale'])}")
  _check_shapes(manifest, tensors, need)
  return tensors


def _check_shapes(manifest: dict, tensors: dict, need) -> None:
  """Traces the ops abstractly (`jax.eval_shape`, nothing is computed) on a batch of two inputs of
  the manifest's input shape, so that a shape that does not fit (a weight_shape, a pooling window,
  per-channel tensors) is an error naming the op, not a failure when the model runs; the logits
  must be [batch, num_classes]."""
  ir_ops = manifest["ops"]
  shapes = _trace_shapes(manifest, tensors, need, 2)
  out = shapes[ir_ops[-1]["output"]]
  need(ir_ops[-1], "output", tuple(out) == (2, manifest["num_classes"]),
       f"would have shape {tuple(out)[1:]} per image, not ({manifest['num_classes']},) "
       "(num_classes)")


def tensor_shapes(manifest: dict, tensors: dict, batch: int = 1) -> dict[str, tuple]:
  """The shape of every tensor of a validated model (`load`) for a batch of `batch`, by name
  ("input" included)."""
  def need(op, field, ok, what):
    if not ok:
      raise ExportError(f"op {op.get('name', '?')!r} ({op.get('op', '?')}): field {field!r} {what}")
  return _trace_shapes(manifest, tensors, need, batch)


def _trace_shapes(manifest: dict, tensors: dict, need, batch: int) -> dict[str, tuple]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ir_ops = manifest["ops"]
  shape = (batch, *manifest["input"]["shape"])
  shapes = {"input": shape}

  def trace(x):
    env = {"input": x}
    for op in ir_ops:
      args = {t: env[t] for t in ops.ir_op(op["op"]).inputs(op)}
      try:
        y = ops.ir_op(op["op"]).kernel(op, args, tensors)
      except Exception as e:  # pylint: disable=broad-except  (shape errors of jax / numpy)
        text = (str(e).splitlines() or [type(e).__name__])[0][:200]
        got = ", ".join(f"{t} {tuple(v.shape)}" for t, v in args.items())
        need(op, ops.ir_op(op["op"]).input_field, False,
             f"does not fit: its input{'s' if len(args) > 1 else ''} {got} ({text})")
      need(op, "output", math.prod(y.shape) > 0,
           f"would be empty (shape {tuple(y.shape)} from input shape "
           f"{', '.join(str(tuple(v.shape)) for v in args.values())})")
      env[op["output"]] = y
      shapes[op["output"]] = tuple(int(d) for d in y.shape)
    return env[ir_ops[-1]["output"]]

  dtype = jnp.uint8 if manifest["input"].get("pixels") else jnp.float32
  jax.eval_shape(trace, jax.ShapeDtypeStruct(shape, dtype))
  return shapes
