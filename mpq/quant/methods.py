"""The estimator registry: one small object per estimator, owning everything about it.

An entry (`Estimator` subclass, registered in `ESTIMATORS` by its `name`) defines
  variables(spec)        the quantizer variables it needs (`QParam`: learned; `QState`: statistics)
  forward(q, x, train)   the fake-quantized tensor, with the estimator's custom gradient
                         (the pure `jax.custom_vjp` functions of `mpq.quant.estimators`)
  weight_grid(q, w)      `(scale, qmin, qmax)` of a weight's grid without gradients, for the
                         oscillation tracker (`mpq.quant.oscillation`); None where there is none
  integer_grid(q, x)     the integer grid evaluation runs on (what the exporter writes), or None
  set_range(q, amax, lo) calibration: initialise its parameters from a calibrated range
  eval_bits(q)           the integer bitwidth used at evaluation
  param_groups           the optimizer of each of its learned parameters (`ParamGroup`, applied by
                         label through `optax.multi_transform` in `mpq.train.optim`)
`q` is the `Quantizer` module holding the variables and a `Spec` (`q.spec`). Adding an estimator is
one class here plus its tests; `Quantizer` has no branch on estimator names.

Entries: none, ste (Jacob et al. 2017), lsq (Esser et al. 2019), lsq+ (Bhalgat et al. 2020),
tqt (Jain et al. 2019), noise (Wang et al. 2022), dbits (Uhlich et al. 2020 / SDQ); see each class.
`pixel` (internal: not a choice for rules) is the fixed grid of the model input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from mpq.quant import core
from mpq.quant import estimators as est
from mpq.quant.variables import QParam, QState


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """How a group of learned quantizer parameters is optimized (`mpq.train.optim`).

  optimizer   'adam' (the default: step sizes and log-thresholds span decades, and TQT's paper
              trains thresholds with an adaptive optimizer for this reason) or 'sgd'
  lr_scale    multiplies the quantizer learning rate (`config.quant.param_lr`; 0 means the model's
              learning rate with adam/adamw, 1e-3 with sgd), on the model's schedule
  lr_field    a config path (e.g. 'mixed.dbits_lr') whose value, times `lr_scale`, is a constant
              learning rate used instead; such a group is left out of gradient clipping
  when        a predicate of the config: where it is false the parameters train with the model's
              optimizer, like model parameters without weight decay (None: always applies)
  """
  optimizer: str = "adam"
  lr_scale: float = 1.0
  lr_field: str | None = None
  when: Callable | None = None

  def applies(self, config) -> bool:
    return self.when is None or bool(self.when(config))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a quantizer quantizes (static): its name, role ('weight' or 'act'), whether its grid is
  signed, the shape of its per-channel parameters (() for per-tensor) and the estimator options."""
  name: str
  role: str
  signed: bool
  shape: tuple
  ema_decay: float = 0.99
  noise_lambda0: float = 0.0
  noise_tau: float = 1000.0
  noise_rng: str = "hash"
  seed: int = 0
  grid: tuple | None = None  # (scale, zero point) of a fixed grid (`pixel`)

  @property
  def is_weight(self) -> bool:
    return self.role == "weight"


def positive(v):
  """Learned step sizes and ranges enter as `max(|v|, 1e-8)`: an optimizer step that carries one
  across zero (Adam moves it by about the learning rate whatever its size) must not flip or empty
  the grid."""
  return jnp.maximum(jnp.abs(v), 1e-8)


def per_scale(spec: Spec, x) -> float:
  """Elements sharing one scale: per channel for weights; per example (and per channel, for
  per-channel activations) for activations."""
  if spec.is_weight:
    return x.size / max(math.prod(spec.shape), 1)
  return x.size / x.shape[0] / max(math.prod(spec.shape), 1)


def _act_range(xs, spec: Spec):
  """(min, max) of an activation over the axes its quantizer shares a scale across: everything
  (per tensor), or all but the last axis (per channel)."""
  if not spec.shape:
    return jnp.min(xs), jnp.max(xs)
  axes = tuple(range(xs.ndim - 1))
  return jnp.min(xs, axis=axes), jnp.max(xs, axis=axes)


def _grid(scale, bits, signed, narrow, zero_point=None) -> dict:
  return {"scale": scale, "zero_point": jnp.zeros(()) if zero_point is None else zero_point,
          "bits": bits, "signed": bool(signed), "narrow": bool(narrow)}


