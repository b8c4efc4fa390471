"""A minimal .tflite writer, and a runner for LiteRT's three kernel families.

The writer uses the flatbuffers object API of the .tflite schema that the `ai-edge-litert` wheel
ships (`ai_edge_litert/schema_py_generated.py`, which imports only `flatbuffers`), so no TensorFlow
is needed. Both packages come with the `deploy` extra and are imported lazily, inside functions:
training, allocation and the mpq format never import them.

    b = TFLiteBuilder()
    x = b.add_tensor("x", [1, 8, 8, 4], "int8", scale=0.1, zero_point=-3)
    y = b.add_tensor("y", [1, 1, 1, 4], "int8", scale=0.05, zero_point=2)
    axes = b.add_tensor("axes", [2], "int32", data=np.array([1, 2]))
    b.add_operator("MEAN", [x, axes], [y], b.options("ReducerOptions", keepDims=True))
    b.set_io([x], [y])
    model = b.finish()
    (out,) = run(model, [q_in], family="litert-ref")

Conventions (measured against LiteRT 2.3.0; see shared/DEPLOY.md): buffer 0 is the empty buffer,
the file identifier is `TFL3`, `deprecatedBuiltinCode = min(code, 127)`. INT4 and INT2 constants
are packed as `mpq.packing.pack` does: element i in byte i // (8 / bits), lowest bits first.
Quantization is per tensor (one scale) or per channel (a scale per index of `quantized_dimension`).
Scales are written as float32; LiteRT derives every multiplier from those float32 values.

Kernel families (`FAMILIES`): `litert-ref` (`OpResolverType.BUILTIN_REF`, reference kernels),
`litert-ruy` (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`, optimized kernels, ruy GEMM), `litert-auto`
(`AUTO`, the default: the XNNPACK delegate takes the ops it supports, the rest run the optimized
kernels). `delegated_ops` tells which ops the delegate took.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mpq.errors import UserError
from mpq.export.runtimes import INSTALL_HINT, require
from mpq.packing import pack


# dtype name -> (schema TensorType name, NumPy storage dtype, bits or None for whole bytes)
DTYPES = {
    "float32": ("FLOAT32", np.float32, None),
    "int32": ("INT32", np.int32, None),
    "int64": ("INT64", np.int64, None),
    "int16": ("INT16", np.int16, None),
    "int8": ("INT8", np.int8, None),
    "uint8": ("UINT8", np.uint8, None),
    "bool": ("BOOL", np.bool_, None),
    "int4": ("INT4", None, 4),
    "int2": ("INT2", None, 2),
}

# family name -> ai_edge_litert.interpreter.OpResolverType member name
FAMILIES = {
    "litert-ref": "BUILTIN_REF",
    "litert-ruy": "BUILTIN_WITHOUT_DEFAULT_DELEGATES",
    "litert-auto": "AUTO",
}


def schema():
  """The .tflite schema module (`ai_edge_litert.schema_py_generated`), imported on first use."""
  return require("ai_edge_litert.schema_py_generated", "flatbuffers",
                 what="the .tflite writer needs ai-edge-litert and flatbuffers")


def _interpreter_module():
  return require("ai_edge_litert.interpreter", what="running .tflite models needs ai-edge-litert")


def litert_version() -> str:
  """The installed ai-edge-litert version."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version("ai-edge-litert")
  except metadata.PackageNotFoundError as e:
    raise UserError(f"ai-edge-litert is not installed; {INSTALL_HINT}") from e


def encode_tensor_data(data, dtype: str) -> np.ndarray:
  """Constant data -> the bytes a buffer stores (uint8 array): little-endian values of the storage
  dtype, or INT4/INT2 values packed below 8 bits (range-checked)."""
  _, np_dtype, bits = DTYPES[dtype]
  if bits is None:
    arr = np.ascontiguousarray(np.asarray(data).astype(np.dtype(np_dtype).newbyteorder("<")))
    return np.frombuffer(arr.tobytes(), np.uint8)
  v = np.asarray(data)
  if not np.issubdtype(v.dtype, np.integer):
    raise ValueError(f"{dtype} data must be integers, got {v.dtype}")
  lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  if v.size and (v.min() < lo or v.max() > hi):
    raise ValueError(f"{dtype} data must lie in [{lo}, {hi}], got [{v.min()}, {v.max()}]")
  return pack(v, bits)


