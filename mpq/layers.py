"""Layer factories: the single place where models get their dense, conv, add and pool layers.

Models never construct `nnx.Linear`/`nnx.Conv` directly; they call a factory with the layer's stable
path name (e.g. `stage1/block0/conv1`), so that quantized layers can replace float ones by passing
another factory, and so that configs (regex rules) and exports refer to layers by that name. The
name is stored on the layer (`layer.name`) and equals its path in the module tree joined with `/`
(checked by `mpq.models.layer_table`).

Every layer is called as `layer(x, train)`. `signed_input` tells a factory whether the layer's input
can be negative (False after a ReLU): float layers ignore it; quantized layers pick a signed or an
unsigned activation quantizer from it.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_he = nnx.initializers.he_normal()
_recorders: list[dict] = []


@contextlib.contextmanager
def record_costs():
  """Within the block, every dense/conv call records
  `{name: {"params", "weights" (kernel elements), "macs", "in", "out"}}`
  into the yielded dict (used with `jax.eval_shape` by `mpq.models.layer_costs`)."""
  table: dict = {}
  _recorders.append(table)
  try:
    yield table
  finally:
    _recorders.remove(table)


_graphs: list[list] = []


@contextlib.contextmanager
def record_graph():
  """Within the block, every layer call and every `relu`/`relu6` appends
  `(kind, name, input arrays, output array)` to the yielded list, in call order (the exporter runs
  the model once under `jax.eval_shape` to get its op graph; tensors are matched by identity)."""
  ops: list = []
  _graphs.append(ops)
  try:
    yield ops
  finally:
    _graphs.remove(ops)


def note_op(kind: str, name: str, inputs, output) -> None:
  for g in _graphs:
    g.append((kind, name, tuple(inputs), output))


def recorded(call):
  """Decorates a layer's `__call__(self, *arrays, train)` so that `record_graph` sees it."""

  @functools.wraps(call)
  def wrapper(self, *args, **kwargs):
    out = call(self, *args, **kwargs)
    if _graphs:
      note_op(self.kind, self.name, [a for a in args if hasattr(a, "shape")], out)
    return out

  return wrapper


def note_cost(name: str, kernel_shape, x_shape, y_shape, params: int) -> None:
  """Records a layer call: MACs = output elements per example x kernel fan-in."""
  if not _recorders:
    return
  fan_in = int(np.prod(kernel_shape[:-1]))
  macs = int(np.prod(y_shape[1:])) * fan_in
  for t in _recorders:
    t[name] = {"params": int(params), "weights": int(np.prod(kernel_shape)), "macs": macs,
               "in": list(x_shape[1:]), "out": list(y_shape[1:])}


class Layer(nnx.Module):
  """Marker base of every factory-made layer; `name` is its stable path."""
  name: str
  kind: str = "layer"


class Dense(Layer):
  kind = "dense"

  def __init__(self, name: str, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.name = name
    self.linear = nnx.Linear(in_features, out_features, rngs=rngs)

  @recorded
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)  # [B, H, W, C] inputs are flattened row-major
    y = self.linear(x)
    note_cost(self.name, self.linear.kernel.value.shape, x.shape, y.shape,
              self.linear.kernel.value.size + self.linear.bias.value.size)
    return y


class ConvBN(Layer):
  """Convolution (no bias) followed by BatchNorm; `groups == in_features` makes it depthwise."""
  kind = "conv_bn"

  def __init__(self, name: str, in_features: int, out_features: int, kernel: int, stride: int = 1,
               groups: int = 1, *, rngs: nnx.Rngs):
    self.name = name
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride, padding="SAME",
                         feature_group_count=groups, use_bias=False, kernel_init=_he, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs)

  @recorded
  def __call__(self, x, train: bool = False):
    y = self.conv(x)
    note_cost(self.name, self.conv.kernel.value.shape, x.shape, y.shape, self.conv.kernel.value.size)
    return self.bn(y, use_running_average=not train)


class Add(Layer):
  """Residual addition `a + b` (a layer so that its quantized form has a name and a place)."""
  kind = "add"

  def __init__(self, name: str):
    self.name = name

  @recorded
  def __call__(self, a, b, train: bool = False):
    return a + b


class GlobalAvgPool(Layer):
  """Mean over the spatial axes: [B, H, W, C] -> [B, C]."""
  kind = "avg_pool"

  def __init__(self, name: str):
    self.name = name

  @recorded
  def __call__(self, x, train: bool = False):
    return jnp.mean(x, axis=(1, 2))


class MaxPool(Layer):
  """Max over non-overlapping `window` x `window` patches (stride = window, VALID padding).

  Written as crop + reshape + max rather than `lax.reduce_window`: on XLA CPU the gradient of
  `reduce_window` max (select-and-scatter) is about 9x slower than that of a reshaped max.
  """
  kind = "max_pool"

  def __init__(self, name: str, window: int = 2):
    self.name = name
    self.window = window

  @recorded
  def __call__(self, x, train: bool = False):
    w = self.window
    b, h, wd, c = x.shape
    h, wd = h // w, wd // w
    x = x[:, :h * w, :wd * w]
    return x.reshape(b, h, w, wd, w, c).max(axis=(2, 4))


class FloatLayers:
  """The float factory. A quantized factory has the same methods and returns quantized layers."""

  def dense(self, name, in_features, out_features, *, signed_input=True, rngs):
    del signed_input
    return Dense(name, in_features, out_features, rngs=rngs)

  def conv_bn(self, name, in_features, out_features, kernel, stride=1, groups=1, *,
              signed_input=True, rngs):
    del signed_input
    return ConvBN(name, in_features, out_features, kernel, stride, groups, rngs=rngs)

  def add(self, name):
    return Add(name)

  def avg_pool(self, name):
    return GlobalAvgPool(name)

  def max_pool(self, name, window=2):
    return MaxPool(name, window)


def relu(x):
  y = jax.nn.relu(x)
  note_op("relu", "relu", (x,), y)
  return y


def relu6(x):
  y = jax.nn.relu6(x)
  note_op("relu6", "relu6", (x,), y)
  return y