class Estimator:
  """Base of the registry entries (see the module docstring). Stateless: state is in `q`."""
  name: ClassVar[str]
  quantizes: ClassVar[bool] = True  # False: identity (the layer stays float)
  learns_bits: ClassVar[bool] = False  # True: `bits` is a QParam and `fixed_bits` exists
  tracks_oscillations: ClassVar[bool] = True  # weights can be tracked / frozen (Nagel et al.)
  fixed_bits: ClassVar[bool] = False  # True: its bits are its own (`set_bits` leaves them)
  internal: ClassVar[bool] = False  # True: not a choice for `quant.estimator` / rules
  pixels: ClassVar[bool] = False  # True: its grid is the uint8 image itself (the model input)
  param_groups: ClassVar[dict] = {}

  def variables(self, spec: Spec, bits: float) -> dict:
    return {"bits": QState(jnp.asarray(bits, jnp.float32))}

  def forward(self, q, x, train: bool):
    raise NotImplementedError

  def weight_grid(self, q, w):
    return None

  def integer_grid(self, q, x=None) -> dict | None:
    return None

  def set_range(self, q, amax, lo=None) -> None:
    pass

  def eval_bits(self, q):
    return jnp.clip(core.round_half_up(q.bits.value), core.MIN_BITS, core.MAX_BITS)

  def _param(self, value, group: str):
    return QParam(value, opt_group=f"{self.name}/{group}")


class Identity(Estimator):
  """`none`: the tensor passes unchanged; no integer grid (the layer cannot be exported)."""
  name = "none"
  quantizes = False
  tracks_oscillations = False

  def forward(self, q, x, train):
    return x


class STE(Estimator):
  """`ste` (Jacob et al. 2017): ranges are statistics, the gradient is the clipped straight-through.

  weights      symmetric per channel, narrow grid `[-(2^(b-1) - 1), 2^(b-1) - 1]`, scale
               `max|w| / qmax` from the current weight
  activations  affine on the unsigned grid `[0, 2^b - 1]` from an EMA (decay `ema_decay`) of the
               batch min/max, starting from the calibrated range
  """
  name = "ste"

  def variables(self, spec, bits):
    v = super().variables(spec, bits)
    if not spec.is_weight:
      v["lo"] = QState(jnp.full(spec.shape, -1.0 if spec.signed else 0.0, jnp.float32))
      v["hi"] = QState(jnp.full(spec.shape, 1.0, jnp.float32))
    return v

  def _weight_scale(self, q, w, bits):
    w = jax.lax.stop_gradient(w)
    amax = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True).reshape(q.spec.shape)
    return core.symmetric_scale(amax, bits)

  def forward(self, q, x, train):
    bits = q.bits.value
    if q.spec.is_weight:
      return core.fake_quant(x, self._weight_scale(q, x, bits), 0.0, bits, True, narrow=True)
    if train:
      lo, hi = _act_range(jax.lax.stop_gradient(x), q.spec)
      d = q.spec.ema_decay
      q.lo.value = d * q.lo.value + (1 - d) * lo
      q.hi.value = d * q.hi.value + (1 - d) * hi
    scale, zp = core.affine_params(q.lo.value, q.hi.value, bits)
    return core.fake_quant(x, scale, zp, bits, signed=False)

  def weight_grid(self, q, w):
    bits = q.bits.value
    n, p = core.qrange(bits, True, narrow=True)
    return self._weight_scale(q, w, bits), n, p

  def integer_grid(self, q, x=None):
    bits = self.eval_bits(q)
    if q.spec.is_weight:  # the scale comes from the weight's current max
      return _grid(self._weight_scale(q, x, bits), bits, True, True)
    scale, zp = core.affine_params(q.lo.value, q.hi.value, bits)
    return _grid(scale, bits, False, False, zp)

  def set_range(self, q, amax, lo=None):
    if not q.spec.is_weight:
      lo = lo if lo is not None else (-amax if q.spec.signed else 0.0)
      q.lo.value = jnp.broadcast_to(jnp.asarray(lo, jnp.float32), q.spec.shape)
      q.hi.value = amax


