"""`Quantizer`: the NNX module holding one tensor's quantizer state; the estimator does the math.

A quantizer fake-quantizes a layer's weight (`role='weight'`: per output channel, the last kernel
axis, symmetric signed grid) or input (`role='act'`: per tensor, unsigned when the input is
non-negative, e.g. after ReLU, signed otherwise). Everything that depends on the estimator
(variables, forward and gradient, integer grid, calibration, optimizer) is the registry entry's
(`mpq.quant.methods.ESTIMATORS`); weight oscillation tracking is a separate component
(`mpq.quant.oscillation.Oscillation`). Variable types: `QParam` (learned) and `QState`
(`mpq.quant.variables`).

Bits live in a `QState` (a float32 scalar) or, for `dbits`, in a `QParam`; both are arrays that enter
the jitted step as data, so assigning new bits (`set_bits`) never recompiles.

Hooks: `hooks(model, observe=..., tap=...)` attaches functions to the quantizers of one model for
the duration of a block (calibration observes every quantizer's input and passes it through;
comparison taps every quantizer's input and output). They are attributes of that model's
quantizers, not global state: other models and other threads are unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mpq.quant import core
from mpq.quant import estimators as est
from mpq.quant import methods
from mpq.quant.oscillation import Oscillation
from mpq.quant.variables import QParam, QState  # noqa: F401  (re-exported)

ESTIMATORS = tuple(n for n, e in methods.ESTIMATORS.items() if not e.internal)  # rule choices


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Functions a quantizer calls (see the module docstring)."""
  observe: Callable | None = None  # observe(quantizer, x); the quantizer then returns x unchanged
  tap: Callable | None = None  # tap(quantizer, x, y) after quantizing; y is unchanged


class Quantizer(nnx.Module):
  """Fake-quantizes one tensor with the registered estimator `estimator` (see the module
  docstring). `kernel_shape` (weights) with an `oscillation` that tracks or freezes turns on the
  oscillation component's per-weight state. `act_channels` makes an activation quantizer per
  channel (one scale per index of the last axis) instead of per tensor."""

  def __init__(self, name: str, role: str, estimator: str, bits: float, *, signed: bool = True,
               channels: int = 1, ndim: int = 4, ema_decay: float = 0.99, noise_lambda0: float = 0.0,
               noise_tau: float = 1000.0, noise_rng: str = "hash", bypass: bool = False,
               kernel_shape=None, oscillation: Oscillation = Oscillation(),
               act_channels: int | None = None, grid: tuple | None = None):
    method = methods.get(estimator)
    if noise_rng not in est.NOISE_RNGS:
      raise ValueError(f"unknown noise_rng {noise_rng!r}; use one of {est.NOISE_RNGS}")
    self.name, self.role, self.estimator = name, role, estimator
    self.bypass = bypass  # identity forward, same variables (evaluate a QAT checkpoint in float)
    self.signed = (bool(signed) or role == "weight") and grid is None
    if role == "weight":
      shape = core.channel_shape(ndim, -1, channels)
    else:  # per tensor, or one scale per input channel (the last axis)
      shape = () if act_channels is None else (int(act_channels),)
    self.shape = shape
    self.spec = methods.Spec(name, role, self.signed, shape, ema_decay=ema_decay,
                             noise_lambda0=noise_lambda0, noise_tau=noise_tau, noise_rng=noise_rng,
                             grid=grid, seed=zlib.crc32(f"{name}/{role}".encode()) & 0x7FFFFFFF)
    self.method = method
    for k, v in method.variables(self.spec, bits).items():
      setattr(self, k, v)
    self.count = QState(jnp.zeros((), jnp.int32))  # training calls so far
    self.monitored = role == "weight" and method.quantizes
    self.tracking = (self.monitored and kernel_shape is not None and oscillation.tracking
                     and method.tracks_oscillations)
    self.oscillation = oscillation if self.tracking else dataclasses.replace(
        oscillation, track=False, freeze=0.0)
    if self.monitored:
      for k, v in self.oscillation.variables(kernel_shape).items():
        setattr(self, k, v)
    self.hooks = Hooks()

  # ------------------------------------------------------------------------------------ forward
  def __call__(self, x, train: bool = False):
    m, hooks = self.method, self.hooks
    if not m.quantizes or self.bypass:
      y = x
    elif hooks.observe is not None:
      hooks.observe(self, x)
      y = x
    else:
      if train:
        self.count.value = self.count.value + 1
      y = m.forward(self, x, train)
      if self.monitored:
        y = self._monitor(x, y, train)
    if hooks.tap is not None:
      hooks.tap(self, x, y)
    return y

  def _monitor(self, w, y, train):
    """The oscillation component on a weight: bookkeeping in training, frozen weights always."""
    grid = self.method.weight_grid(self, w)
    if grid is None:
      return y
    if train:
      self.oscillation.update(self, w, y, grid)
    if self.tracking:
      y = self.oscillation.apply_frozen(self, y, grid[0])
    return y

  def int_bits(self) -> jax.Array:
    """The integer bitwidth used at evaluation (the estimator's rule; `dbits`: its fixed bits once
    set, else its continuous bits rounded half up, within [2, 16])."""
    return self.method.eval_bits(self)

  # ---------------------------------------------------------------------------- export & calibration
  def integer_grid(self, x=None) -> dict | None:
    """The integer grid this quantizer evaluates on, as arrays: `{"scale", "zero_point", "bits",
    "signed", "narrow"}` (scale per channel for weights; `ste` weights need the weight `x`), or
    None where evaluation is not on an integer grid (estimator 'none', bypass, calibration in
    progress, an lsq+ offset)."""
    if self.bypass or self.hooks.observe is not None:
      return None
    return self.method.integer_grid(self, x)

  def set_range(self, amax, lo=None) -> None:
    """Initialises the quantizer from a calibrated range (`amax`, per channel for weights).

    `lo` (activations, affine `ste` only) is the calibrated minimum; default `-amax` if signed else 0.
    """
    amax = jnp.maximum(jnp.asarray(amax, jnp.float32).reshape(self.shape), 1e-6)
    self.method.set_range(self, amax, lo)


