"""Weight oscillations in QAT (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware
Training"): tracking, iterative freezing and the dampening term, as one component of a weight
quantizer, independent of its estimator (it needs only the estimator's `weight_grid`).

With `s, n, p` the weight grid and `v = w / s` (no gradients):

  clipping      `clip_frac = mean(v < n or v > p)`, logged for every quantized weight
  dampening     `damp = mean(((stop_grad(Q(w)) - clip(w, s n, s p)) / s)^2)`: the distance of each
                latent weight to its grid point in LSBs (at most 1/4 inside the grid), averaged over
                the layer; the train step adds the layers' sum with a weight annealed from 0
                (`mpq.losses.dampening_weight`, `quant.osc_dampen`). Nagel et al. write the sum over
                weights in value units; on the full cnn at W2A2 that sum (about 50, against a task
                loss of 0.4) went NaN after about 200 steps, so mpq uses this scale-free mean.
  oscillation   `delta = w_int(t) - w_int(t-1)`; an oscillation is a non-zero change opposite to the
                previous non-zero change; `f = m * osc + (1 - m) * f` per weight (m = momentum)
  freezing      once `f > freeze` a weight is fixed at round(EMA of its integer value) and gets no
                gradient, in training and evaluation (`apply_frozen`)

The state lives in the quantizer's `QState` variables (`clip_frac`, `damp`, and with tracking
`prev_int`, `last_dir`, `osc_freq`, `int_ema`, `frozen`, `frozen_int`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mpq.quant import core
from mpq.quant.variables import QState


@dataclasses.dataclass(frozen=True)
class Oscillation:
  """The component's settings: `track` oscillation frequencies, `freeze` above this frequency
  (0: off), EMA `momentum`, record the `dampen` term."""
  track: bool = False
  freeze: float = 0.0
  momentum: float = 0.01
  dampen: bool = False

  @property
  def tracking(self) -> bool:
    return self.track or self.freeze > 0

  def variables(self, kernel_shape) -> dict:
    """The state of one weight quantizer (`kernel_shape`: its weight's shape)."""
    v = {"clip_frac": QState(jnp.zeros((), jnp.float32)), "damp": QState(jnp.zeros((), jnp.float32))}
    if self.tracking:
      for k in ("prev_int", "last_dir", "osc_freq", "int_ema", "frozen", "frozen_int"):
        v[k] = QState(jnp.zeros(kernel_shape, jnp.float32))  # distinct buffers (donation)
    return v

  def update(self, q, w, y, grid) -> None:
    """Training bookkeeping of weight `w` (fake-quantized `y`) on `grid = (s, n, p)`."""
    s, n, p = grid
    v = jax.lax.stop_gradient(w) / s
    q.clip_frac.value = jnp.mean(((v < n) | (v > p)).astype(jnp.float32))
    if self.dampen:
      q.damp.value = jnp.mean(jnp.square(
          (jax.lax.stop_gradient(y) - jnp.clip(w, s * n, s * p)) / s))
    if not self.tracking:
      return
    w_int = jnp.clip(core.round_half_up(v), n, p)
    valid = q.count.value > 1
    if self.freeze > 0:
      w_int = jnp.where(q.frozen.value > 0, q.frozen_int.value, w_int)
    delta = w_int - q.prev_int.value
    moved = delta != 0
    direction = jnp.sign(delta)
    osc = moved & (q.last_dir.value != 0) & (direction != q.last_dir.value)
    m = self.momentum
    q.osc_freq.value = jnp.where(valid, m * osc + (1 - m) * q.osc_freq.value, 0.0)
    q.last_dir.value = jnp.where(valid & moved, direction, q.last_dir.value)
    q.int_ema.value = jnp.where(valid, m * w_int + (1 - m) * q.int_ema.value, w_int)
    q.prev_int.value = w_int
    if self.freeze > 0:
      newly = (q.frozen.value == 0) & (q.osc_freq.value > self.freeze)
      q.frozen_int.value = jnp.where(newly, core.round_half_up(q.int_ema.value),
                                     q.frozen_int.value)
      q.frozen.value = jnp.where(newly, 1.0, q.frozen.value)

  def apply_frozen(self, q, y, scale):
    """`y` with frozen weights replaced by their frozen integer times `scale` (no gradient)."""
    if self.freeze <= 0:
      return y
    return jnp.where(q.frozen.value > 0, jax.lax.stop_gradient(q.frozen_int.value * scale), y)

  def metrics(self, q, layer: str) -> dict:
    """`clip/<layer>` and, where tracked, `osc/<layer>` and `frozen/<layer>`."""
    out = {f"clip/{layer}": q.clip_frac.value}
    if self.tracking:
      out[f"osc/{layer}"] = jnp.mean(q.osc_freq.value)
      if self.freeze > 0:
        out[f"frozen/{layer}"] = jnp.mean(q.frozen.value)
    return out