class LSQ(Estimator):
  """`lsq` (Esser et al. 2019): a learned step size `s` per tensor (activations) or per output
  channel (weights), `round(clip(x / s, n, p)) * s`, with LSQ's gradients and gradient scale
  `1 / sqrt(N p)` (`mpq.quant.estimators.lsq`)."""
  name = "lsq"
  param_groups = {"step_size": ParamGroup()}

  def variables(self, spec, bits):
    v = super().variables(spec, bits)
    v["step_size"] = self._param(jnp.full(spec.shape, 0.05, jnp.float32), "step_size")
    return v

  def _grad_scale(self, q, x, p):
    return est.lsq_grad_scale(per_scale(q.spec, x), p)

  def forward(self, q, x, train):
    n, p = core.qrange(q.bits.value, q.spec.signed)
    s = est.scale_grad(positive(q.step_size.value), self._grad_scale(q, x, p))
    return est.lsq(x, s, n, p)

  def weight_grid(self, q, w):
    n, p = core.qrange(q.bits.value, True)
    return jax.lax.stop_gradient(positive(q.step_size.value)), n, p

  def integer_grid(self, q, x=None):
    return _grid(positive(q.step_size.value), self.eval_bits(q), q.spec.signed, False)

  def set_range(self, q, amax, lo=None):
    _, p = core.qrange(self.eval_bits(q), q.spec.signed)
    q.step_size.value = amax / p


class LSQPlus(LSQ):
  """`lsq+` (Bhalgat et al. 2020): `lsq` plus a learned offset `beta` for signed activations,
  `round(clip((x - beta) / s, n, p)) * s + beta`. The offset is not an integer zero point, so such
  a quantizer has no integer grid (export needs lsq, ste, tqt, noise or dbits there)."""
  name = "lsq+"
  param_groups = {"step_size": ParamGroup(), "offset": ParamGroup()}

  @staticmethod
  def _has_offset(spec):
    return not spec.is_weight and spec.signed

  def variables(self, spec, bits):
    v = super().variables(spec, bits)
    if self._has_offset(spec):
      v["offset"] = self._param(jnp.zeros(spec.shape, jnp.float32), "offset")
    return v

  def forward(self, q, x, train):
    if not self._has_offset(q.spec):
      return super().forward(q, x, train)
    n, p = core.qrange(q.bits.value, q.spec.signed)
    s = est.scale_grad(positive(q.step_size.value), self._grad_scale(q, x, p))
    return est.lsq_plus(x, s, q.offset.value, n, p)

  def integer_grid(self, q, x=None):
    return None if self._has_offset(q.spec) else super().integer_grid(q, x)


class Noise(LSQ):
  """`noise` (Wang et al. 2022, noise tempering): `lsq` plus, in training, decaying error-aware
  noise `lambda0 exp(-t / tau) |Q(x) - x| u`, u ~ U(-1, 1) (`mpq.quant.estimators.noisy`), and a
  learned scale `exp(rho)` of the step-size gradient."""
  name = "noise"
  param_groups = {"step_size": ParamGroup(), "grad_log_scale": ParamGroup()}

  def variables(self, spec, bits):
    v = super().variables(spec, bits)
    v["grad_log_scale"] = self._param(jnp.zeros((), jnp.float32), "grad_log_scale")
    return v

  def _grad_scale(self, q, x, p):
    return super()._grad_scale(q, x, p) * jnp.exp(q.grad_log_scale.value)

  def forward(self, q, x, train):
    y = super().forward(q, x, train)
    spec = q.spec
    if train and spec.noise_lambda0 > 0:
      amp = est.noise_amplitude(q.count.value, spec.noise_lambda0, spec.noise_tau)
      u = est.noise_uniform(spec.noise_rng, spec.seed, q.count.value, jnp.shape(y))
      y = est.noisy(y, x, amp, u)
    return y


class TQT(Estimator):
  """`tqt` (Jain et al. 2019): a trained log2 threshold per tensor or channel, power-of-2 scale
  `2^ceil(log2_t) / 2^(b-1)` (`mpq.quant.estimators.tqt`, `tqt_scale`)."""
  name = "tqt"
  param_groups = {"log2_t": ParamGroup()}

  def variables(self, spec, bits):
    v = super().variables(spec, bits)
    v["log2_t"] = self._param(jnp.zeros(spec.shape, jnp.float32), "log2_t")
    return v

  def forward(self, q, x, train):
    return est.tqt(x, q.log2_t.value, q.bits.value, q.spec.signed)

  def weight_grid(self, q, w):
    bits = q.bits.value
    n, p = core.qrange(bits, True)
    return est.tqt_scale(q.log2_t.value, bits, True), n, p

  def integer_grid(self, q, x=None):
    bits = self.eval_bits(q)
    return _grid(est.tqt_scale(q.log2_t.value, bits, q.spec.signed), bits, q.spec.signed, False)

  def set_range(self, q, amax, lo=None):
    q.log2_t.value = jnp.log2(amax)