class TFLiteBuilder:
  """Builds one-subgraph .tflite models: buffers, tensors, operators, inputs and outputs.

  Indices returned by `add_buffer` / `add_tensor` are the schema's buffer / tensor indices.
  Operator codes are deduplicated by (builtin op, version).
  """

  def __init__(self, description: str = "mpq"):
    self.s = schema()
    self.description = description
    self.buffers: list[Any] = [self.s.BufferT()]  # buffer 0: the empty buffer
    self.tensors: list[Any] = []
    self.operators: list[Any] = []
    self.opcodes: list[Any] = []
    self._opcode_index: dict[tuple[int, int], int] = {}
    self.inputs: list[int] = []
    self.outputs: list[int] = []
    self.metadata: list[Any] = []

  def add_metadata(self, name: str, data: bytes) -> None:
    """A named metadata entry of the model (`Model.metadata`), its bytes in a new buffer."""
    m = self.s.MetadataT()
    m.name, m.buffer = name, self.add_buffer(bytes(data))
    self.metadata.append(m)

  # -- buffers and tensors ------------------------------------------------------------------------
  def add_buffer(self, data: np.ndarray | bytes | None = None) -> int:
    """A new buffer holding `data` (raw bytes or a uint8 array); None: an empty buffer."""
    buf = self.s.BufferT()
    if data is not None:
      buf.data = np.frombuffer(bytes(data), np.uint8) if isinstance(data, (bytes, bytearray)) \
          else np.ascontiguousarray(data, np.uint8).ravel()
    self.buffers.append(buf)
    return len(self.buffers) - 1

  def add_tensor(self, name: str, shape: Sequence[int], dtype: str, *, data=None,
                 scale=None, zero_point=None, quantized_dimension: int = 0,
                 signature: Sequence[int] | None = None) -> int:
    """A tensor; `data` makes it a constant (stored in a new buffer, encoded for `dtype`).
    `signature`: the shape with -1 for dynamic dimensions (e.g. the batch), `shape` then holds
    the size the interpreter allocates first.

    `scale` (a float, or a sequence for per-channel quantization along `quantized_dimension`) and
    `zero_point` (an int or a sequence of the same length; default 0) give affine quantization;
    scales are stored as float32. dtype: one of `DTYPES`.
    """
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
    shape = [int(d) for d in shape]
    t = self.s.TensorT()
    t.name = name
    t.shape = np.asarray(shape, np.int32)
    t.type = getattr(self.s.TensorType, DTYPES[dtype][0])
    t.buffer = 0
    if signature is not None:
      t.shapeSignature = np.asarray([int(d) for d in signature], np.int32)
    if data is not None:
      arr = np.asarray(data)
      if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"tensor {name!r}: {arr.size} values for shape {shape}")
      t.buffer = self.add_buffer(encode_tensor_data(arr, dtype))
    if scale is not None:
      scales = np.atleast_1d(np.asarray(scale, np.float32))
      zps = np.zeros(len(scales), np.int64) if zero_point is None else \
          np.atleast_1d(np.asarray(zero_point, np.int64))
      if len(zps) == 1 and len(scales) > 1:
        zps = np.repeat(zps, len(scales))
      if len(zps) != len(scales):
        raise ValueError(f"tensor {name!r}: {len(scales)} scales but {len(zps)} zero points")
      if len(scales) > 1 and shape[quantized_dimension] != len(scales):
        raise ValueError(f"tensor {name!r}: {len(scales)} scales for dimension "
                         f"{quantized_dimension} of size {shape[quantized_dimension]}")
      q = self.s.QuantizationParametersT()
      q.scale = scales
      q.zeroPoint = zps
      q.quantizedDimension = int(quantized_dimension)
      t.quantization = q
    elif zero_point is not None:
      raise ValueError(f"tensor {name!r}: a zero point needs a scale")
    self.tensors.append(t)
    return len(self.tensors) - 1

  # -- operators ------------------------------------------------------------------------------------
  def options(self, name: str, **fields):
    """A builtin options object, e.g. `options("Conv2DOptions", strideH=1, strideW=1)`; field names
    are the schema's (camelCase). Enum values may be given by name (`padding="SAME"`,
    `fusedActivationFunction="RELU"`)."""
    cls = getattr(self.s, name + "T", None)
    if cls is None or not hasattr(self.s.BuiltinOptions, name):
      raise ValueError(f"unknown builtin options {name!r}")
    obj = cls()
    enums = {"padding": self.s.Padding, "fusedActivationFunction": self.s.ActivationFunctionType,
             "weightsFormat": self.s.FullyConnectedOptionsWeightsFormat}
    for k, v in fields.items():
      if not hasattr(obj, k):
        raise ValueError(f"{name} has no field {k!r}")
      if isinstance(v, str) and k in enums:
        v = getattr(enums[k], v)
      setattr(obj, k, v)
    return obj

  def _opcode(self, op: str | int, version: int) -> int:
    code = getattr(self.s.BuiltinOperator, op) if isinstance(op, str) else int(op)
    key = (code, int(version))
    if key not in self._opcode_index:
      oc = self.s.OperatorCodeT()
      oc.builtinCode = code
      oc.deprecatedBuiltinCode = min(code, 127)
      oc.version = int(version)
      self._opcode_index[key] = len(self.opcodes)
      self.opcodes.append(oc)
    return self._opcode_index[key]

  def add_operator(self, op: str | int, inputs: Sequence[int], outputs: Sequence[int],
                   options=None, version: int = 1) -> int:
    """An operator (`op`: a `BuiltinOperator` name such as "CONV_2D", or its code) reading tensors
    `inputs` (-1: an omitted optional input) and writing `outputs`; `options` from `options()`."""
    o = self.s.OperatorT()
    o.opcodeIndex = self._opcode(op, version)
    o.inputs = np.asarray(inputs, np.int32)
    o.outputs = np.asarray(outputs, np.int32)
    if options is not None:
      o.builtinOptionsType = getattr(self.s.BuiltinOptions, type(options).__name__[:-1])
      o.builtinOptions = options
    self.operators.append(o)
    return len(self.operators) - 1

  def set_io(self, inputs: Sequence[int], outputs: Sequence[int]) -> None:
    """The subgraph's input and output tensors, in order."""
    self.inputs, self.outputs = list(inputs), list(outputs)

  def finish(self) -> bytes:
    """The serialized model (file identifier `TFL3`, schema version 3)."""
    import flatbuffers  # pylint: disable=g-import-not-at-top
    sg = self.s.SubGraphT()
    sg.tensors, sg.operators = self.tensors, self.operators
    sg.inputs = np.asarray(self.inputs, np.int32)
    sg.outputs = np.asarray(self.outputs, np.int32)
    sg.name = "main"
    m = self.s.ModelT()
    m.version = 3
    m.description = self.description
    m.operatorCodes, m.subgraphs, m.buffers = self.opcodes, [sg], self.buffers
    if self.metadata:
      m.metadata = self.metadata
    fb = flatbuffers.Builder(1024)
    fb.Finish(m.Pack(fb), file_identifier=b"TFL3")
    return bytes(fb.Output())


