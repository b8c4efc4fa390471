"""Explicit graph capture: the op graph of one forward pass, recorded by the model's own layers.

`capture(model, image_shape)` gives every factory-made layer of `model` a `Recorder` (an attribute
of those layers while the capture runs: nothing global, other models and threads are unaffected),
runs one abstract forward pass (`jax.eval_shape`: shapes only, no computation) and returns the
`Graph`. A layer records each op it performs (`Layer._emit`): its main op (dense, conv, add,
pooling, ...) and its activation (relu, relu6, ...) as separate nodes, in call order.

Tensors are named `input`, `t1`, `t2`, ... by the recorder, which keeps every array it has named and
finds an input among them by identity (`is`; the arrays stay referenced, so identities are never
reused). An input that no recorded op produced came from an operation outside the registered op
kinds: it is named `unrecorded`, and whoever consumes it (cost, export) reports the consuming
layer's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

UNRECORDED = "unrecorded"


@dataclasses.dataclass
class Node:
  """One recorded op: its `kind` (a registered op kind), the recording layer's `name` (path) and
  the layer itself, input and output tensor names and shapes, and op attributes."""
  kind: str
  name: str
  layer: Any
  inputs: tuple[str, ...]
  output: str
  in_shapes: tuple[tuple[int, ...], ...]
  out_shape: tuple[int, ...]
  attrs: dict


@dataclasses.dataclass
class Graph:
  nodes: list[Node]
  output: str  # the model output's tensor name
  out_shape: tuple[int, ...]


class Recorder:
  """Collects the nodes of one forward pass (see the module docstring)."""

  def __init__(self):
    self.nodes: list[Node] = []
    self._named: list[tuple[Any, str]] = []

  def bind(self, array, name: str) -> None:
    self._named.append((array, name))

  def name(self, array) -> str:
    for a, n in reversed(self._named):
      if a is array:
        return n
    return UNRECORDED

  def record(self, kind: str, layer, inputs, output, **attrs) -> None:
    out = f"t{len(self.nodes) + 1}"
    self.nodes.append(Node(kind, layer.name, layer, tuple(self.name(t) for t in inputs), out,
                           tuple(tuple(t.shape) for t in inputs), tuple(output.shape), attrs))
    self.bind(output, out)


def _layers(model):
  from mpq.layers import Layer  # pylint: disable=g-import-not-at-top
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, Layer)]


@contextlib.contextmanager
def recording(model):
  """Within the block, `model`'s layers record into the yielded `Recorder`."""
  rec = Recorder()
  layers = _layers(model)
  for layer in layers:
    layer.recorder = rec
  try:
    yield rec
  finally:
    for layer in layers:
      del layer.recorder  # back to the class default (None): the graphdef is unchanged


def capture(model, image_shape, batch: int = 1) -> Graph:
  """The `Graph` of `model(x, train=False)` for `x` of shape `[batch, *image_shape]` (abstract)."""
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  out = {}
  with recording(model) as rec:
    def run(x):
      rec.bind(x, "input")
      y = model(x, train=False)
      out["name"] = rec.name(y)
      return y

    y = jax.eval_shape(run, x)
  return Graph(rec.nodes, out["name"], tuple(y.shape))
