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
TAPS: list = []  # comparison hooks: called with (quantizer, input, output); the forward is unchanged


def _positive(v):
  """Learned step sizes and ranges enter as `max(|v|, 1e-8)`: an optimizer step that carries one
  across zero (Adam moves it by about the learning rate whatever its size) must not flip or empty
  the grid."""
  return jnp.maximum(jnp.abs(v), 1e-8)


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
               noise_tau: float = 1000.0, noise_rng: str = "hash", bypass: bool = False,
               track_shape=None,
               osc_momentum: float = 0.01, osc_freeze: float = 0.0, osc_dampen: bool = False):
    if estimator not in ESTIMATORS:
      raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    self.name, self.role, self.estimator = name, role, estimator
    self.bypass = bypass  # identity forward, same variables (evaluate a QAT checkpoint in float)
    self.signed = bool(signed) or role == "weight"
    self.ema_decay, self.noise_lambda0, self.noise_tau = ema_decay, noise_lambda0, noise_tau
    if noise_rng not in est.NOISE_RNGS:
      raise ValueError(f"unknown noise_rng {noise_rng!r}; use one of {est.NOISE_RNGS}")
    self.noise_rng = noise_rng
    self.seed = zlib.crc32(f"{name}/{role}".encode()) & 0x7FFFFFFF
    shape = core.channel_shape(ndim, -1, channels) if role == "weight" else ()
    self.shape = shape
    bits = jnp.asarray(bits, jnp.float32)
    self.bits = QParam(bits) if estimator == "dbits" else QState(bits)
    if estimator == "dbits":  # > 0: an integer bitwidth fixed after rounding (mixed.method=dbits)
      self.fixed_bits = QState(jnp.zeros((), jnp.float32))
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
    # Oscillations (Nagel et al. 2022), weights only: `track_shape` (the kernel's shape) turns on
    # tracking of integer-weight oscillations; `osc_freeze > 0` freezes weights whose oscillation
    # frequency exceeds it; `osc_dampen` records the dampening term for the loss.
    self.osc_momentum, self.osc_freeze, self.osc_dampen = osc_momentum, osc_freeze, osc_dampen
    self.tracking = (role == "weight" and track_shape is not None
                     and estimator in ("ste", "lsq", "lsq+", "noise", "tqt"))
    if role == "weight" and estimator != "none":
      self.clip_frac = QState(jnp.zeros((), jnp.float32))
      self.damp = QState(jnp.zeros((), jnp.float32))
    if self.tracking:
      z = lambda: QState(jnp.zeros(track_shape, jnp.float32))  # distinct buffers (donation)
      self.prev_int, self.last_dir, self.osc_freq, self.int_ema = z(), z(), z(), z()
      self.frozen, self.frozen_int = z(), z()

  # ------------------------------------------------------------------------------------ forward
  def int_bits(self) -> jax.Array:
    """The integer bitwidth used at evaluation (dbits: the fixed bits once set, else `round(bits)`
    clipped to [2, 16])."""
    b = jnp.clip(jnp.round(self.bits.value), core.MIN_BITS, core.MAX_BITS)
    if self.estimator == "dbits":
      b = jnp.where(self.fixed_bits.value > 0, self.fixed_bits.value, b)
    return b

  def _per_scale(self, x) -> float:
    """Elements sharing one scale: per channel for weights, per example for activations."""
    if self.role == "weight":
      return x.size / max(int(np.prod(self.shape)), 1)
    return x.size / x.shape[0]

  def __call__(self, x, train: bool = False):
    y = self._forward(x, train)
    for fn in TAPS:
      fn(self, x, y)
    if self.role != "weight" or self.estimator == "none" or self.bypass or OBSERVERS:
      return y
    if train:
      y = self._weight_bookkeeping(x, y)
    if self.tracking and self.osc_freeze > 0:  # frozen weights, in training and evaluation
      s = self._grid(x)[0]
      y = jnp.where(self.frozen.value > 0, jax.lax.stop_gradient(self.frozen_int.value * s), y)
    return y

  def _grid(self, w):
    """(scale, n, p) of the weight grid at the current bits, without gradients (None for dbits)."""
    w = jax.lax.stop_gradient(w)
    e, bits = self.estimator, self.bits.value
    if e == "ste":
      amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True).reshape(self.shape)
      n, p = core.qrange(bits, True, narrow=True)
      return core.symmetric_scale(amax, bits), n, p
    if e == "tqt":
      n, p = core.qrange(bits, True)
      return est.tqt_scale(self.log2_t.value, bits, True), n, p
    if e in ("lsq", "lsq+", "noise"):
      n, p = core.qrange(bits, True)
      return jax.lax.stop_gradient(_positive(self.step_size.value)), n, p
    return None

  def _weight_bookkeeping(self, w, y):
    """Clipping fraction, the dampening term, oscillation tracking and freezing (Nagel et al. 2022).

    dampening     `mean ((stop_grad(s * w_int) - clip(w, s n, s p)) / s)^2`, the distance of each
                  latent weight to its grid point in LSBs (at most 1/4), averaged over the layer;
                  the train step adds the layers' sum with a weight annealed from 0
                  (`quant.osc_dampen`). Nagel et al. write the sum over weights in value units; on
                  the full cnn at W2A2 that sum (about 50, against a task loss of 0.4) went NaN
                  after about 200 steps, so mpq uses this scale-free mean.
    oscillation   `delta = w_int(t) - w_int(t-1)`; an oscillation is a non-zero change opposite to the
                  previous non-zero change; `f = m * osc + (1 - m) * f` per weight (m = osc_momentum)
    freezing      once `f > osc_freeze` a weight is fixed at round(EMA of its integer value) and
                  gets no gradient (applied in `__call__`, in training and evaluation)
    """
    grid = self._grid(w)
    if grid is None:
      return y
    s, n, p = grid
    v = jax.lax.stop_gradient(w) / s
    self.clip_frac.value = jnp.mean(((v < n) | (v > p)).astype(jnp.float32))
    if self.osc_dampen:
      self.damp.value = jnp.mean(jnp.square(
          (jax.lax.stop_gradient(y) - jnp.clip(w, s * n, s * p)) / s))
    if not self.tracking:
      return y
    w_int = jnp.clip(core.round_half_up(v), n, p)
    valid = self.count.value > 1
    if self.osc_freeze > 0:
      w_int = jnp.where(self.frozen.value > 0, self.frozen_int.value, w_int)
    delta = w_int - self.prev_int.value
    moved = delta != 0
    direction = jnp.sign(delta)
    osc = moved & (self.last_dir.value != 0) & (direction != self.last_dir.value)
    m = self.osc_momentum
    self.osc_freq.value = jnp.where(valid, m * osc + (1 - m) * self.osc_freq.value, 0.0)
    self.last_dir.value = jnp.where(valid & moved, direction, self.last_dir.value)
    self.int_ema.value = jnp.where(valid, m * w_int + (1 - m) * self.int_ema.value, w_int)
    self.prev_int.value = w_int
    if self.osc_freeze > 0:
      newly = (self.frozen.value == 0) & (self.osc_freq.value > self.osc_freeze)
      self.frozen_int.value = jnp.where(newly, jnp.round(self.int_ema.value), self.frozen_int.value)
      self.frozen.value = jnp.where(newly, 1.0, self.frozen.value)
    return y

  def _forward(self, x, train: bool):
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
      if train:  # once fixed, train at the fixed integer bits (no gradient to `bits`)
        bits = jnp.where(self.fixed_bits.value > 0, self.fixed_bits.value, bits)
      n_, p = core.qrange(jnp.floor(jnp.clip(bits, 2, 16)), self.signed, narrow=self.signed)
      g = est.lsq_grad_scale(self._per_scale(x), p)
      return est.dbits(x, _positive(self.amax.value), bits, self.signed, g)
    bits = self.bits.value
    if e == "ste":
      return self._ste(x, bits, train)
    if e == "tqt":
      return est.tqt(x, self.log2_t.value, bits, self.signed)
    n, p = core.qrange(bits, self.signed)
    g = est.lsq_grad_scale(self._per_scale(x), p)
    if e == "noise":
      g = g * jnp.exp(self.grad_log_scale.value)
    s = est.scale_grad(_positive(self.step_size.value), g)
    if e == "lsq+" and hasattr(self, "offset"):
      return est.lsq_plus(x, s, self.offset.value, n, p)
    y = est.lsq(x, s, n, p)
    if e == "noise" and train and self.noise_lambda0 > 0:
      amp = est.noise_amplitude(self.count.value, self.noise_lambda0, self.noise_tau)
      u = est.noise_uniform(self.noise_rng, self.seed, self.count.value, jnp.shape(y))
      y = est.noisy(y, x, amp, u)
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

    For `ste` weights the scale depends on the weight: see `integer_grid`.
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
      return _positive(self.amax.value) / p, jnp.zeros(()), bits, self.signed
    if e == "lsq+" and hasattr(self, "offset"):
      raise ValueError("lsq+ offsets are not integer zero points; export needs lsq, ste, tqt or dbits")
    return _positive(self.step_size.value), jnp.zeros(()), bits, self.signed

  def integer_grid(self, x=None) -> dict | None:
    """The integer grid this quantizer evaluates on, as arrays: `{"scale", "zero_point", "bits",
    "signed", "narrow"}` (scale per channel for weights; `ste` weights need the weight `x`), or
    None where evaluation is not on an integer grid (estimator 'none', bypass, calibration in
    progress, an lsq+ offset)."""
    e = self.estimator
    if e == "none" or self.bypass or OBSERVERS or (e == "lsq+" and hasattr(self, "offset")):
      return None
    bits = self.int_bits()
    if e == "ste" and self.role == "weight":  # the scale comes from the weight's current max
      scale, zp, signed, narrow = self._grid(x)[0], jnp.zeros(()), True, True
    else:
      scale, zp, _, signed = self.params()
      narrow = e == "dbits" and self.signed
    return {"scale": scale, "zero_point": zp, "bits": bits, "signed": bool(signed),
            "narrow": bool(narrow)}

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


def quant_metrics(model: nnx.Module) -> dict[str, jax.Array]:
  """Per weight quantizer: `clip/<layer>` (fraction of weights outside the grid) and, where tracked,
  `osc/<layer>` (mean oscillation frequency) and `frozen/<layer>` (fraction frozen)."""
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Quantizer) and module.role == "weight" and hasattr(module, "clip_frac"):
      layer = "/".join(str(k) for k in path[:-1])
      out[f"clip/{layer}"] = module.clip_frac.value
      if module.tracking:
        out[f"osc/{layer}"] = jnp.mean(module.osc_freq.value)
        if module.osc_freeze > 0:
          out[f"frozen/{layer}"] = jnp.mean(module.frozen.value)
  return out


def dampening_loss(model: nnx.Module) -> jax.Array:
  """Sum of the weight quantizers' dampening terms recorded by the last training forward."""
  total = jnp.zeros((), jnp.float32)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, Quantizer) and module.osc_dampen and hasattr(module, "damp"):
      total = total + module.damp.value
  return total
