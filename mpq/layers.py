"""Layer factories: the single place where models get their dense, conv, add and pool layers.

Models never construct `nnx.Linear`/`nnx.Conv` directly; they call a factory with the layer's stable
path name (e.g. `stage1/block0/conv1`), so that quantized layers can replace float ones by passing
another factory, and so that configs (regex rules) and exports refer to layers by that name. The
name is stored on the layer (`layer.name`) and equals its path in the module tree joined with `/`
(checked by `mpq.models.layer_table`).

Every layer is called as `layer(x, train)`. `signed_input` tells a factory whether the layer's input
can be negative (False after a ReLU): float layers ignore it; quantized layers pick a signed or an
unsigned activation quantizer from it. `activation` (dense, conv, add) names a registered
activation (`relu`, `relu6`, ...; `mpq.ops`) applied to the layer's output; it is recorded as its
own node of the graph (`mpq.graph`), which is how the exporter and the cost model see every op.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mpq.ops import registry as op_registry

_he = nnx.initializers.he_normal()


class Layer(nnx.Module):
  """Base of every factory-made layer: `name` is its stable path, `kind` its registered op kind
  (`mpq.ops`), `activation` an optional registered activation applied to its output.

  While `mpq.graph.recording(model)` runs, `recorder` is set and `_emit` records the layer's op and
  its activation as graph nodes; otherwise it is None and recording costs nothing."""
  name: str
  kind: str = "layer"
  activation: str | None = None
  quantized: bool = False  # True for layers with quantizers (`mpq.quant.layers`)
  recorder = None

  def _emit(self, inputs, y, **attrs):
    """Records this layer's op (`kind`) on `inputs` -> `y`, applies the activation (recorded as
    its own node) and returns the layer's output."""
    rec = self.recorder
    if rec is not None:
      rec.record(self.kind, self, inputs, y, **attrs)
    if self.activation is None:
      return y
    z = op_registry.activation(self.activation).apply(y)
    if rec is not None:
      rec.record(self.activation, self, [y], z)
    return z


def check_activation(name: str | None) -> str | None:
  if name is not None:
    op_registry.activation(name)  # raises for a name no activation entry defines
  return name


def flat(x, flatten: bool):
  """A dense layer's input: row-major flattened to `[B, features]`, or as it is (`flatten=False`:
  the layer contracts the last axis, per token / per position)."""
  return x.reshape(x.shape[0], -1) if flatten else x


class Dense(Layer):
  """`y = x W + b` over the last axis; `flatten` (the default) first flattens `[B, H, W, C]` inputs
  row-major to `[B, H W C]`, `flatten=False` keeps the leading axes (a per-token projection)."""
  kind = "dense"

  def __init__(self, name: str, in_features: int, out_features: int, *, flatten: bool = True,
               activation=None, rngs: nnx.Rngs):
    self.name, self.activation, self.flatten = name, check_activation(activation), flatten
    self.linear = nnx.Linear(in_features, out_features, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self._emit([x], self.linear(flat(x, self.flatten)))


PADDINGS = ("SAME", "VALID")


def check_padding(name: str, padding: str) -> str:
  if padding not in PADDINGS:
    raise ValueError(f"layer {name!r}: padding={padding!r}; use one of {PADDINGS}")
  return padding


class Conv(Layer):
  """2-D convolution over NHWC with an optional bias (`use_bias`), `padding` 'SAME' or 'VALID';
  `groups == in_features` makes it depthwise."""
  kind = "conv"

  def __init__(self, name: str, in_features: int, out_features: int, kernel: int, stride: int = 1,
               groups: int = 1, *, padding: str = "SAME", use_bias: bool = True, activation=None,
               rngs: nnx.Rngs):
    self.name, self.activation = name, check_activation(activation)
    self.padding = check_padding(name, padding)
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                         padding=padding, feature_group_count=groups, use_bias=use_bias,
                         kernel_init=_he, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self._emit([x], self.conv(x))


class ConvBN(Layer):
  """Convolution (no bias) followed by BatchNorm, `padding` 'SAME' or 'VALID'; `groups ==
  in_features` makes it depthwise."""
  kind = "conv_bn"

  def __init__(self, name: str, in_features: int, out_features: int, kernel: int, stride: int = 1,
               groups: int = 1, *, padding: str = "SAME", activation=None, rngs: nnx.Rngs):
    self.name, self.activation = name, check_activation(activation)
    self.padding = check_padding(name, padding)
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride, padding=padding,
                         feature_group_count=groups, use_bias=False, kernel_init=_he, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs)

  def __call__(self, x, train: bool = False):
    return self._emit([x], self.bn(self.conv(x), use_running_average=not train))


class Add(Layer):
  """Residual addition `a + b` (a layer so that its quantized form has a name and a place)."""
  kind = "add"

  def __init__(self, name: str, activation=None):
    self.name, self.activation = name, check_activation(activation)

  def __call__(self, a, b, train: bool = False):
    return self._emit([a, b], a + b)


class GlobalAvgPool(Layer):
  """Mean over `axes` (default the spatial axes: [B, H, W, C] -> [B, C]; `(1,)` averages the
  tokens of [B, T, C])."""
  kind = "avg_pool"

  def __init__(self, name: str, axes=(1, 2)):
    self.name, self.axes = name, tuple(int(a) for a in axes)
    if not self.axes or 0 in self.axes or any(a < 0 for a in self.axes):
      raise ValueError(f"layer {name!r}: axes={axes!r} must be positive (axis 0 is the batch)")

  def __call__(self, x, train: bool = False):
    return self._emit([x], jnp.mean(x, axis=self.axes))


class MaxPool(Layer):
  """Max over non-overlapping `window` x `window` patches (stride = window, VALID padding).

  Written as crop + reshape + max rather than `lax.reduce_window`: on XLA CPU the gradient of
  `reduce_window` max (select-and-scatter) is about 9x slower than that of a reshaped max.
  """
  kind = "max_pool"

  def __init__(self, name: str, window: int = 2):
    self.name = name
    self.window = window

  def __call__(self, x, train: bool = False):
    w = self.window
    b, h, wd, c = x.shape
    h, wd = h // w, wd // w
    return self._emit([x], x[:, :h * w, :wd * w].reshape(b, h, w, wd, w, c).max(axis=(2, 4)))


class FloatLayers:
  """The float factory. A quantized factory has the same methods and returns quantized layers."""

  def dense(self, name, in_features, out_features, *, signed_input=True, flatten=True,
            activation=None, rngs):
    del signed_input
    return Dense(name, in_features, out_features, flatten=flatten, activation=activation,
                 rngs=rngs)

  def conv(self, name, in_features, out_features, kernel, stride=1, groups=1, *, padding="SAME",
           use_bias=True, signed_input=True, activation=None, rngs):
    del signed_input
    return Conv(name, in_features, out_features, kernel, stride, groups, padding=padding,
                use_bias=use_bias, activation=activation, rngs=rngs)

  def conv_bn(self, name, in_features, out_features, kernel, stride=1, groups=1, *,
              padding="SAME", signed_input=True, activation=None, rngs):
    del signed_input
    return ConvBN(name, in_features, out_features, kernel, stride, groups, padding=padding,
                  activation=activation, rngs=rngs)

  def add(self, name, activation=None):
    return Add(name, activation)

  def avg_pool(self, name, axes=(1, 2)):
    return GlobalAvgPool(name, axes)

  def max_pool(self, name, window=2):
    return MaxPool(name, window)