def quantizers(model: nnx.Module):
  """(layer path, quantizer) of every quantizer in `model`, in module order."""
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Quantizer):
      yield "/".join(str(k) for k in path[:-1]), module


@contextlib.contextmanager
def hooks(model: nnx.Module, *, observe: Callable | None = None, tap: Callable | None = None):
  """Within the block, `model`'s quantizers call `observe(q, x)` and pass `x` through unchanged
  (calibration), and/or call `tap(q, x, y)` after quantizing (comparison)."""
  qs = [q for _, q in quantizers(model)]
  previous = [q.hooks for q in qs]
  for q, old in zip(qs, previous):
    q.hooks = Hooks(observe if observe is not None else old.observe,
                    tap if tap is not None else old.tap)
  try:
    yield
  finally:
    for q, old in zip(qs, previous):
      q.hooks = old


def set_bits(model: nnx.Module, bits: dict[str, dict[str, float]]) -> None:
  """Assigns new bitwidths in place: `{layer_path: {"w_bits": b, "a_bits": b}}` (no recompilation:
  only array values change). A fixed grid (the pixel grid of the input) keeps its bits."""
  for layer, q in quantizers(model):
    key = "w_bits" if q.role == "weight" else "a_bits"
    if layer in bits and key in bits[layer] and not q.method.fixed_bits:
      q.bits.value = jnp.asarray(bits[layer][key], jnp.float32)


def quant_metrics(model: nnx.Module) -> dict[str, jax.Array]:
  """Per weight quantizer: `clip/<layer>` (fraction of weights outside the grid) and, where tracked,
  `osc/<layer>` (mean oscillation frequency) and `frozen/<layer>` (fraction frozen)."""
  out = {}
  for layer, q in quantizers(model):
    if q.monitored:
      out.update(q.oscillation.metrics(q, layer))
  return out


def dampening_loss(model: nnx.Module) -> jax.Array:
  """Sum of the weight quantizers' dampening terms recorded by the last training forward."""
  total = jnp.zeros((), jnp.float32)
  for _, q in quantizers(model):
    if q.monitored and q.oscillation.dampen:
      total = total + q.damp.value
  return total
