"""`mixed.method=ilp` in the training workflow: sensitivities, costs, budgets, pins -> an assignment.

Called by the experiment orchestrator (`mpq.experiment`) before QAT starts (not on resume: the
bits then come from the checkpoint), with the float model and a calibration set; this module does
not read checkpoints or data itself. The allocated layers are the dense and conv layers; additions keep their `quant`
rule/default bits. A choice is a (w_bits, a_bits) pair: `(b, b)` for every b in `mixed.bit_choices`,
or `(b, mixed.a_bits)` when `mixed.a_bits > 0` (weights only; a pinned layer then takes `(p, p)`).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq import models
from mpq.allocate import costs as cost_lib
from mpq.allocate import sensitivity as sens
from mpq.allocate.ilp import solve_greedy, solve_ilp
from mpq import quant
from mpq.errors import UserError
from mpq.losses import cross_entropy
from mpq.quant import model as quant_model

BUDGETS = ("weight_bits_avg", "bops_ratio", "activation_bits_max", "latency")


def choices_of(mc) -> list[tuple[int, int]]:
  """The (w_bits, a_bits) columns; with `mixed.a_bits > 0`, pinned layers get extra `(p, p)`
  columns, so a pin fixes both a layer's weight and activation bits."""
  bits = [int(b) for b in mc.bit_choices]
  if not mc.a_bits:
    return [(b, b) for b in bits]
  cols = [(b, int(mc.a_bits)) for b in bits]
  for _, p in mc.pins:
    if (int(p), int(p)) not in cols:
      cols.append((int(p), int(p)))
  return cols


def allowed_mask(paths, choices, mc) -> np.ndarray:
  """[layers, choices] bool from `mixed.pins` (regex -> bits, first match wins) and
  `mixed.activation_bits_max`; a pin that matches no layer is an error."""
  regular = np.asarray([not mc.a_bits or c[1] == int(mc.a_bits) for c in choices])
  allowed = np.ones((len(paths), len(choices)), bool) & regular[None]
  bits = [int(b) for b in mc.bit_choices]
  used = [False] * len(mc.pins)
  for i, p in enumerate(paths):
    for j, (pattern, b) in enumerate(mc.pins):
      if re.fullmatch(pattern, p):
        if int(b) not in bits:
          raise UserError(f"mixed.pins[{j}] pins {pattern!r} to {b} bits, which is not among "
                          f"mixed.bit_choices={bits}")
        allowed[i] = [c == (int(b), int(b)) if mc.a_bits else c[0] == int(b) for c in choices]
        used[j] = True
        break
  for j, u in enumerate(used):
    if not u:
      raise UserError(f"mixed.pins[{j}] pattern {mc.pins[j][0]!r} matches no allocated layer; "
                      f"layer paths: {', '.join(paths)}")
  if mc.activation_bits_max:
    allowed &= np.asarray([c[1] <= mc.activation_bits_max for c in choices])[None]
  return allowed


def budgets_of(mc, layers) -> dict[str, float]:
  out = {}
  if mc.weight_bits_avg:
    out["weight_bits"] = float(mc.weight_bits_avg) * sum(l["weights"] for l in layers.values())
  if mc.bops_ratio:
    out["bops"] = float(mc.bops_ratio) * 64.0 * sum(l["macs"] for l in layers.values())
  if mc.latency_budget:
    out["latency"] = float(mc.latency_budget)
  if not out and not mc.activation_bits_max:
    raise UserError("mixed.enabled=True needs a budget: set mixed.weight_bits_avg, "
                    "mixed.bops_ratio, mixed.activation_bits_max or mixed.latency_budget")
  return out


def _prefix(path: str) -> str:
  return "".join(f"['{p}']" for p in path.split("/"))


def hessian_scores(config, model, x, y, paths, choices):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    return jnp.mean(cross_entropy(nnx.merge(graphdef, p, rest)(jnp.asarray(x), train=False),
                                  jnp.asarray(y)))

  groups = [lambda n, pre=_prefix(p): n.startswith(pre) and "['kernel']" in n for p in paths]
  r = sens.hutchinson_traces(loss, params, groups, jax.random.key(config.seed),
                             rel_tol=config.mixed.hutchinson_tol,
                             max_probes=config.mixed.hutchinson_max_probes)
  table = models.layer_table(model)
  kernels = [np.asarray((table[p].conv if hasattr(table[p], "conv") else table[p].linear).kernel.value)
             for p in paths]
  s = sens.hessian_sensitivity(r["trace"], kernels, choices)
  return s, {"trace": r["trace"].tolist(), "trace_stderr": r["stderr"].tolist(),
             "probes": int(r["probes"])}


