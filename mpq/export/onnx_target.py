"""The `onnx` export target: an .onnx file that ONNX Runtime runs, and the mpq manifest of the same
integer model, which mpq's executor runs with ONNX Runtime's arithmetic (kernel family `ort`).

What the target decides (`mpq.export.targets.Target`):
  activations   uint8 tensors (ORT fuses and runs integer kernels for uint8 activations;
                shared/DEPLOY.md): a grid whose integers lie in [lo, hi] is stored as
                `q + storage_offset(lo, hi)` (0 for a grid inside [0, 255], 128 for a signed one),
                its zero point likewise
  weights       uint8 `w + 128`, zero point 128 in every channel, whatever their bits (QLinearConv
                and QGemm take no INT4): ORT's uint8 x int8 kernels saturate int16 pair sums on x86
                without VNNI, its uint8 x uint8 kernels are exact everywhere (`LinearIR.onnx`)
  ops           QLinearConv (convolutions, depthwise included: `group`), com.microsoft QGemm
                (dense, after Flatten; the rows of a flattening layer's weights permuted from
                NHWC to NCHW order), MaxPool on uint8, com.microsoft QLinearGlobalAveragePool
                (average pooling), com.microsoft QLinearAdd (residual additions), Dequantize-
                Linear + QuantizeLinear (a grid tensor onto a second grid). QLinear ops clamp to
                [0, 255] only: a grid narrower than that (a ReLU's zero point above 0, 2-7 bits)
                gets an explicit Clip of the stored values
  rules         ORT requantizes in float32 (`mpq.export.ort_rules`): convs and QGemm by
                `rint_even(f32(acc) f32(f32(s_in s_w,c) / s_out))` (the `requantize` rule
                `float32_even` with that scale, `requantizer`); QLinearAdd by two fused
                multiply-adds of the stored values (the `add_grid` IR op, rule `ort`, whose output grid
                the requantizer records in it); average pooling and grid-to-grid requantization
                by their own `ort` rules (`IROp.for_family`). The manifest is written for `ort`
  input         the uint8 image, NCHW [batch, C, H, W] with a dynamic batch, read directly by the
                first QLinearConv (its zero point the pixel grid's)
  output        uint8 logits on a calibrated per-tensor grid (`output_dtype`: ORT's QGemm with
                uint8 input outputs uint8); argmax ties go to the lowest index

The graph is written from the validated manifest (`to_onnx`): every IR op lowers itself
(`IROp.onnx(op, writer)`, in `mpq.ops`) through the `Writer` below. The file carries
`metadata_props` (`metadata`).
"""

from __future__ import annotations

import os

import numpy as np

from mpq.float32 import f32

FILE = "model.onnx"
FAMILY = "ort"
FAMILIES = ("ort",)


def storage_offset(lo: int, hi: int, zero_point: int = 0) -> int | None:
  """What uint8 storage adds to the integers of a grid tensor whose values lie in [lo, hi]: 0 when
  they already fit [0, 255], 128 for a signed grid inside [-128, 127]; None otherwise (the zero
  point does not matter: uint8 tensors take any)."""
  del zero_point
  if 0 <= lo and hi <= 255:
    return 0
  if -128 <= lo and hi <= 127:
    return 128
  return None


def requantizer(acc, s_out: float, out_max: float, out: dict):
  """The `requantize` op's rule and tensors for accumulator `acc` onto a grid of scale `s_out`, as
  ORT computes it: the producing IR op says how (`IROp.onnx_requantizer`)."""
  from mpq import ops  # pylint: disable=g-import-not-at-top
  del out_max
  producer = acc.producer or {}
  if "op" not in producer:
    raise ValueError("the onnx target has no lowering for this accumulator; export with "
                     "--target=mpq")
  storage = storage_offset(*out["clamp"])
  if storage is None:
    raise ValueError(f"its output grid {out['clamp']} does not fit uint8 storage; the onnx target "
                     "takes activations of at most 8 bits")
  return ops.ir_op(producer["op"]).onnx_requantizer(producer, s_out, dict(out, storage=storage))


