"""Layer-by-layer comparison of the fake-quant model and the integer executor.

For every layer with one input grid (dense, conv and other `Linear` op kinds), the integer input
tensor the executor computed is compared with the
fake-quant model's quantized input `Q_a(x) / s + z` (the same grid): the max and mean absolute
difference in LSBs, so a mismatch is located at the first layer where it appears.

The two sides round the same real value, `(acc + bias) * S_in S_w / s_next`, differently only where it
lies near a rounding tie: the fake-quant model forms it in float32 (one product, one division), the
executor with a 31-bit fixed-point multiplier (`mpq.fixedpoint.requant_multiplier`), whose own
error bound in output LSBs is `2^-(r+1)` for TFLite's normalised form with right shift `r` (it
rounds twice) plus `|v| 2^-32 / m` for the multiplier's precision. `near_tie` is the fraction of a
layer's differing inputs whose fake-quant value `v = x / s` is within either side's error of
`k + 1/2`: `2^-21 |v|` (a few float32 ulps), or the fixed-point bound of the requantization that
produced the input (per channel; through max pooling, which commutes with it). 1.0 at the first
differing layer means the divergence started at such ties (later layers also inherit differences
from earlier ones).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mpq.intexec import intermediates
from mpq.rounding import half_up
from mpq.quant import quantizer as qz


def compare(model, manifest: dict, tensors: dict, images) -> list[dict]:
  taps = {}

  def tap(q, x, y):
    if q.role == "act":
      taps[q.name] = (np.asarray(x), np.asarray(y))

  with qz.hooks(model, tap=tap):
    logits_fq = np.asarray(model(jnp.asarray(images), train=False))
  env = intermediates(manifest, tensors, images)
  rows = []
  for op in manifest["ops"]:
    if op["name"] not in taps or "input_scale" not in op:  # the layers with one input grid
      continue
    x, y = taps[op["name"]]
    fq = y / op["input_scale"] + op["input_zero_point"]
    got = np.asarray(env[op["input"]], np.float64).reshape(fq.shape)
    d = np.abs(half_up(fq) - got)
    v = np.asarray(x, np.float64) / op["input_scale"]
    band = np.maximum(2.0 ** -21 * np.maximum(np.abs(v), 1.0),
                      _fixed_point_band(manifest, tensors, op["input"], v))
    near = np.abs(v - np.floor(v) - 0.5) <= band
    rows.append({"layer": op["name"], "max_lsb": float(d.max()), "mean_lsb": float(d.mean()),
                 "mismatch": float(np.mean(d > 0)),
                 "near_tie": float(np.mean(near[d > 0])) if np.any(d > 0) else None})
  last = manifest["ops"][-1]  # the logits: the last accumulator, or int8 on the output grid
  acc = np.asarray(env[last["input"]], np.float64)
  d = np.abs(logits_fq / np.asarray(last["scale"]) + last.get("zero_point", 0) - acc)
  rows.append({"layer": "logits", "max_lsb": float(np.max(d)), "mean_lsb": float(np.mean(d)),
               "mismatch": float(np.mean(d > 0.5)), "near_tie": None})
  return rows


def _fixed_point_band(manifest: dict, tensors: dict, tensor: str, v: np.ndarray) -> np.ndarray:
  """Per element of `v` (the grid values of `tensor`, channels last or flattened H, W, C), the
  error bound in output LSBs of a double-rounding requantization (rule `double`, the default of a
  manifest that names none, or `double_up`) that produced `tensor`, followed through max pooling:
  `2^(shift-1)` where `shift < 0` (two roundings) plus `|v| 2^-32 / m` with `m = M0 2^(shift-31)`;
  0 where another op or rule produced it (the single-rounding rules' error is within float32's)."""
  producer = {op["output"]: op for op in manifest["ops"]}
  op = producer.get(tensor)
  while op is not None and op["op"] == "max_pool":
    op = producer.get(op["input"])
  if (op is None or op["op"] != "requantize"
      or op.get("rule", "double") not in ("double", "double_up")):
    return np.zeros_like(v)
  m0 = np.ravel(np.asarray(tensors[op["multiplier"]], np.float64))
  shift = np.ravel(np.asarray(tensors[op["shift"]], np.float64))
  m = m0 * 2.0 ** (shift - 31)
  c = len(m0)
  reps = v.shape[-1] // c if c > 1 else 1
  two_roundings = np.tile(np.where(shift < 0, 2.0 ** (shift - 1), 0.0), reps)
  precision = np.tile(np.where(m > 0, 2.0 ** -32 / np.where(m > 0, m, 1.0), 0.0), reps)
  return two_roundings + np.abs(v) * precision