def measured_scores(config, fm, x, y, num_classes, paths, choices):
  c = config.copy_and_resolve_references()
  c.quant.enabled, c.quant.estimator, c.quant.rules = True, "dbits", ()
  model, _ = quant_model.build(c, num_classes, x.shape[1:])
  nnx.update(model, nnx.state(fm, nnx.Param), nnx.state(fm, nnx.BatchStat))
  quant.calibrate(model, [x], config.quant.calib_act, config.quant.calib_weight,
                  config.quant.calib_percentile)
  s, base = sens.measured_sensitivity(model, paths, choices, x, y)
  return s, {"reference_loss": base}


def allocate(config, float_model, images, labels, num_classes: int) -> dict:
  """Runs the allocation for the trained `float_model` with the calibration set `images`, `labels`;
  returns `{"assignment": {path: {"w_bits", "a_bits"}}, "report": {...}}`."""
  mc = config.mixed
  x, y = np.asarray(images), np.asarray(labels)
  layers = models.layer_costs(float_model, x.shape[1:])
  paths = list(layers)
  choices = choices_of(mc)
  allowed = allowed_mask(paths, choices, mc)
  latency = cost_lib.load_latency(mc.latency_table) if mc.latency_table else None
  tables = cost_lib.cost_tables(layers, choices, latency)
  # layers that read the image keep the 8-bit pixel grid whatever a_bits a column names: their
  # size and BOPs are those of (w_bits, 8) (a latency table's entries are taken as they are)
  fixed = (quant_model.input_layers(float_model, models.layer_table(float_model), x.shape[1:])
           if config.get("input_norm", "pixel") == "pixel" else [])
  for p in fixed:
    i, pixel = paths.index(p), [(w, 8) for w, _ in choices]
    for k, v in cost_lib.cost_tables({p: layers[p]}, pixel).items():
      tables[k][i] = v[0]
  budgets = budgets_of(mc, layers)
  solver = solve_ilp if mc.solver == "ilp" else solve_greedy
  try:  # feasibility first, before the (slow) sensitivities
    solver(np.zeros((len(paths), len(choices))), {k: tables[k] for k in budgets}, budgets,
           allowed=allowed)
  except ValueError as e:
    raise UserError(f"mixed budgets: {e}") from None
  t0 = time.time()
  if mc.sensitivity == "hessian":
    s, info = hessian_scores(config, float_model, x, y, paths, choices)
  else:
    s, info = measured_scores(config, float_model, x, y, num_classes, paths, choices)
  seconds = time.time() - t0
  try:
    pick = solver(s, {k: tables[k] for k in budgets}, budgets, allowed=allowed)
  except ValueError as e:
    raise UserError(f"mixed budgets: {e}") from None
  rows = np.arange(len(paths))
  tot = cost_lib.totals(tables, pick)
  assignment = {p: {"w_bits": choices[c][0], "a_bits": 8 if p in fixed else choices[c][1]}
                for p, c in zip(paths, pick)}
  per_layer = {p: {"sensitivity": float(s[i, pick[i]]), "weight_bits": float(tables["weight_bits"][i, pick[i]]),
                   "bops": float(tables["bops"][i, pick[i]])} for i, p in enumerate(paths)}
  report = {"method": "ilp", "solver": mc.solver, "sensitivity": mc.sensitivity,
            "choices": [list(c) for c in choices], "budgets": budgets,
            "totals": {**tot, "weight_bits_avg": tot["weight_bits"] / sum(l["weights"] for l in layers.values()),
                       "bops_ratio": tot["bops"] / (64.0 * sum(l["macs"] for l in layers.values())),
                       "objective": float(s[rows, pick].sum())},
            "per_layer": per_layer, "sensitivity_seconds": round(seconds, 2), **info}
  return {"assignment": assignment, "report": report}