class DBits(Estimator):
  """`dbits` (Uhlich et al. 2020 / SDQ): a learned range `amax` and a learned continuous bitwidth
  (`mpq.quant.estimators.dbits`); evaluates at `effective_bits(..., integer=True)`. `fixed_bits > 0`
  (set by `mixed.method=dbits` rounding, or by pins) fixes an integer bitwidth."""
  name = "dbits"
  learns_bits = True
  tracks_oscillations = False
  # The bits have their own Adam at `mixed.dbits_lr` under `mixed.method=dbits` (its budget sets
  # their pace); a dbits quantizer chosen by `quant.estimator` or a rule alone trains its bits
  # with the model's optimizer.
  param_groups = {"amax": ParamGroup(),
                  "bits": ParamGroup(lr_field="mixed.dbits_lr",
                                     when=lambda c: bool(c.mixed.enabled)
                                     and c.mixed.method == "dbits")}

  def variables(self, spec, bits):
    return {"bits": self._param(jnp.asarray(bits, jnp.float32), "bits"),
            "fixed_bits": QState(jnp.zeros((), jnp.float32)),
            "amax": self._param(jnp.ones(spec.shape, jnp.float32), "amax")}

  def forward(self, q, x, train):
    if train:  # once fixed, train at the fixed integer bits (no gradient to `bits`)
      bits = jnp.where(q.fixed_bits.value > 0, q.fixed_bits.value, q.bits.value)
    else:
      bits = self.eval_bits(q)
    signed = q.spec.signed
    _, p = core.qrange(jnp.floor(jnp.clip(bits, core.MIN_BITS, core.MAX_BITS)), signed,
                       narrow=signed)
    g = est.lsq_grad_scale(per_scale(q.spec, x), p)
    return est.dbits(x, positive(q.amax.value), bits, signed, g)

  def integer_grid(self, q, x=None):
    bits = self.eval_bits(q)
    signed = q.spec.signed
    _, p = core.qrange(bits, signed, narrow=signed)
    return _grid(positive(q.amax.value) / p, bits, signed, signed)

  def set_range(self, q, amax, lo=None):
    q.amax.value = amax

  def eval_bits(self, q):
    return est.effective_bits(q.bits.value, q.fixed_bits.value, integer=True)


class Pixel(Estimator):
  """`pixel`: the model input's own grid, fixed: 8 bits unsigned, scale `s` and zero point `z`
  from `Spec.grid` (`mpq.data.sources.pixel_grid`). With `input_norm='pixel'` the data pipeline
  feeds `x = (p - z) s` for uint8 pixels `p`, which this grid holds exactly (`round(x / s) + z ==
  p`): the forward is the identity on them, and an export takes the uint8 image as it is. The
  first layer's input quantizer is this one, whatever the rules say (`mpq.quant.model`); it learns
  nothing, calibration leaves it, and its bits are not a choice (`fixed_bits`)."""
  name = "pixel"
  fixed_bits = True
  internal = True
  pixels = True
  tracks_oscillations = False

  def variables(self, spec, bits):
    if spec.grid is None or spec.is_weight:
      raise ValueError(f"{spec.name}: the pixel grid quantizes a model input and needs its "
                       "(scale, zero point)")
    scale, zero_point = spec.grid
    return {"bits": QState(jnp.float32(8)), "scale": QState(jnp.float32(scale)),
            "zero_point": QState(jnp.float32(zero_point))}

  def forward(self, q, x, train):
    return core.fake_quant(x, q.scale.value, q.zero_point.value, 8, signed=False)

  def integer_grid(self, q, x=None):
    return _grid(q.scale.value, jnp.float32(8), False, False, q.zero_point.value)

  def eval_bits(self, q):
    return jnp.float32(8)


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Identity(), STE(), LSQ(), LSQPlus(), Noise(), TQT(), DBits(), Pixel())}


def get(name: str) -> Estimator:
  if name not in ESTIMATORS:
    raise ValueError(f"unknown estimator {name!r}; use one of {tuple(ESTIMATORS)}")
  return ESTIMATORS[name]


def param_groups() -> dict[str, ParamGroup]:
  """Every optimizer group label (`estimator/parameter`) -> its `ParamGroup`."""
  return {f"{e.name}/{k}": g for e in ESTIMATORS.values() for k, g in e.param_groups.items()}
