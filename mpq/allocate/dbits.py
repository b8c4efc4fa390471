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
  """The budget penalty inside the train step (see the module docstring):
  `budget(model, extra, step) -> (penalty, new_extra, metrics)`."""

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


class Training:
  """`mixed.method=dbits` as a training hook (`mpq.train.loop.Hook`): the Lagrange multiplier in
  the train state, the budget penalty in every step until `round_step`, then the rounding.

  `weights`: kernel elements per allocated layer; `merge(state) -> model` and
  `update(state, model) -> state` move between the train state and a model on the host."""

  def __init__(self, mc, weights: dict[str, int], total_steps: int, merge, update):
    self.mc, self.weights = mc, weights
    self.budget_bits = float(mc.weight_bits_avg) * sum(weights.values())
    self.round_step = int(mc.dbits_fraction * total_steps)
    self.penalty = make_budget(weights, self.budget_bits, mc.lagrange_lr, self.round_step)
    self.merge, self.update = merge, update

  def init_extra(self):
    return {"lagrange": jnp.zeros((), jnp.float32)}

  def after_step(self, step: int, state):
    if step != self.round_step:
      return state
    model = self.merge(state)
    assignment = round_bits(model, self.weights, self.budget_bits, self.mc.bit_choices)
    used = sum(self.weights[p] * b for p, b in assignment.items()) / sum(self.weights.values())
    print(f"dbits: rounded to {assignment} (weight bits avg {used:.3f}); fine-tuning", flush=True)
    return self.update(state, model)

  def report(self, bits: dict, state) -> dict:
    """`bits.json` additions: the budget, the weight bits used, the multiplier."""
    total = float(sum(self.weights[p] * bits[p]["w_bits"] for p in self.weights))
    return {"_budgets": {"weight_bits": self.budget_bits},
            "_totals": {"weight_bits": total, "weight_bits_avg": total / sum(self.weights.values())},
            "_allocation": {"method": "dbits", "round_step": self.round_step,
                            "lagrange": float(state.extra["lagrange"])}}


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
