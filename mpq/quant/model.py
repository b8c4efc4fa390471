"""Building a quantized model from a config: rules resolved once against the float model's layers."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from mpq import graph as graph_lib
from mpq import models
from mpq.data.sources import pixel_grid
from mpq.ops.linear import Linear
from mpq.ops.registry import KINDS
from mpq.quant.layers import LayerQuant, QuantLayers, QuantOptions
from mpq.quant.quantizer import quantizers
from mpq.quant.rules import resolve


def options(qc, bypass: bool = False) -> QuantOptions:
  return QuantOptions(bn_freeze_step=int(qc.bn_freeze_step), ema_decay=float(qc.ema_decay),
                      noise_lambda0=float(qc.noise_lambda0), noise_tau=float(qc.noise_tau),
                      noise_rng=str(qc.noise_rng),
                      bypass=bypass, osc_track=bool(qc.osc_track), osc_freeze=float(qc.osc_freeze),
                      osc_momentum=float(qc.osc_momentum), osc_dampen=qc.osc_dampen > 0)


def resolve_table(config, num_classes: int, image_shape) -> dict[str, LayerQuant]:
  """The per-layer settings of `config.quant` for `config.model`."""
  float_model = models.build(config.model, num_classes, image_shape, seed=config.seed,
                             **config.model_kwargs.to_dict())
  layers = models.layer_table(float_model)
  kinds = {p: layer.kind for p, layer in layers.items()}
  qc = config.quant
  table = resolve(kinds, list(qc.rules), {"w_bits": qc.w_bits, "a_bits": qc.a_bits,
                                          "estimator": qc.estimator,
                                          "a_per_channel": bool(qc.get("a_per_channel", False))})
  if config.get("input_norm", "pixel") == "pixel":
    grid = pixel_grid(config.dataset, image_shape[-1])
    for path in input_layers(float_model, layers, image_shape):
      table[path] = dataclasses.replace(table[path], a_bits=8.0, input_grid=grid)
  return table


def input_layers(model, layers: dict, image_shape) -> list[str]:
  """Paths of the dense/conv layers that read the model input (their input quantizer is the pixel
  grid with `input_norm='pixel'`)."""
  path_of = {id(layer): p for p, layer in layers.items()}
  graph = graph_lib.capture(model, image_shape)
  return [path_of[id(n.layer)] for n in graph.nodes
          if n.inputs[:1] == ("input",) and isinstance(KINDS.get(n.kind), Linear)
          and id(n.layer) in path_of]


def build(config, num_classes: int, image_shape, bypass: bool = False):
  """(quantized model, resolved table). `bypass=True` builds every quantizer as identity."""
  table = resolve_table(config, num_classes, image_shape)
  model = models.build(config.model, num_classes, image_shape, seed=config.seed,
                       layers=QuantLayers(table, options(config.quant, bypass)),
                       **config.model_kwargs.to_dict())
  return model, table


def current_bits(model: nnx.Module) -> dict[str, dict[str, float]]:
  """`{layer: {"w_bits": b, "a_bits": b}}` read from the model's quantizers (dbits: the integer bits
  it evaluates at)."""
  out: dict[str, dict[str, float]] = {}
  for layer, q in quantizers(model):
    if q.method.quantizes:
      key = "w_bits" if q.role == "weight" else "a_bits"
      out.setdefault(layer, {})[key] = float(jax.device_get(q.int_bits()))
  return out


def bits_table(model: nnx.Module, table: dict[str, LayerQuant], image_shape) -> dict[str, dict]:
  """`{layer: {"w_bits", "a_bits", "estimator", "params", "macs"}}` (bits as currently held)."""
  costs = models.layer_costs(model, image_shape)
  bits = current_bits(model)
  out = {}
  for path, lq in table.items():
    b = bits.get(path, {})
    out[path] = {"w_bits": _num(b.get("w_bits", lq.w_bits)), "a_bits": _num(b.get("a_bits", lq.a_bits)),
                 "estimator": lq.estimator, "params": costs.get(path, {}).get("params", 0),
                 "macs": costs.get(path, {}).get("macs", 0)}
  return out


def _num(b: float):
  return int(b) if float(b).is_integer() else round(float(b), 4)
