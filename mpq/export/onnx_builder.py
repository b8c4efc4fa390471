"""A small ONNX graph writer, and a runner for ONNX Runtime's CPU execution provider.

Models are built with `onnx.helper`; both `onnx` and `onnxruntime` come with the `deploy` extra and
are imported lazily, inside functions: training, allocation and the mpq format never import them.

    b = OnnxBuilder()
    x = b.input("x", [1, 4, 8, 8], "uint8")
    y = b.node("QLinearConv", [x, b.const("xs", 0.1), b.const("xz", 128, "uint8"),
                                b.const("w", w + 128, "uint8"), b.const("ws", s_w),
                                b.const("wz", np.full(8, 128), "uint8"),
                                b.const("ys", 0.2), b.const("yz", 128, "uint8"),
                                b.const("b", bias, "int32")], pads=[1, 1, 1, 1])
    b.output(y, "uint8", [1, 8, 8, 8])
    model = b.finish()
    (out,) = run(model, [q_in], level="all", threads=1)
    kernels(model, level="all")       # ['QLinearConv']: the nodes ORT runs after optimization

Conventions (measured against ONNX Runtime 1.32.0 / onnx 1.23.2; see shared/DEPLOY.md and
`mpq.export.ort_rules`): opset 21 of the default domain (INT4 initializers for DequantizeLinear),
`com.microsoft` version 1 for the contrib ops (QLinearAdd, QLinearGlobalAveragePool, QGemm).
Scales are float32 tensors; INT4 constants are stored by `onnx.helper` packed two per byte, element
2i in the low nibble (mpq's packing order). Layout is NCHW throughout, as ONNX requires.

Optimization levels (`LEVELS`): `disable` (ORT_DISABLE_ALL), `basic`, `extended`, `layout` and
`all` (ORT_ENABLE_ALL, the default of a new session). Sessions run on the CPU provider only, with
`threads` intra-op threads and spinning disabled (the machines are shared).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

import numpy as np

from mpq.export.runtimes import require


OPSET = 21
MS_DOMAIN = "com.microsoft"

# dtype name -> (TensorProto data type name, NumPy dtype of the values given to onnx.helper)
DTYPES = {
    "float32": ("FLOAT", np.float32),
    "int64": ("INT64", np.int64),
    "int32": ("INT32", np.int32),
    "int8": ("INT8", np.int8),
    "uint8": ("UINT8", np.uint8),
    "int4": ("INT4", np.int8),
    "uint4": ("UINT4", np.uint8),
}

# level name -> onnxruntime.GraphOptimizationLevel member name
LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}

# ops of the com.microsoft domain that the builder places there without being told
MS_OPS = frozenset({"QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
                    "QGemm", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
                    "QLinearSoftmax", "MatMulNBits", "DynamicQuantizeMatMul",
                    "MatMulIntegerToFloat"})


def onnx_module():
  """The `onnx` package, imported on first use."""
  return require("onnx", what="writing ONNX models needs onnx")


def ort_module():
  """The `onnxruntime` package, imported on first use."""
  return require("onnxruntime", what="running ONNX models needs onnxruntime")


def ort_version() -> str:
  """The installed onnxruntime version."""
  return ort_module().__version__


def onnx_version() -> str:
  """The installed onnx version."""
  return onnx_module().__version__


class OnnxBuilder:
  """Builds one-graph ONNX models: inputs, initializers, nodes and outputs, by tensor name.

  Every method returns the name of the tensor it declares; names not given are generated
  (`t0`, `t1`, ...). Value types of intermediate tensors are left to ONNX shape inference.
  """

  def __init__(self, name: str = "mpq", opset: int = OPSET, ms_opset: int = 1):
    self.onnx = onnx_module()
    self.name = name
    self.opset, self.ms_opset = int(opset), int(ms_opset)
    self.inputs: list[Any] = []
    self.outputs: list[Any] = []
    self.initializers: list[Any] = []
    self.nodes: list[Any] = []
    self._count = 0
    self._uses_ms = False

  def _fresh(self, prefix: str = "t") -> str:
    self._count += 1
    return f"{prefix}{self._count - 1}"

  @staticmethod
  def _dtype(dtype: str) -> int:
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
    return int(getattr(onnx_module().TensorProto, DTYPES[dtype][0]))

  def input(self, name: str, shape: Sequence[int | str | None], dtype: str) -> str:
    """A graph input of `dtype` (a `DTYPES` name) and `shape` (ints; a str or None: symbolic)."""
    self.inputs.append(self.onnx.helper.make_tensor_value_info(name, self._dtype(dtype),
                                                               list(shape)))
    return name

  def output(self, name: str, dtype: str, shape: Sequence[int | str | None]) -> str:
    """Declares the tensor `name` a graph output of `dtype` and `shape` (ints; a str or None:
    symbolic; `onnx.checker` wants a shape on every graph output)."""
    self.outputs.append(self.onnx.helper.make_tensor_value_info(name, self._dtype(dtype),
                                                                list(shape)))
    return name

  def const(self, name: str | None, data, dtype: str = "float32") -> str:
    """An initializer holding `data` as `dtype` (a scalar gives a 0-d tensor). INT4 / UINT4 values
    are range-checked and packed by `onnx.helper` (element 2i in the low nibble)."""
    name = name or self._fresh("c")
    arr = np.asarray(data)
    if dtype in ("int4", "uint4"):
      lo, hi = (-8, 7) if dtype == "int4" else (0, 15)
      if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{dtype} data must be integers, got {arr.dtype}")
      if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"{dtype} data must lie in [{lo}, {hi}], got [{arr.min()}, {arr.max()}]")
      t = self.onnx.helper.make_tensor(name, self._dtype(dtype), list(arr.shape),
                                       arr.astype(np.int64).ravel().tolist())
    else:
      np_dtype = DTYPES[dtype][1] if dtype in DTYPES else None
      if np_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
      cast = arr.astype(np_dtype)
      if np.issubdtype(np_dtype, np.integer) and not np.array_equal(cast.astype(np.int64),
                                                                    arr.astype(np.int64)):
        raise ValueError(f"constant {name!r}: values do not fit {dtype}")
      t = self.onnx.numpy_helper.from_array(cast.copy(order="C"), name)  # keeps 0-d
    self.initializers.append(t)
    return name

  def node(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1,
           domain: str | None = None, name: str | None = None, **attrs) -> Any:
    """A node `op_type` reading tensors `inputs` ("" for an omitted optional input). `outputs`: a
    count (names generated) or the names. `domain`: default "" except for `MS_OPS`, which go to
    `com.microsoft`. Returns the output name, or a list of names when there are several."""
    outs = [self._fresh() for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
    domain = (MS_DOMAIN if op_type in MS_OPS else "") if domain is None else domain
    self._uses_ms |= domain == MS_DOMAIN
    self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outs,
                                                 name=name or f"{op_type}_{len(self.nodes)}",
                                                 domain=domain, **attrs))
    return outs[0] if len(outs) == 1 else outs

  def finish(self, check: bool = True, metadata: dict | None = None) -> bytes:
    """The serialized model (IR version 10; opset `opset`, plus com.microsoft when used), with
    `metadata` ({str: str}) as its `metadata_props`. `check` runs `onnx.checker` (contrib ops are
    not checked against a schema)."""
    h = self.onnx.helper
    graph = h.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
    opsets = [h.make_opsetid("", self.opset)]
    if self._uses_ms:
      opsets.append(h.make_opsetid(MS_DOMAIN, self.ms_opset))
    model = h.make_model(graph, opset_imports=opsets, producer_name="mpq", ir_version=10)
    if metadata:
      h.set_model_props(model, {str(k): str(v) for k, v in metadata.items()})
    if check:
      self.onnx.checker.check_model(model)
    return model.SerializeToString()


# -- running in ONNX Runtime --------------------------------------------------------------------------
def session_options(level: str = "all", threads: int = 1, optimized_path: str | None = None):
  """`SessionOptions` for the optimization `level` (see `LEVELS`) and `threads` intra-op threads
  (sequential execution, no spinning); `optimized_path`: where ORT writes the graph it runs."""
  if level not in LEVELS:
    raise ValueError(f"unknown optimization level {level!r}; one of {sorted(LEVELS)}")
  ort = ort_module()
  so = ort.SessionOptions()
  so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
  so.intra_op_num_threads = int(threads)
  so.inter_op_num_threads = 1
  so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  so.add_session_config_entry("session.intra_op.allow_spinning", "0")
  so.log_severity_level = 3  # errors only (the optimized-model dump warns about NCHWc layouts)
  if optimized_path is not None:
    so.optimized_model_filepath = str(optimized_path)
  return so


def session(model: bytes, level: str = "all", threads: int = 1, optimized_path: str | None = None):
  """An `InferenceSession` for `model` on the CPU execution provider."""
  ort = ort_module()
  return ort.InferenceSession(bytes(model), session_options(level, threads, optimized_path),
                              providers=["CPUExecutionProvider"])


def invoke(sess, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Feeds `inputs` to the session's inputs in graph order; the outputs."""
  names = [i.name for i in sess.get_inputs()]
  if len(names) != len(inputs):
    raise ValueError(f"the model has {len(names)} inputs, got {len(inputs)}")
  return sess.run(None, {n: np.asarray(x) for n, x in zip(names, inputs)})


def run(model: bytes, inputs: Sequence[np.ndarray], level: str = "all",
        threads: int = 1) -> list[np.ndarray]:
  """Runs `model` once on `inputs` at optimization `level` with `threads` intra-op threads."""
  return invoke(session(model, level, threads), inputs)


def optimized_graph(model: bytes, level: str = "all", threads: int = 1):
  """The graph ORT runs after optimizing `model` at `level` (an `onnx.ModelProto`), read back from
  the file ORT writes through `SessionOptions.optimized_model_filepath`."""
  onnx = onnx_module()
  with tempfile.TemporaryDirectory(prefix="mpq_ort_") as d:
    path = os.path.join(d, "optimized.onnx")
    session(model, level, threads, optimized_path=path)
    return onnx.load(path, load_external_data=False)


def kernels(model: bytes, level: str = "all", threads: int = 1) -> list[str]:
  """The op types ORT runs for `model` at `level`, in graph order after optimization; ops outside
  the default domain are written `domain.Op` (e.g. `com.microsoft.QLinearAdd`)."""
  g = optimized_graph(model, level, threads).graph
  return [(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
          for n in g.node]