# -- running in LiteRT --------------------------------------------------------------------------------
def interpreter(model: bytes, family: str = "litert-ref", num_threads: int = 1):
  """A LiteRT `Interpreter` for `model` with the op resolver of `family` (see `FAMILIES`), tensors
  allocated."""
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
  mod = _interpreter_module()
  interp = mod.Interpreter(model_content=bytes(model), num_threads=num_threads,
                           experimental_op_resolver_type=getattr(mod.OpResolverType,
                                                                 FAMILIES[family]))
  interp.allocate_tensors()
  return interp


def invoke(interp, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Sets the inputs (in subgraph order), invokes, returns copies of the outputs."""
  details = interp.get_input_details()
  if len(details) != len(inputs):
    raise ValueError(f"the model has {len(details)} inputs, got {len(inputs)}")
  for d, x in zip(details, inputs):
    interp.set_tensor(d["index"], np.asarray(x, d["dtype"]))
  interp.invoke()
  return [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]


def run(model: bytes, inputs: Sequence[np.ndarray], family: str = "litert-ref",
        num_threads: int = 1) -> list[np.ndarray]:
  """Runs `model` once on `inputs` with `family`'s kernels; the outputs."""
  return invoke(interpreter(model, family, num_threads), inputs)


def delegation(interp) -> list[tuple[str, bool]]:
  """(op name, taken by a delegate) for each operator of the model, in order.

  LiteRT keeps the model's operators as nodes 0..n-1 and appends one `DELEGATE` node per
  partition a delegate took (`_get_ops_details()`). A partition's operators are those that produce
  its outputs, walking back from them to its inputs."""
  details = interp._get_ops_details()  # pylint: disable=protected-access
  own = [d for d in details if d["op_name"] != "DELEGATE"]
  producer = {int(t): d["index"] for d in own for t in d["outputs"]}
  by_index = {d["index"]: d for d in own}
  taken: set[int] = set()
  for d in details:
    if d["op_name"] != "DELEGATE":
      continue
    boundary = {int(t) for t in d["inputs"]}
    stack = [int(t) for t in d["outputs"]]
    seen: set[int] = set()
    while stack:
      t = stack.pop()
      if t in seen or t in boundary or t not in producer:
        continue
      seen.add(t)
      taken.add(producer[t])
      stack.extend(int(u) for u in by_index[producer[t]]["inputs"] if u >= 0)
  return [(d["op_name"], d["index"] in taken) for d in own]


def delegated_ops(model: bytes, family: str = "litert-auto") -> tuple[list[str], list[str]]:
  """(names of the ops a delegate took, names of the ops left to the builtin kernels) for `model`
  under `family`, each in model order."""
  plan = delegation(interpreter(model, family))
  return [n for n, d in plan if d], [n for n, d in plan if not d]
