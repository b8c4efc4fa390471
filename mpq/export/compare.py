"""Layer-by-layer comparison of the fake-quant model and the integer executor.

For every dense/conv layer, the integer input tensor the executor computed is compared with the
fake-quant model's quantized input `Q_a(x) / s + z` (the same grid): the max and mean absolute
difference in LSBs, so a mismatch is located at the first layer where it appears.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mpq.intexec import intermediates
from mpq.quant import quantizer as qz


def compare(model, manifest: dict, tensors: dict, images) -> list[dict]:
  taps = {}

  def tap(q, x, y):
    if q.role == "act":
      taps[q.name] = np.asarray(y)

  qz.TAPS.append(tap)
  try:
    logits_fq = np.asarray(model(jnp.asarray(images), train=False))
  finally:
    qz.TAPS.remove(tap)
  env = intermediates(manifest, tensors, images)
  rows = []
  for op in manifest["ops"]:
    if op["op"] not in ("conv2d", "dense") or op["name"] not in taps:
      continue
    fq = taps[op["name"]] / op["input_scale"] + op["input_zero_point"]
    got = np.asarray(env[op["input"]], np.float64).reshape(fq.shape)
    d = np.abs(np.round(fq) - got)
    rows.append({"layer": op["name"], "max_lsb": float(d.max()), "mean_lsb": float(d.mean()),
                 "mismatch": float(np.mean(d > 0))})
  last = manifest["ops"][-1]
  acc = np.asarray(env[last["input"]], np.float64)
  scale = np.asarray(last["scale"])
  rows.append({"layer": "logits", "max_lsb": float(np.max(np.abs(logits_fq / scale - acc))),
               "mean_lsb": float(np.mean(np.abs(logits_fq / scale - acc))),
               "mismatch": float(np.mean(np.abs(logits_fq / scale - acc) > 0.5))})
  return rows
