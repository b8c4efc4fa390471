"""The general layer contract: convolutions with VALID or SAME padding, with or without bias and
BatchNorm; dense layers over the last axis (per token) or over the flattened input; average pooling
over chosen axes. Each runs float -> fake-quant -> export -> integer executor, and the integer
logits equal the fake-quant logits (in output LSBs); costs follow the shapes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mpq import export, graph, intexec, models
from mpq.layers import FloatLayers
from mpq.quant import calibrate
from mpq.quant.layers import LayerQuant, QuantLayers


class PatchNet(nnx.Module):
  """A ViT-like stem on 28x28x1: a 4x4 stride-4 VALID conv with bias and no BatchNorm (7x7 tokens
  of 16 channels), a per-token dense (ReLU), a SAME conv with BatchNorm, average pooling over
  `pool_axes`, and a dense head over the flattened rest."""

  def __init__(self, layers, pool_axes, rngs):
    self.patch = layers.conv("patch", 1, 16, 4, 4, padding="VALID", use_bias=True,
                             signed_input=True, rngs=rngs)
    self.token = layers.dense("token", 16, 24, flatten=False, signed_input=True, activation="relu",
                              rngs=rngs)
    self.mix = layers.conv_bn("mix", 24, 24, 3, 1, padding="SAME", signed_input=False,
                              activation="relu", rngs=rngs)
    self.pool = layers.avg_pool("pool", pool_axes)
    rest = 24 * (7 if len(pool_axes) == 1 else 1)
    self.head = layers.dense("head", rest, 10, signed_input=False, rngs=rngs)

  def __call__(self, x, train=False):
    return self.head(self.pool(self.mix(self.token(self.patch(x, train), train), train), train),
                     train)


def _images(n=128):
  from mpq import data as data_lib
  d = data_lib.load("fashion_mnist", num_train=1, num_test=n)
  return np.asarray(next(iter(data_lib.eval_batches(d, n)))["image"])


def _quant(pool_axes, bits, estimator="lsq"):
  table = {p: LayerQuant(bits, bits, estimator) for p in ("patch", "token", "mix", "head")}
  return PatchNet(QuantLayers(table), pool_axes, nnx.Rngs(1))


def test_costs_follow_padding_bias_and_per_token_dense():
  m = PatchNet(FloatLayers(), (1, 2), nnx.Rngs(0))
  c = models.layer_costs(m, (28, 28, 1))
  assert c["patch"] == {"params": 4 * 4 * 16 + 16, "weights": 256, "macs": 7 * 7 * 16 * 16,
                        "in": [28, 28, 1], "out": [7, 7, 16]}
  assert c["token"] == {"params": 16 * 24 + 24, "weights": 384, "macs": 7 * 7 * 24 * 16,
                        "in": [7, 7, 16], "out": [7, 7, 24]}
  assert c["mix"]["macs"] == 7 * 7 * 24 * 9 * 24 and c["mix"]["params"] == 9 * 24 * 24
  assert c["head"]["in"] == [24]
  # float forward: the per-token dense is x @ W + b on every position
  x = jnp.asarray(_images(4))
  t = m.patch(x)
  ref = np.maximum(np.asarray(t) @ np.asarray(m.token.linear.kernel.value)
                   + np.asarray(m.token.linear.bias.value), 0)
  np.testing.assert_allclose(np.asarray(m.token(t)), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(m.pool(m.mix(m.token(t)))),
                             np.asarray(m.mix(m.token(t))).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool_axes,bits,estimator", [((1, 2), 8, "lsq"), ((1, 2), 4, "tqt"),
                                                      ((2,), 4, "lsq")])
def test_contract_layers_export_and_run_bit_for_bit(pool_axes, bits, estimator, tmp_path):
  x = _images()
  model = _quant(pool_axes, bits, estimator)
  calibrate(model, [x])
  kinds = [(n.kind, n.name) for n in graph.capture(model, (28, 28, 1)).nodes]
  assert ("conv", "patch") in kinds and ("conv_bn", "mix") in kinds
  manifest = export.export(model, (28, 28, 1), str(tmp_path))
  by_name = {op["name"]: op for op in manifest["ops"]}
  assert by_name["patch"]["padding"] == "VALID" and by_name["patch"]["stride"] == [4, 4]
  assert by_name["token"]["flatten"] is False and "flatten" not in by_name["head"]
  sum_pool = next(op for op in manifest["ops"] if op["op"] == "sum_pool")
  assert sum_pool.get("axes", [1, 2]) == list(pool_axes)
  m2, tensors = export.load(str(tmp_path))
  _, core, quantize = intexec.build(m2, tensors)
  acc = np.asarray(core(quantize(x)), np.int64)
  lsb = np.asarray(model(jnp.asarray(x), train=False), np.float64) / np.asarray(
      manifest["ops"][-1]["scale"])
  np.testing.assert_array_equal(np.round(lsb).astype(np.int64), acc)


def test_average_pooling_over_the_channel_axis_is_refused_at_export(tmp_path):
  class ChannelPool(nnx.Module):
    def __init__(self, layers, rngs):
      self.conv = layers.conv("conv", 1, 8, 3, 1, signed_input=True, rngs=rngs)
      self.pool = layers.avg_pool("pool", (3,))
      self.head = layers.dense("head", 28 * 28, 10, signed_input=True, rngs=rngs)

    def __call__(self, x, train=False):
      return self.head(self.pool(self.conv(x, train), train), train)

  table = {p: LayerQuant(8, 8, "lsq") for p in ("conv", "head")}
  model = ChannelPool(QuantLayers(table), nnx.Rngs(0))
  calibrate(model, [_images(8)])
  with pytest.raises(export.ExportError, match="'pool': average pooling over the channel axis"):
    export.export(model, (28, 28, 1), str(tmp_path))