def emulate(manifest: dict, tensors: dict, family: str) -> tuple[dict, dict]:
  """(manifest, tensors) with every op as ORT computes it (`IROp.for_family`); the manifest of an
  onnx export already is (written for `ort`), so this checks and returns it."""
  from mpq import ops  # pylint: disable=g-import-not-at-top
  from mpq.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  if family not in FAMILIES:
    raise ExportError(f"unknown ONNX Runtime kernel family {family!r}; use one of "
                      f"{', '.join(FAMILIES)}")
  new_ops = []
  for op in manifest["ops"]:
    try:
      new_ops.append(ops.ir_op(op["op"]).for_family(op, family))
    except ValueError as e:
      raise ExportError(f"op {op['name']!r}: {e}") from None
  return dict(manifest, ops=new_ops, family=family), tensors


def file_input(pixels: np.ndarray) -> np.ndarray:
  """The array the .onnx file takes for uint8 NHWC images: NCHW."""
  return np.ascontiguousarray(np.asarray(pixels, np.uint8).transpose(0, 3, 1, 2))


def run_ort(model_dir: str, family: str, images: np.ndarray, batch_size: int = 500,
            num_threads: int = 1) -> np.ndarray:
  """The output of `model_dir/model.onnx` run by ONNX Runtime (CPU provider, ORT_ENABLE_ALL, the
  default of a new session) on `images` as the file takes them (uint8 NCHW), in batches."""
  from mpq.export import onnx_builder as ob  # pylint: disable=g-import-not-at-top
  from mpq.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  if family not in FAMILIES:
    raise ExportError(f"unknown ONNX Runtime kernel family {family!r}; use one of "
                      f"{', '.join(FAMILIES)}")
  path = os.path.join(model_dir, FILE)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise ExportError(f"{model_dir} holds no {FILE}; export with --target=onnx") from None
  except OSError as e:
    raise ExportError(f"cannot read {path}: {e.strerror or e}") from None
  ob.ort_module()  # a missing runtime is the deploy extra's one-line error, not a corrupt file
  try:
    sess = ob.session(data, "all", num_threads)
  except Exception as e:  # pylint: disable=broad-except  (ORT raises its own exception types)
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
    raise ExportError(f"{path} is not a valid ONNX model ({text}); re-export it") from None
  outs = [ob.invoke(sess, [np.ascontiguousarray(images[i:i + batch_size], np.uint8)])[0]
          for i in range(0, len(images), batch_size)]
  return np.concatenate(outs)


