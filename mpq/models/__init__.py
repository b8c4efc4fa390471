"""Model registry and the layer table (stable path name -> layer) that configs and exports use."""

from __future__ import annotations

from flax import nnx

from mpq.errors import UserError
from mpq import graph as graph_lib
from mpq.layers import FloatLayers, Layer
from mpq.ops import registry as op_registry
from mpq.models.cnn import CNN
from mpq.models.mlp import MLP
from mpq.models.mobilenet import MobileNetV2
from mpq.models.resnet import ResNet

MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": lambda *a, **k: ResNet(*a, depth=20, **k),
    "mobilenet_v2": MobileNetV2,
}


def build(name: str, num_classes: int, image_shape, *, seed: int = 0, layers=None, **kwargs):
  """Builds model `name` with layers from `layers` (default: float); `kwargs` go to the model."""
  if name not in MODELS:
    raise UserError(f"unknown model {name!r}; use one of {sorted(MODELS)}")
  try:
    return MODELS[name](num_classes, tuple(image_shape), layers or FloatLayers(),
                        rngs=nnx.Rngs(seed), **kwargs)
  except TypeError as e:
    raise UserError(f"bad model_kwargs for {name!r}: {e}") from None


def layer_table(model: nnx.Module) -> dict[str, Layer]:
  """Every factory-made layer by its path (sorted by path); checks that names equal paths."""
  table = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Layer):
      p = "/".join(str(k) for k in path)
      if module.name != p:
        raise AssertionError(f"layer named {module.name!r} sits at path {p!r}")
      table[p] = module
  return table


def layer_costs(model: nnx.Module, image_shape) -> dict[str, dict]:
  """Per dense/conv layer: `{"params", "weights", "macs" (per example), "in", "out" (shapes)}`, from one
  abstract forward pass (`mpq.graph.capture`: no computation), each op kind's `cost`."""
  table = {}
  for node in graph_lib.capture(model, image_shape).nodes:
    cost = op_registry.kind(node.kind, where=f"layer {node.name!r}: ").cost(node)
    if cost is not None:
      table[node.name] = cost
  return dict(sorted(table.items()))
