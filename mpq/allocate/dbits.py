"""`mixed.method=dbits`: learned continuous bitwidths under a hard size budget, then ILP rounding.

Phase 1 (the first `mixed.dbits_fraction` of training): every allocated layer's weight quantizer
uses the `dbits` estimator with a trainable continuous bitwidth `b_i` (its own Adam at `mixed.dbits_lr`).
The size budget `B = weight_bits_avg x sum_i n_i` is a constraint handled by a Lagrange multiplier:

    loss  = task loss + lambda * (size / B - 1),       size = sum_i n_i clip(b_i, 2, 16)
    lambda <- max(0, lambda + mixed.lagrange_lr * (size / B - 1))     (after every step)

so lambda rises while the budget is violated and pushes the bits down through `d size / d b_i = n_i`,
and relaxes once it holds (dual ascent). Activation bits are fixed (`mixed.a_bits`, else `quant.a_bits`).
Pinned layers are fixed at their pin from the start.

Rounding (at the end of phase 1): the integer assignment closest to the learned bits that meets the
budget, `argmin sum_i n_i (b_i - c_i)^2` subject to `sum_i n_i c_i <= B` (`solve_ilp`), is fixed in
every quantizer (`fixed_bits`); phase 2 fine-tunes at those bits.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from mpq.allocate.ilp import solve_ilp
from mpq.errors import UserError
from mpq.quant import estimators as est
from mpq.quant.quantizer import quantizers


def _weight_quantizers(model):
  return {layer: q for layer, q in quantizers(model) if q.role == "weight" and q.method.learns_bits}


def effective_bits(q):
  return est.effective_bits(q.bits.value, q.fixed_bits.value)


def make_budget(weights: dict[str, int], budget_bits: float, lagrange_lr: float, stop_step: int):
  """The `budget` hook of `make_train_step` (see the module docstring)."""

  def budget(model, extra, step):
    qs = _weight_quantizers(model)
    size = sum(weights[p] * effective_bits(q) for p, q in qs.items() if p in weights)
    ratio = size / budget_bits
    active = step < stop_step
    lam = extra["lagrange"]
    penalty = jnp.where(active, lam * (ratio - 1.0), 0.0)
    new_lam = jnp.where(active, jnp.maximum(0.0, lam + lagrange_lr * (ratio - 1.0)), lam)
    return penalty, {"lagrange": new_lam}, {"size_ratio": ratio, "lagrange": lam}

  return budget


def setup(model, mc, a_bits: int) -> None:
  """Fixes activation bits and pinned layers before phase 1 (in place)."""
  for layer, m in quantizers(model):
    if not m.method.learns_bits:
      continue
    pin = next((int(b) for pattern, b in mc.pins if re.fullmatch(pattern, layer)), None)
    if m.role == "act":
      m.fixed_bits.value = jnp.float32(pin if pin is not None else a_bits)
    elif pin is not None:
      m.fixed_bits.value = jnp.float32(pin)
      m.bits.value = jnp.float32(pin)


def round_bits(model, weights: dict[str, int], budget_bits: float, choices) -> dict[str, int]:
  """Fixes the nearest feasible integer assignment in the model's weight quantizers; returns it."""
  qs = {p: q for p, q in _weight_quantizers(model).items() if p in weights}
  paths = list(qs)
  cont = np.asarray([float(effective_bits(qs[p])) for p in paths])
  fixed = np.asarray([float(qs[p].fixed_bits.value) for p in paths])
  c = np.asarray(sorted(set(int(b) for b in choices) | {int(f) for f in fixed if f > 0}), float)
  n = np.asarray([weights[p] for p in paths], float)
  sens = n[:, None] * (cont[:, None] - c[None]) ** 2
  allowed = np.where(fixed[:, None] > 0, c[None] == fixed[:, None], True)
  try:
    pick = solve_ilp(sens, {"weight_bits": n[:, None] * c[None]}, {"weight_bits": budget_bits},
                     allowed=allowed)
  except ValueError as e:
    raise UserError(f"mixed.method=dbits rounding: {e}") from None
  out = {}
  for p, j in zip(paths, pick):
    qs[p].fixed_bits.value = jnp.float32(c[j])
    out[p] = int(c[j])
  return out