class Writer:
  """The state shared while IR ops lower themselves into an ONNX graph: `builder`
  (`mpq.export.onnx_builder.OnnxBuilder`), the validated `manifest` and `tensors` (unpacked), each
  IR tensor's NHWC shape at batch 1 (`shapes`) and, once written, the uint8 storage offset
  (`offsets`), value range (`grid_range`) and quantization constants (`qparams`: the names of its
  float32 scale and uint8 zero point) of each grid tensor. ONNX tensors take the IR tensors' names
  (the logits: `logits`)."""

  def __init__(self, builder, manifest: dict, tensors: dict, shapes: dict):
    self.builder, self.manifest, self.tensors, self.shapes = builder, manifest, tensors, shapes
    self.offsets: dict[str, int] = {}
    self.grid_range: dict[str, tuple[int, int]] = {}
    self.qparams: dict[str, tuple[str, str]] = {}
    self.consumers: dict[str, list[dict]] = {}
    self.fused: set[str] = set()
    self.names: dict[str, str] = {}
    self.outputs: list[tuple[str, list]] = []
    from mpq import ops  # pylint: disable=g-import-not-at-top
    self._ops = ops
    for op in manifest["ops"]:
      for t in ops.ir_op(op["op"]).inputs(op):
        self.consumers.setdefault(t, []).append(op)
    last = manifest["ops"][-1]
    if last["op"] == "dequantize":
      self.names[last["input"]] = "logits"

  def fail(self, op: dict, reason: str):
    from mpq.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
    raise ExportError(f"op {op['name']!r} ({op['op']}): {reason}")

  def name(self, tensor: str) -> str:
    """The ONNX name of IR tensor `tensor`."""
    return self.names.get(tensor, tensor)

  def shape(self, tensor: str) -> list:
    """The ONNX (NCHW) shape of IR tensor `tensor`, the batch symbolic."""
    s = list(self.shapes[tensor])
    return ["n", s[3], s[1], s[2]] if len(s) == 4 else ["n", *s[1:]]

  # -- grid tensors
  def grid_tensor(self, name: str, scale: float, zero_point: int, lo: int, hi: int, op: dict) -> str:
    """Declares IR grid tensor `name` (integers in [lo, hi], zero point `zero_point`) as a uint8
    tensor: its storage offset and quantization constants. Returns its ONNX name."""
    off = storage_offset(lo, hi)
    if off is None:
      self.fail(op, f"its output grid [{lo}, {hi}] does not fit uint8 storage; the onnx target "
                "takes activations of at most 8 bits")
    self.offsets[name], self.grid_range[name] = off, (lo, hi)
    b = self.builder
    self.qparams[name] = (b.const(f"{name}/scale", f32(scale)),
                          b.const(f"{name}/zero_point", zero_point + off, "uint8"))
    return self.name(name)

  def alias(self, name: str, like: str) -> str:
    """IR tensor `name` quantized as IR tensor `like` (pooling); returns its ONNX name."""
    self.offsets[name], self.qparams[name] = self.offsets[like], self.qparams[like]
    if like in self.grid_range:
      self.grid_range[name] = self.grid_range[like]
    return self.name(name)

  def grid(self, op: dict, tensor: str) -> tuple[str, int]:
    """(ONNX name, storage offset) of an IR grid tensor already written (an op's input)."""
    if tensor not in self.offsets:
      self.fail(op, f"its input {tensor!r} is not a uint8 tensor of the ONNX graph (an int32 "
                "accumulator); the onnx target has no lowering for this graph yet")
    return self.name(tensor), self.offsets[tensor]

  def check_zero_point(self, op: dict, tensor: str, zero_point: int) -> None:
    """Fails unless the op's idea of `tensor`'s zero point is the tensor's."""
    init = {i.name: i for i in self.builder.initializers}
    stored = int(self._numpy(init[self.qparams[tensor][1]]))
    if zero_point + self.offsets[tensor] != stored:
      self.fail(op, f"its zero point {zero_point} for {tensor!r} differs from the tensor's")

  def _numpy(self, t):
    return self.builder.onnx.numpy_helper.to_array(t)

  # -- a producer's requantization
  def requantize_of(self, op: dict) -> dict:
    """The `requantize` op that alone consumes `op`'s int32 output (the QLinear op `op` becomes
    requantizes its accumulator itself); marked as lowered."""
    users = self.consumers.get(op["output"], [])
    if len(users) != 1 or users[0]["op"] != "requantize":
      self.fail(op, "its int32 output must feed exactly one requantize op (an ONNX QLinear op "
                f"outputs uint8); got {', '.join(u['op'] for u in users) or 'none'}")
    self.fused.add(users[0]["name"])
    return users[0]

  def output_grid(self, op: dict, tensor: str, scale: float, zero_point: int, lo: int,
                  hi: int) -> tuple[str, str, str]:
    """(the name an op writes, y_scale, y_zero_point) for the new grid tensor `tensor`; `clamp(
    tensor)` after the op completes it."""
    name = self.grid_tensor(tensor, scale, zero_point, lo, hi, op)
    ys, yz = self.qparams[tensor]
    return (name if self.full(tensor) else f"{name}/unclipped"), ys, yz

  def output_of(self, r: dict) -> tuple[str, str, str]:
    """`output_grid` of requantize op `r` written as a QLinear op's output."""
    if "output_scale" not in r:
      self.fail(r, "has no output_scale (re-export the model)")
    return self.output_grid(r, r["output"], r["output_scale"], r["zero_point"], *r["clamp"])

  def full(self, tensor: str) -> bool:
    lo, hi = self.grid_range[tensor]
    off = self.offsets[tensor]
    return (lo + off, hi + off) == (0, 255)

  def clamp(self, tensor: str) -> None:
    """After the op writing `output_of`'s name: the explicit Clip of the stored values onto the
    grid's range where it is narrower than uint8 (QLinear ops clamp to [0, 255] only)."""
    if self.full(tensor):
      return
    lo, hi = self.grid_range[tensor]
    off = self.offsets[tensor]
    name = self.name(tensor)
    b = self.builder
    b.node("Clip", [f"{name}/unclipped", b.const(f"{name}/min", lo + off, "uint8"),
                    b.const(f"{name}/max", hi + off, "uint8")], [name])

  def run(self) -> tuple[str, list]:
    for op in self.manifest["ops"]:
      if op["op"] == "requantize" and op["name"] in self.fused:
        continue
      self._ops.ir_op(op["op"]).onnx(op, self)
    return self.outputs


