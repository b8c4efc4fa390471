"""The op set is open: a new op kind added through the registry alone runs float -> fake-quant ->
export -> integer executor bit for bit, and ops the registry does not know name themselves.

The toy op kind is a per-token dense (`token_dense`): a dense layer over the last axis of an NHWC
tensor, `y[b, h, w, :] = x[b, h, w, :] W + bias`, defined only in this file: its float and
quantized layers, its cost, its lowering and its IR op (validation and int32 kernel).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_equal_but_for_near_ties
from mpq import export, graph, intexec, models, ops
from mpq.layers import Layer
from mpq.ops.linear import Linear, LinearIR, linear_cost
from mpq.quant import calibrate
from mpq.quant.layers import _evaluate
from mpq.quant.quantizer import Quantizer


# ----------------------------------------------------------------------------- the toy op kind
class TokenDense(Linear):
  name, ir = "token_dense", "token_dense"

  def weights(self, layer):
    return layer.linear.kernel.value, layer.linear.bias.value

  def cost(self, node):
    k, b = node.layer.linear.kernel.value, node.layer.linear.bias.value
    return linear_cost(node, k.shape, k.size + b.size, flatten=False)


class TokenDenseIR(LinearIR):
  name, conv = "token_dense", False

  def apply(self, op, a, b):
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                               preferred_element_type=jnp.int32)


ops.register(TokenDense(), TokenDenseIR())


class FloatTokenDense(Layer):
  kind = "token_dense"

  def __init__(self, name, cin, cout, *, activation=None, rngs):
    self.name, self.activation = name, activation
    self.linear = nnx.Linear(cin, cout, rngs=rngs)

  def __call__(self, x, train=False):
    return self._emit([x], self.linear(x))


class QuantTokenDense(FloatTokenDense):
  quantized = True

  def __init__(self, name, cin, cout, bits, *, activation=None, rngs):
    super().__init__(name, cin, cout, activation=activation, rngs=rngs)
    self.wq = Quantizer(name, "weight", "lsq", bits, channels=cout, ndim=2)
    self.aq = Quantizer(name, "act", "lsq", bits, signed=False)

  def __call__(self, x, train=False):
    xq = self.aq(x, train)
    kernel, bias = self.linear.kernel.value, self.linear.bias.value
    w = self.wq(kernel, train)
    y = xq @ w + bias if train else _evaluate(self.aq, self.wq, kernel, w, xq, bias, jnp.matmul)
    return self._emit([x], y)


class Toy(nnx.Module):
  """conv (ReLU) -> per-token dense (ReLU) -> max pool -> dense head, from the library's
  quantized factory plus the toy layer."""

  def __init__(self, factory, token_layer, rngs):
    self.conv = factory.conv_bn("conv", 1, 8, 3, 1, signed_input=True, activation="relu", rngs=rngs)
    self.tok = token_layer("tok", 8, 12, activation="relu", rngs=rngs)
    self.pool = factory.max_pool("pool", 2)
    self.head = factory.dense("head", 14 * 14 * 12, 10, signed_input=False, rngs=rngs)

  def __call__(self, x, train=False):
    return self.head(self.pool(self.tok(self.conv(x, train), train), train), train)


def _quant_toy(bits):
  from mpq.quant.layers import LayerQuant, QuantLayers
  table = {"conv": LayerQuant(bits, bits, "lsq"), "head": LayerQuant(bits, bits, "lsq")}
  token = lambda name, cin, cout, **kw: QuantTokenDense(name, cin, cout, bits, **kw)
  return Toy(QuantLayers(table), token, nnx.Rngs(0))


def _images(n=64):
  from mpq import data as data_lib
  d = data_lib.load("fashion_mnist", num_train=1, num_test=n)
  return np.asarray(next(iter(data_lib.eval_batches(d, n)))["image"])


@pytest.mark.parametrize("bits", [8, 4])
def test_toy_op_kind_runs_float_fake_quant_export_and_integer_bit_for_bit(bits, tmp_path):
  x = _images()
  float_toy = Toy(models.FloatLayers(), FloatTokenDense, nnx.Rngs(0))
  assert np.isfinite(np.asarray(float_toy(jnp.asarray(x)))).all()
  model = _quant_toy(bits)
  calibrate(model, [x])
  # the graph holds the toy op and its activation as nodes of their own
  kinds = [(n.kind, n.name) for n in graph.capture(model, (28, 28, 1)).nodes]
  assert ("token_dense", "tok") in kinds and ("relu", "tok") in kinds
  # its cost: 28 x 28 tokens (it runs before the pooling), 8 x 12 MACs each
  cost = models.layer_costs(model, (28, 28, 1))["tok"]
  assert cost["macs"] == 28 * 28 * 8 * 12 and cost["params"] == 8 * 12 + 12
  assert cost["in"] == [28, 28, 8] and cost["out"] == [28, 28, 12]
  fq = np.asarray(model(jnp.asarray(x), train=False))
  manifest = export.export(model, (28, 28, 1), str(tmp_path))
  assert "token_dense" in [op["op"] for op in manifest["ops"]]
  run, _, _ = intexec.build(*export.load(str(tmp_path)))
  # bit for bit but downstream of float32 near-ties (at bits=8: 1 value of 100,352 at tok's input)
  assert_equal_but_for_near_ties(model, tmp_path, x, np.asarray(run(x)), fq, max_images=0.02)


def test_manifest_validation_of_the_toy_op_is_its_own(tmp_path):
  import json
  model = _quant_toy(8)
  calibrate(model, [_images(8)])
  export.export(model, (28, 28, 1), str(tmp_path))
  path = tmp_path / "manifest.json"
  m = json.load(open(path))
  op = next(o for o in m["ops"] if o["op"] == "token_dense")
  op["weight_shape"] = [8, 12, 1]
  json.dump(m, open(path, "w"))
  with pytest.raises(export.ExportError, match="'tok' \\(token_dense\\): field 'weight_shape'"):
    export.load(str(tmp_path))


class Unregistered(Layer):
  kind = "mystery"

  def __init__(self, name):
    self.name = name

  def __call__(self, x, train=False):
    return self._emit([x], jnp.tanh(x))


class WithStrayOp(nnx.Module):
  def __init__(self, factory, stray, rngs):
    self.conv = factory.conv_bn("conv", 1, 8, 3, 1, signed_input=True, rngs=rngs)
    self.mystery = Unregistered("mystery")
    self.head = factory.dense("head", 28 * 28 * 8, 10, signed_input=True, rngs=rngs)
    self.stray = stray

  def __call__(self, x, train=False):
    y = self.conv(x, train)
    y = jnp.tanh(y) if self.stray else self.mystery(y, train)
    return self.head(y, train)


@pytest.mark.parametrize("stray,message", [
    (True, "layer 'head' (dense): its input comes from an operation that is not a registered op kind"),
    (False, "layer 'mystery': op kind 'mystery' is not registered"),
])
def test_unsupported_ops_name_themselves_and_the_layer(stray, message, tmp_path):
  from mpq.quant.layers import LayerQuant, QuantLayers
  table = {"conv": LayerQuant(8, 8, "lsq"), "head": LayerQuant(8, 8, "lsq")}
  model = WithStrayOp(QuantLayers(table), stray, nnx.Rngs(0))
  calibrate(model, [_images(8)])
  with pytest.raises(export.ExportError) as e:
    export.export(model, (28, 28, 1), str(tmp_path))
  text = str(e.value)
  assert "\n" not in text and message in text, text
