"""Hardware cost models from layer shapes and bitwidths, as [layers, choices] tables for the ILP.

`layers` is `mpq.models.layer_costs(model, image_shape)` restricted to the allocated layers (dense
and conv: `{path: {"weights", "macs", "in", "out", ...}}`); `choices` is a list of (w_bits, a_bits).

  weight_bits   kernel elements x w_bits (model size in bits; biases stay int32 and are not counted)
  act_bits      input activation elements x a_bits (per layer; their sum is the total activation
                memory, their max over layers the peak of one layer's input)
  bops          MACs x w_bits x a_bits (bit operations per example, HAWQ-V3)
  latency       from a JSON table `{"layer/path": {"w4a4": ms, "w8a8": ms, ...}}` (optional)
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np

from mpq.errors import UserError


def cost_tables(layers: Mapping[str, dict], choices: Sequence[tuple[int, int]],
                latency: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, np.ndarray]:
  paths = list(layers)
  w = np.asarray([c[0] for c in choices], np.float64)[None]
  a = np.asarray([c[1] for c in choices], np.float64)[None]
  weights = np.asarray([layers[p]["weights"] for p in paths], np.float64)[:, None]
  macs = np.asarray([layers[p]["macs"] for p in paths], np.float64)[:, None]
  acts = np.asarray([np.prod(layers[p]["in"]) for p in paths], np.float64)[:, None]
  out = {"weight_bits": weights * w, "act_bits": acts * a, "bops": macs * w * a}
  if latency is not None:
    out["latency"] = latency_table(latency, paths, choices)
  return out


def latency_table(table: Mapping[str, Mapping[str, float]], paths: Sequence[str],
                  choices: Sequence[tuple[int, int]]) -> np.ndarray:
  """[layers, choices] latencies from `{"path": {"w4a8": ms, ...}}`; every entry must be present."""
  out = np.zeros((len(paths), len(choices)))
  for i, p in enumerate(paths):
    if p not in table:
      raise UserError(f"latency table has no entry for layer {p!r}; it holds {sorted(table)[:5]}...")
    for j, (wb, ab) in enumerate(choices):
      key = f"w{wb}a{ab}"
      if key not in table[p]:
        raise UserError(f"latency table entry {p!r} lacks {key!r}; it has {sorted(table[p])}")
      out[i, j] = float(table[p][key])
  return out


def load_latency(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read the latency table {path}: {e}") from None


def totals(tables: Mapping[str, np.ndarray], choice: np.ndarray) -> dict[str, float]:
  """Each cost summed over layers for a chosen column per layer (and `act_bits_peak`)."""
  rows = np.arange(len(choice))
  out = {n: float(t[rows, choice].sum()) for n, t in tables.items()}
  out["act_bits_peak"] = float(tables["act_bits"][rows, choice].max())
  return out
