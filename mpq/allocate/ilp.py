"""Exact bit allocation by integer linear programming (HAWQ-V3), and a greedy baseline.

Given a sensitivity `S[i, c]` for layer i at choice c (a bitwidth, or a (w_bits, a_bits) pair) and
costs `K_k[i, c]` (model size, BOPs, latency, ...), choose one column per layer:

    minimise    sum_i S[i, c_i]
    subject to  sum_i K_k[i, c_i] <= B_k        for every budget k
                c_i = c_j                        for layers tied together (residual branches, ...)

as a 0/1 program over `x[g, c]` (one row per group of tied layers, `sum_c x[g, c] = 1`), solved
exactly by HiGHS through `scipy.optimize.milp`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import optimize, sparse


class InfeasibleBudgetError(ValueError):
  """No assignment meets the budgets; the message names the smallest achievable value of each."""


def _groups(num_layers: int, ties: Sequence[Sequence[int]]) -> list[list[int]]:
  """Union-find over `ties`: the groups of layers that must share a choice (sorted)."""
  parent = list(range(num_layers))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for tie in ties:
    tie = [int(t) for t in tie]
    for t in tie:
      if not 0 <= t < num_layers:
        raise ValueError(f"tie {tuple(tie)} names layer {t}, but there are {num_layers} layers")
    for t in tie[1:]:
      parent[find(t)] = find(tie[0])
  groups: dict[int, list[int]] = {}
  for i in range(num_layers):
    groups.setdefault(find(i), []).append(i)
  return sorted(groups.values())


def _check(sensitivity, costs, budgets):
  s = np.asarray(sensitivity, np.float64)
  if s.ndim != 2:
    raise ValueError(f"sensitivity must be [layers, choices], got shape {s.shape}")
  missing = sorted(set(budgets) - set(costs))
  if missing:
    raise ValueError(f"budgets {missing} have no cost table; costs hold {sorted(costs)}")
  out = {}
  for name in budgets:
    k = np.asarray(costs[name], np.float64)
    if k.shape != s.shape:
      raise ValueError(f"cost {name!r} has shape {k.shape}, sensitivity has {s.shape}")
    out[name] = k
  return s, out


def _allowed_groups(allowed, groups, shape):
  a = np.ones(shape, bool) if allowed is None else np.asarray(allowed, bool)
  if a.shape != shape:
    raise ValueError(f"allowed has shape {a.shape}, sensitivity has {shape}")
  ag = np.stack([a[g].all(axis=0) for g in groups])
  empty = [groups[i] for i in np.flatnonzero(~ag.any(axis=1))]
  if empty:
    raise InfeasibleBudgetError(f"layers {empty[0]} have no allowed choice (pins, activation "
                                "limits and ties exclude every column)")
  return ag


def min_costs(costs: Mapping[str, np.ndarray], ties=(), allowed=None) -> dict[str, float]:
  """The smallest achievable total of each cost on its own (respecting ties and `allowed`)."""
  out = {}
  for name, k in costs.items():
    k = np.asarray(k, np.float64)
    groups = _groups(k.shape[0], ties)
    ag = _allowed_groups(allowed, groups, k.shape)
    out[name] = float(sum(np.where(ag[i], k[g].sum(axis=0), np.inf).min()
                          for i, g in enumerate(groups)))
  return out


def _infeasible(costs, budgets, ties, joint: bool, allowed=None) -> InfeasibleBudgetError:
  lows = min_costs(costs, ties, allowed)
  parts = [f"{n} <= {budgets[n]:.6g} (smallest achievable {lows[n]:.6g})" for n in budgets]
  why = ("the budgets cannot all hold at once, although each can alone" if joint
         else "a budget is below its smallest achievable value")
  return InfeasibleBudgetError(f"no bit assignment fits: {why}: " + "; ".join(parts))


def solve_ilp(sensitivity, costs: Mapping[str, np.ndarray], budgets: Mapping[str, float],
              ties: Sequence[Sequence[int]] = (), allowed=None) -> np.ndarray:
  """The column per layer that minimises the summed sensitivity under every budget (exact).

  Args:
    sensitivity: float array [layers, choices].
    costs: name -> float array [layers, choices]; only the names in `budgets` constrain.
    budgets: name -> the largest allowed total of that cost.
    ties: groups of layer indices that must take the same choice.
    allowed: optional bool array [layers, choices]; False excludes a column for that layer (pins,
      activation-bit limits).
  Returns:
    int array [layers] of chosen column indices.
  Raises:
    InfeasibleBudgetError: no assignment fits (the message gives each budget's smallest value).
  """
  s, ks = _check(sensitivity, costs, budgets)
  num_layers, num_choices = s.shape
  groups = _groups(num_layers, ties)
  ag = _allowed_groups(allowed, groups, s.shape)
  lows = min_costs(ks, ties, allowed)
  if any(budgets[n] < lows[n] - 1e-9 * max(1.0, abs(lows[n])) for n in budgets):
    raise _infeasible(ks, budgets, ties, joint=False, allowed=allowed)
  g = len(groups)
  # objective and costs per (group, choice)
  c = np.stack([s[grp].sum(axis=0) for grp in groups]).ravel()
  rows = [sparse.kron(sparse.identity(g), np.ones((1, num_choices)))]
  lo, hi = [np.ones(g)], [np.ones(g)]
  for name, k in ks.items():
    rows.append(sparse.csr_matrix(np.stack([k[grp].sum(axis=0) for grp in groups]).ravel()[None]))
    b = float(budgets[name])
    lo.append([-np.inf])
    hi.append([b + 1e-9 * max(1.0, abs(b))])
  a = sparse.vstack(rows).tocsr()
  res = optimize.milp(c, constraints=optimize.LinearConstraint(a, np.concatenate(lo),
                                                               np.concatenate(hi)),
                      integrality=np.ones_like(c),
                      bounds=optimize.Bounds(0, ag.ravel().astype(np.float64)))
  if res.status == 2:  # infeasible
    raise _infeasible(ks, budgets, ties, joint=True, allowed=allowed)
  if not res.success:
    raise RuntimeError(f"HiGHS did not solve the allocation: {res.message}")
  choice_g = np.argmax(res.x.reshape(g, num_choices), axis=1)
  out = np.empty(num_layers, np.int64)
  for grp, ch in zip(groups, choice_g):
    out[grp] = ch
  return out


def solve_greedy(sensitivity, costs: Mapping[str, np.ndarray], budgets: Mapping[str, float],
                 ties: Sequence[Sequence[int]] = (), allowed=None) -> np.ndarray:
  """Baseline: start every group at its most expensive choice, then repeatedly take the cheaper
  choice with the smallest sensitivity increase per unit of (budget-normalised) cost saved on the
  violated budgets, until all budgets hold."""
  s, ks = _check(sensitivity, costs, budgets)
  groups = _groups(s.shape[0], ties)
  ag = _allowed_groups(allowed, groups, s.shape)
  lows = min_costs(ks, ties, allowed)
  if any(budgets[n] < lows[n] - 1e-9 * max(1.0, abs(lows[n])) for n in budgets):
    raise _infeasible(ks, budgets, ties, joint=False, allowed=allowed)
  sg = np.stack([s[g].sum(axis=0) for g in groups])
  kg = {n: np.stack([k[g].sum(axis=0) for g in groups]) for n, k in ks.items()}
  total_cost = sum(k / max(float(budgets[n]), 1e-12) for n, k in kg.items())
  choice = np.argmax(np.where(ag, total_cost, -np.inf), axis=1)
  rows = np.arange(len(groups))
  while True:
    totals = {n: float(k[rows, choice].sum()) for n, k in kg.items()}
    violated = [n for n in kg if totals[n] > budgets[n] + 1e-9 * max(1.0, abs(budgets[n]))]
    if not violated:
      break
    saving = sum((kg[n][rows, choice][:, None] - kg[n]) / max(float(budgets[n]), 1e-12)
                 for n in violated)  # [groups, choices]
    loss = sg - sg[rows, choice][:, None]
    # sensitivity added per unit saved; among equal ratios prefer the larger saving
    ratio = np.where((saving > 1e-15) & ag,
                     np.maximum(loss, 0.0) / np.maximum(saving, 1e-15) - 1e-12 * saving, np.inf)
    best = np.unravel_index(np.argmin(ratio), ratio.shape)
    if not np.isfinite(ratio[best]):
      raise _infeasible(ks, budgets, ties, joint=True)
    choice[best[0]] = best[1]
  out = np.empty(s.shape[0], np.int64)
  for grp, ch in zip(groups, choice):
    out[grp] = ch
  return out
