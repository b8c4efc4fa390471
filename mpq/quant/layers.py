"""Quantized layers and the `QuantLayers` factory that builds them in place of the float ones.

Quantized layers keep the float layers' parameter names (`linear.kernel`, `conv.kernel`, `bn.scale`,
...), so a float checkpoint initialises them (`init_from`); their quantizers sit beside them as
`wq` (weight) and `aq` (input activation), `aq_a`/`aq_b` for additions.

Quantized forms (what the integer exporter reproduces):
  QuantDense    `y = Q_a(x) @ Q_w(W) + b`
  QuantConvBN   BatchNorm folded into the conv (Jacob et al. 2017), `sigma = sqrt(var_ema + eps)`:
                  w_fold = W * gamma / sigma,  y_q = conv(Q_a(x), Q_w(w_fold))
                  frozen / eval:  y = y_q + (beta - gamma * mean_ema / sigma)
                  training before `bn_freeze_step`:  y_raw = y_q * sigma / gamma (the unfolded conv
                  output), then BatchNorm with batch statistics of y_raw, updating the EMA; this is
                  Jacob et al.'s correction `sigma_ema / sigma_batch` applied with one convolution.
  QuantConv     `y = conv(Q_a(x), Q_w(W)) + b`, the bias optional, 'SAME' or 'VALID' padding.
  Evaluation (dense and conv layers) sums the products on the integer grids and rounds the bias to
  the int32 grid `s_in * s_w` (`_evaluate`, `integer_form`): it computes what the exported model
  computes. A per-channel input quantizer (`a_per_channel`) has no single `s_in`: such a layer
  evaluates in the float form `Q_a(x) Q_w(W) + b` and is not exportable.
  QuantAdd      `y = Q_a(a) + Q_b(b)`: both inputs on their own signed grids, summed; in integer
                form both inputs are rescaled to a common fine grid and added (TFLite's ADD).
  pooling       float layers: max pooling commutes with the monotone quantizer that follows it
                (exported on the integers); global average pooling is an integer sum rescaled
                into the next layer's input grid, whose quantizer rounds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mpq import layers as float_layers
from mpq.errors import UserError
from mpq.layers import Layer, check_activation, check_padding, flat
from mpq.quant import core
from mpq.quant.oscillation import Oscillation
from mpq.quant.quantizer import Quantizer

_he = nnx.initializers.he_normal()


@dataclasses.dataclass(frozen=True)
class LayerQuant:
  """Resolved quantization settings of one layer."""
  w_bits: float = 8
  a_bits: float = 8
  estimator: str = "lsq"
  a_per_channel: bool = False  # one activation scale per input channel (the last axis)
  # (scale, zero point) of the pixel grid: the layer reads the model input, whose grid is fixed
  # (`mpq.quant.methods.Pixel`) instead of `a_bits` / `estimator`
  input_grid: tuple | None = None


@dataclasses.dataclass(frozen=True)
class QuantOptions:
  """Settings shared by every quantized layer (from the `quant` config section)."""
  bn_freeze_step: int = -1  # training calls after which BatchNorm uses its EMA statistics (-1: never)
  ema_decay: float = 0.99
  noise_lambda0: float = 0.5
  noise_tau: float = 1000.0
  noise_rng: str = "hash"  # the noise estimator's U(-1, 1): 'hash' or 'threefry'
  bypass: bool = False  # build every quantizer as identity (evaluate a QAT checkpoint in float)
  osc_track: bool = False  # track integer-weight oscillations (Nagel et al. 2022)
  osc_freeze: float = 0.0  # freeze weights whose oscillation frequency exceeds this (0: off)
  osc_momentum: float = 0.01
  osc_dampen: bool = False  # record the dampening term (its loss weight is the train step's)


def _quantizer(name, role, lq: LayerQuant, opts: QuantOptions, **kw):
  bits = lq.w_bits if role == "weight" else lq.a_bits
  in_channels = kw.pop("in_channels", None)
  if role == "act" and lq.a_per_channel and in_channels is not None:
    kw["act_channels"] = in_channels  # dense/conv inputs; additions stay per tensor
  osc = Oscillation(track=opts.osc_track, freeze=opts.osc_freeze, momentum=opts.osc_momentum,
                    dampen=opts.osc_dampen)
  estimator = lq.estimator
  if role == "act" and lq.input_grid is not None:
    estimator, kw["grid"] = "pixel", tuple(lq.input_grid)
    kw.pop("act_channels", None)
  return Quantizer(name, role, estimator, bits, ema_decay=opts.ema_decay,
                   noise_lambda0=opts.noise_lambda0, noise_tau=opts.noise_tau, noise_rng=opts.noise_rng,
                   bypass=opts.bypass, oscillation=osc, **kw)


def integer_form(aq, wq, w, w_q, b):
  """`(input grid, weight grid, integer weight, integer bias)` of a dense/conv layer at evaluation,
  or None when a quantizer does not evaluate on an integer grid. `w` is the (folded) float weight,
  `w_q = wq(w)` its fake-quantized value; the bias is rounded to the int32 grid `s_in * s_w`.
  Evaluation (`_evaluate`) and the exporter both use this, so they hold the same integers."""
  gi, gw = aq.integer_grid(), wq.integer_grid(w)
  if gi is None or gw is None or jnp.size(gi["scale"]) > 1:  # per-channel inputs: no integer form
    return None
  w_int = core.round_half_up(w_q / gw["scale"])
  bias = core.round_half_up(b / (gi["scale"] * gw["scale"].reshape(-1)))
  return gi, gw, w_int, bias


def _evaluate(aq, wq, w, w_q, xq, b, op):
  """`op(xq, w_q) + b` at evaluation, computed the way the integer model computes it.

  With `s_in`, `s_w` the grids' scales (`s_w` per output channel), the layer evaluates
  `(op(xq / s_in, w_int) + b_int) * s_in s_w`: the products are summed on the integers (exact in
  float32 below 2^24) and the bias is the exported int32 bias (`integer_form`). The plain float form
  differs from the integer model by the bias rounding (up to half a unit of `s_in s_w`) and by the
  float summation order; both move values that lie near a rounding boundary of the next
  quantizer, and deep networks amplify those one-LSB differences.
  """
  form = integer_form(aq, wq, w, w_q, b)
  if form is None:
    return op(xq, w_q) + b
  gi, gw, w_int, bias = form
  acc = op(core.round_half_up(xq / gi["scale"]), w_int)
  return (acc + bias) * (gi["scale"] * gw["scale"].reshape(-1))


class QuantDense(Layer):
  kind, quantized = "dense", True

  def __init__(self, name, in_features, out_features, lq: LayerQuant, opts: QuantOptions, *,
               signed_input=True, flatten=True, activation=None, rngs):
    self.name, self.activation, self.flatten = name, check_activation(activation), flatten
    self.linear = nnx.Linear(in_features, out_features, rngs=rngs)
    self.wq = _quantizer(name, "weight", lq, opts, channels=out_features, ndim=2,
                         kernel_shape=(in_features, out_features))
    self.aq = _quantizer(name, "act", lq, opts, signed=signed_input, in_channels=in_features)

  def __call__(self, x, train: bool = False):
    xq = self.aq(flat(x, self.flatten), train)
    kernel, bias = self.linear.kernel.value, self.linear.bias.value
    w = self.wq(kernel, train)
    if train:
      y = xq @ w + bias
    else:
      y = _evaluate(self.aq, self.wq, kernel, w, xq, bias, jnp.matmul)
    return self._emit([x], y)


def _conv(conv: nnx.Conv, padding: str, x, w):
  """`conv`'s convolution of `x` with the kernel `w` (NHWC, HWIO), no bias."""
  strides = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(conv.strides)
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      feature_group_count=conv.feature_group_count,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class QuantConv(Layer):
  """`y = conv(Q_a(x), Q_w(W)) + b` (the bias optional); evaluation sums on the integer grids."""
  kind, quantized = "conv", True

  def __init__(self, name, in_features, out_features, kernel, stride, groups, lq: LayerQuant,
               opts: QuantOptions, *, padding="SAME", use_bias=True, signed_input=True,
               activation=None, rngs):
    self.name, self.activation = name, check_activation(activation)
    self.padding = check_padding(name, padding)
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride,
                         padding=padding, feature_group_count=groups, use_bias=use_bias,
                         kernel_init=_he, rngs=rngs)
    self.wq = _quantizer(name, "weight", lq, opts, channels=out_features, ndim=4,
                         kernel_shape=(kernel, kernel, in_features // groups, out_features))
    self.aq = _quantizer(name, "act", lq, opts, signed=signed_input, in_channels=in_features)

  def weights(self):
    """(kernel, bias), the bias zeros without `use_bias`."""
    k = self.conv.kernel.value
    b = self.conv.bias.value if self.conv.use_bias else jnp.zeros((k.shape[-1],), k.dtype)
    return k, b

  def _conv(self, x, w):
    return _conv(self.conv, self.padding, x, w)

  def __call__(self, x, train: bool = False):
    kernel, bias = self.weights()
    xq, w = self.aq(x, train), self.wq(kernel, train)
    if train:
      y = self._conv(xq, w) + bias
    else:
      y = _evaluate(self.aq, self.wq, kernel, w, xq, bias, self._conv)
    return self._emit([x], y)


class QuantConvBN(Layer):
  kind, quantized = "conv_bn", True

  def __init__(self, name, in_features, out_features, kernel, stride, groups, lq: LayerQuant,
               opts: QuantOptions, *, padding="SAME", signed_input=True, activation=None, rngs):
    self.name, self.activation = name, check_activation(activation)
    self.padding = check_padding(name, padding)
    self.conv = nnx.Conv(in_features, out_features, (kernel, kernel), strides=stride, padding=padding,
                         feature_group_count=groups, use_bias=False, kernel_init=_he, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.wq = _quantizer(name, "weight", lq, opts, channels=out_features, ndim=4,
                         kernel_shape=(kernel, kernel, in_features // groups, out_features))
    self.aq = _quantizer(name, "act", lq, opts, signed=signed_input, in_channels=in_features)
    if opts.osc_freeze > 0 and opts.bn_freeze_step < 0:
      # A frozen weight is an integer times the step size of the *folded* kernel, so it does not
      # scale with gamma / sigma; the batch statistics of the unfolded output `y sigma / gamma`
      # then follow 1 / gamma, the EMA variance feeds back through sigma, and the statistics
      # overflow (NaN after ~230 steps on the cnn at W2A2). With frozen statistics no unfolding
      # happens.
      raise UserError(f"layer {name!r}: quant.osc_freeze={opts.osc_freeze} needs BatchNorm "
                      "statistics frozen first; set --config.quant.bn_freeze_step=0 (or the step "
                      "after which to freeze them, before any weight freezes)")
    self.bn_freeze_step = opts.bn_freeze_step
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def folded(self):
    """(folded kernel, folded bias, sigma) from the EMA statistics."""
    bn = self.bn
    sigma = jnp.sqrt(bn.var.value + bn.epsilon)
    gamma = bn.scale.value
    w = self.conv.kernel.value * (gamma / sigma)
    b = bn.bias.value - gamma * bn.mean.value / sigma
    return w, b, sigma

  def _conv(self, x, w):
    return _conv(self.conv, self.padding, x, w)

  def __call__(self, x, train: bool = False):
    return self._emit([x], self._forward(x, train))

  def _forward(self, x, train):
    w_fold, b_fold, sigma = self.folded()
    xq = self.aq(x, train)
    wq = self.wq(w_fold, train)
    if not train:
      return _evaluate(self.aq, self.wq, w_fold, wq, xq, b_fold, self._conv)
    y = self._conv(xq, wq)
    bn = self.bn
    gamma = bn.scale.value
    self.calls.value = self.calls.value + 1
    frozen = (self.bn_freeze_step >= 0) & (self.calls.value > self.bn_freeze_step)
    # Both branches are per-channel affine maps of `y`, so the output is one pass `y * a + c`:
    #   frozen:  a = 1, c = b_fold
    #   batch:   y_raw = y * r (r = sigma / gamma) has mean `mean(y) r` and variance `var(y) r^2`;
    #            (y_raw - mu) / sqrt(var + eps) * gamma + beta = (y - mean(y)) * a + beta with
    #            a = gamma r / sqrt(var + eps).
    # The unfolded tensor y_raw is never formed (it would cost passes over the conv output).
    safe_gamma = jnp.where(jnp.abs(gamma) < 1e-6, jnp.where(gamma < 0, -1e-6, 1e-6), gamma)
    r = sigma / safe_gamma
    mean_y = jnp.mean(y, axis=(0, 1, 2))  # one pass, as nnx.BatchNorm (use_fast_variance)
    var_y = jnp.maximum(jnp.mean(jnp.square(y), axis=(0, 1, 2)) - jnp.square(mean_y), 0.0)
    mu, var = mean_y * r, var_y * jnp.square(r)
    m = bn.momentum
    bn.mean.value = jnp.where(frozen, bn.mean.value, m * bn.mean.value + (1 - m) * mu)
    bn.var.value = jnp.where(frozen, bn.var.value, m * bn.var.value + (1 - m) * var)
    a_batch = gamma * r * jax.lax.rsqrt(var + bn.epsilon)
    a = jnp.where(frozen, 1.0, a_batch)
    c = jnp.where(frozen, b_fold, bn.bias.value - mean_y * a_batch)
    return y * a + c


class QuantAdd(Layer):
  kind, quantized = "add", True

  def __init__(self, name, lq: LayerQuant, opts: QuantOptions, activation=None):
    self.name, self.activation = name, check_activation(activation)
    self.aq_a = _quantizer(name + "/a", "act", lq, opts, signed=True)
    self.aq_b = _quantizer(name + "/b", "act", lq, opts, signed=True)

  def __call__(self, a, b, train: bool = False):
    return self._emit([a, b], self.aq_a(a, train) + self.aq_b(b, train))


class QuantLayers:
  """Factory of quantized layers; `table` maps each dense/conv/add layer path to its `LayerQuant`
  (from `mpq.quant.rules.resolve`). Pooling layers stay float (see the module docstring)."""

  def __init__(self, table: dict[str, LayerQuant], opts: QuantOptions = QuantOptions()):
    self.table, self.opts = table, opts

  def _lq(self, name):
    if name not in self.table:
      raise KeyError(f"layer {name!r} has no resolved quantization settings")
    return self.table[name]

  def dense(self, name, in_features, out_features, *, signed_input=True, flatten=True,
            activation=None, rngs):
    return QuantDense(name, in_features, out_features, self._lq(name), self.opts,
                      signed_input=signed_input, flatten=flatten, activation=activation, rngs=rngs)

  def conv(self, name, in_features, out_features, kernel, stride=1, groups=1, *, padding="SAME",
           use_bias=True, signed_input=True, activation=None, rngs):
    return QuantConv(name, in_features, out_features, kernel, stride, groups, self._lq(name),
                     self.opts, padding=padding, use_bias=use_bias, signed_input=signed_input,
                     activation=activation, rngs=rngs)

  def conv_bn(self, name, in_features, out_features, kernel, stride=1, groups=1, *,
              padding="SAME", signed_input=True, activation=None, rngs):
    return QuantConvBN(name, in_features, out_features, kernel, stride, groups, self._lq(name),
                       self.opts, padding=padding, signed_input=signed_input,
                       activation=activation, rngs=rngs)

  def add(self, name, activation=None):
    return QuantAdd(name, self._lq(name), self.opts, activation)

  def avg_pool(self, name, axes=(1, 2)):
    return float_layers.GlobalAvgPool(name, axes)

  def max_pool(self, name, window=2):
    return float_layers.MaxPool(name, window)
