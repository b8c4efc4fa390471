"""`Quantizer`: the NNX module holding one tensor's quantizer state, calling the pure estimators.

Variable types (so optimizers, checkpoints and the exporter can select them):
  `QParam(nnx.Param)`     learned quantizer parameters (step size, log2 threshold, offset, amax,
                          gradient scale, continuous bits); trained by the optimizer, never decayed.
  `QState(nnx.Variable)`  quantizer state that is not trained: `bits`, EMA ranges, step counters.

Bits live in a `QState` (a float32 scalar) or, for `dbits`, in a `QParam`; both are arrays that enter
the jitted step as data, so assigning new bits (`set_bits`) never recompiles.

Estimators (`ESTIMATORS`), per role:
  none   identity (the layer stays float)
  ste    weights: symmetric per-channel scale from the current max|w|, narrow signed grid;
         activations: affine scale and zero point from an EMA of the batch min/max (Jacob et al. 2017)
  lsq    learned step size `s` with LSQ's gradient and gradient scale (Esser et al. 2019);
         `lsq+` adds a learned offset for signed activations (LSQ+)
  tqt    trained log2 threshold, power-of-2 scale (Jain et al. 2019)
  noise  `lsq` plus decaying error-aware noise in training and a learned scale `exp(rho)` of the
         step-size gradient (Wang et al. 2022, noise tempering)
  dbits  learned `amax` and continuous bits (Uhlich et al. 2020 / SDQ); evaluates at `round(bits)`
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq.quant import core
from mpq.quant import estimators as est

ESTIMATORS = ("none", "ste", "lsq", "lsq+", "tqt", "noise", "dbits")
OBSERVERS: list = []  # calibration hooks (`mpq.quant.calibration.observing`), called eagerly


class QParam(nnx.Param):
  """A learned quantizer parameter."""


class QState(nnx.Variable):
  """Quantizer state that is not trained (bits, EMA ranges, counters)."""


class Quantizer(nnx.Module):
  """Fake-quantizes one tensor: a layer's weight (`role='weight'`) or input (`role='act'`).

  Weights are quantized per output channel (the last kernel axis) with a symmetric signed grid;
  activations per tensor, unsigned when the input is non-negative (after ReLU), signed otherwise.
  """

  def __init__(self, name: str, role: str, estimator: str, bits: float, *, signed: bool = True,
               channels: int = 1, ndim: int = 4, ema_decay: float = 0.99, noise_lambda0: float = 0.0,
               noise_tau: float = 1000.0, bypass: bool = False):
    if estimator not in ESTIMATORS:
      raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    self.name, self.role, self.estimator = name, role, estimator
    self.bypass = bypass  # identity forward, same variables (evaluate a QAT checkpoint in float)
    self.signed = bool(signed) or role == "weight"
    self.ema_decay, self.noise_lambda0, self.noise_tau = ema_decay, noise_lambda0, noise_tau
    self.seed = zlib.crc32(f"{name}/{role}".encode()) & 0x7FFFFFFF
    shape = core.channel_shape(ndim, -1, channels) if role == "weight" else ()
    self.shape = shape
    bits = jnp.asarray(bits, jnp.float32)
    self.bits = QParam(bits) if estimator == "dbits" else QState(bits)
    self.count = QState(jnp.zeros((), jnp.int32))  # training calls so far
    if estimator == "ste" and role == "act":
      self.lo = QState(jnp.asarray(-1.0 if self.signed else 0.0))
      self.hi = QState(jnp.asarray(1.0))
    if estimator in ("lsq", "lsq+", "noise"):
      self.step_size = QParam(jnp.full(shape, 0.05, jnp.float32))
    if estimator == "lsq+" and role == "act" and self.signed:
      self.offset = QParam(jnp.zeros(shape, jnp.float32))
    if estimator == "noise":
      self.grad_log_scale = QParam(jnp.zeros((), jnp.float32))
    if estimator == "tqt":
      self.log2_t = QParam(jnp.zeros(shape, jnp.float32))
    if estimator == "dbits":
      self.amax = QParam(jnp.ones(shape, jnp.float32))

  # ------------------------------------------------------------------------------------ forward
  def int_bits(self) -> jax.Array:
    """The integer bitwidth used at evaluation (dbits: `round(bits)` clipped to [2, 16])."""
    return jnp.clip(jnp.round(self.bits.value), core.MIN_BITS, core.MAX_BITS)

  def _per_scale(self, x) -> float:
    """Elements sharing one scale: per channel for weights, per example for activations."""
    if self.role == "weight":
      return x.size / max(int(np.prod(self.shape)), 1)
    return x.size / x.shape[0]

  def __call__(self, x, train: bool = False):
    e = self.estimator
    if e == "none" or self.bypass:
      return x
    if OBSERVERS:
      for fn in OBSERVERS:
        fn(self, x)
      return x
    if train:
      self.count.value = self.count.value + 1
    if e == "dbits":
      bits = self.bits.value if train else self.int_bits()
      n_, p = core.qrange(jnp.floor(jnp.clip(bits, 2, 16)), self.signed, narrow=self.signed)
      g = est.lsq_grad_scale(self._per_scale(x), p)
      return est.dbits(x, self.amax.value, bits, self.signed, g)
    bits = self.bits.value
    if e == "ste":
      return self._ste(x, bits, train)
    if e == "tqt":
      return est.tqt(x, self.log2_t.value, bits, self.signed)
    n, p = core.qrange(bits, self.signed)
    g = est.lsq_grad_scale(self._per_scale(x), p)
    if e == "noise":
      g = g * jnp.exp(self.grad_log_scale.value)
    s = est.scale_grad(self.step_size.value, g)
    if e == "lsq+" and hasattr(self, "offset"):
      return est.lsq_plus(x, s, self.offset.value, n, p)
    y = est.lsq(x, s, n, p)
    if e == "noise" and train and self.noise_lambda0 > 0:
      amp = est.noise_amplitude(self.count.value, self.noise_lambda0, self.noise_tau)
      key = jax.random.fold_in(jax.random.key(self.seed), self.count.value)
      y = est.noisy(y, x, amp, key)
    return y

  def _ste(self, x, bits, train):
    if self.role == "weight":
      amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x)), axis=tuple(range(x.ndim - 1)),
                     keepdims=True).reshape(self.shape)
      return core.fake_quant(x, core.symmetric_scale(amax, bits), 0.0, bits, True, narrow=True)
    if train:
      xs = jax.lax.stop_gradient(x)
      lo, hi = jnp.min(xs), jnp.max(xs)
      d = self.ema_decay  # the range starts from calibration (`set_range`), then follows the EMA
      self.lo.value = d * self.lo.value + (1 - d) * lo
      self.hi.value = d * self.hi.value + (1 - d) * hi
    scale, zp = core.affine_params(self.lo.value, self.hi.value, bits)
    return core.fake_quant(x, scale, zp, bits, signed=False)

  # ---------------------------------------------------------------------------- export & calibration
  def params(self) -> tuple[jax.Array, jax.Array, jax.Array, bool]:
    """(scale, zero_point, integer bits, signed) of the integer grid this quantizer evaluates on.

    For `ste` weights the scale depends on the weight: see `weight_params`.
    """
    e = self.estimator
    if e == "none":
      raise ValueError(f"{self.name}/{self.role} is not quantized")
    bits = self.int_bits()
    if e == "ste":
      scale, zp = core.affine_params(self.lo.value, self.hi.value, bits)
      return scale, zp, bits, False
    if e == "tqt":
      return est.tqt_scale(self.log2_t.value, bits, self.signed), jnp.zeros(()), bits, self.signed
    if e == "dbits":
      _, p = core.qrange(bits, self.signed, narrow=self.signed)
      return self.amax.value / p, jnp.zeros(()), bits, self.signed
    if e == "lsq+" and hasattr(self, "offset"):
      raise ValueError("lsq+ offsets are not integer zero points; export needs lsq, ste, tqt or dbits")
    return self.step_size.value, jnp.zeros(()), bits, self.signed

  def set_range(self, amax, lo=None) -> None:
    """Initialises the quantizer from a calibrated range (`amax`, per channel for weights).

    `lo` (activations, affine `ste` only) is the calibrated minimum; default `-amax` if signed else 0.
    """
    amax = jnp.maximum(jnp.asarray(amax, jnp.float32).reshape(self.shape), 1e-6)
    e = self.estimator
    bits = self.int_bits()
    if e == "ste":
      if self.role == "act":
        self.lo.value = jnp.asarray(lo if lo is not None else (-amax if self.signed else 0.0),
                                    jnp.float32)
        self.hi.value = amax
    elif e in ("lsq", "lsq+", "noise"):
      _, p = core.qrange(bits, self.signed)
      self.step_size.value = amax / p
    elif e == "tqt":
      self.log2_t.value = jnp.log2(amax)
    elif e == "dbits":
      self.amax.value = amax


def set_bits(model: nnx.Module, bits: dict[str, dict[str, float]]) -> None:
  """Assigns new bitwidths in place: `{layer_path: {"w_bits": b, "a_bits": b}}` (no recompilation:
  only array values change)."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Quantizer):
      layer = "/".join(str(k) for k in path[:-1])
      key = "w_bits" if module.role == "weight" else "a_bits"
      if layer in bits and key in bits[layer]:
        module.bits.value = jnp.asarray(bits[layer][key], jnp.float32)