def metadata(manifest: dict) -> dict[str, str]:
  """`metadata_props` of an exported file (`mpq.export.exporter.file_metadata`)."""
  from mpq.export import exporter, onnx_builder as ob  # pylint: disable=g-import-not-at-top
  return exporter.file_metadata(
      manifest, "NCHW", f"onnxruntime {ob.ort_version()} (CPU provider, ORT_ENABLE_ALL)")


def to_onnx(manifest: dict, tensors: dict) -> bytes:
  """The .onnx model (bytes) of a validated manifest and its unpacked tensors."""
  from mpq.export import exporter  # pylint: disable=g-import-not-at-top
  from mpq.export.onnx_builder import OnnxBuilder  # pylint: disable=g-import-not-at-top
  shapes = exporter.tensor_shapes(manifest, tensors)
  b = OnnxBuilder(name="mpq")
  w = Writer(b, manifest, tensors, shapes)
  for name, shape in w.run():
    b.output(name, "uint8", shape)
  return b.finish(metadata=metadata(manifest))


def _write(out_dir: str, manifest: dict, tensors: dict) -> None:
  """`out_dir/model.onnx` and the mpq manifest of the same model, written for the `ort` family
  (`manifest.json`, `weights.npz`: written first and validated before the .onnx is built)."""
  from mpq.export import exporter, targets  # pylint: disable=g-import-not-at-top
  manifest, tensors = emulate(manifest, tensors, FAMILY)
  targets.write_mpq(out_dir, manifest, tensors)
  loaded, unpacked = exporter.load(out_dir)
  data = to_onnx(loaded, unpacked)
  with open(os.path.join(out_dir, FILE), "wb") as f:
    f.write(data)


def _no_multiplier(m: float, out_max: float):
  raise ValueError("ONNX Runtime's integer ops take no fixed-point multipliers (they rescale in "
                   "float32)")


def _register():
  from mpq.export import targets  # pylint: disable=g-import-not-at-top
  targets.register(targets.Target(
      "onnx", _write, ("manifest.json", "weights.npz", FILE),
      _no_multiplier,
      {"*": "half_up"}, requantizer, output_dtype="uint8", pixel_input=True, emulations=FAMILIES,
      emulate=emulate, runtimes=FAMILIES, run=run_ort, grid_transforms=True,
      add_ir="add_grid", storage_offset=storage_offset, file_input=file_input))


_register()
