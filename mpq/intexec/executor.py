"""The int32 reference executor for `mpq-int` models (pure jax.numpy / lax, jittable).

Each IR op runs its registry entry's kernel (`mpq.ops`); this module sequences them.

`build(manifest, tensors)` returns `(run, core, quantize)`: `run(images) -> logits` quantizes the float input,
executes the integer ops and dequantizes the final accumulator; `core(q_input) -> int32 accumulator`
is the integer part alone (every op on int32, products accumulated in int32 through
`preferred_element_type`), which a test inspects for floating-point ops.
"""

from __future__ import annotations

import jax
import numpy as np

from mpq.ops import registry as op_registry
from mpq.ops.io import requantize
from mpq.ops.pool import max_pool


def _pool_first(ops, t) -> set[int]:
  """Indices i of `requantize` ops that may run after the `max_pool` at i + 1: the requantized
  tensor feeds only that pool, and the requantization is non-decreasing in the accumulator
  (multipliers >= 0, shifts <= 0, so no left shift can wrap; the high multiply, the rounding
  shift and the clamp are then all monotone). For a non-decreasing f, `max(f(a)) == f(max(a))`
  exactly, and pooling first requantizes a quarter of the values (a 2x2 window)."""
  uses: dict[str, int] = {}
  for op in ops:
    for name in op.get("inputs", [op.get("input")]):
      uses[name] = uses.get(name, 0) + 1
  out = set()
  for i, (op, nxt) in enumerate(zip(ops, ops[1:])):
    if (op["op"] == "requantize" and nxt["op"] == "max_pool" and nxt["input"] == op["output"]
        and uses.get(op["output"]) == 1 and np.all(np.asarray(t[op["multiplier"]]) >= 0)
        and np.all(np.asarray(t[op["shift"]]) <= 0)):
      out.add(i)
  return out


def _integer_op(op, env, t):
  return op_registry.ir_op(op["op"]).kernel(op, env, t)


def build(manifest: dict, tensors: dict):
  ops = manifest["ops"]
  first, last = ops[0], ops[-1]
  assert first["op"] == "quantize" and last["op"] == "dequantize", "malformed manifest"
  middle = ops[1:-1]

  swap = _pool_first(middle, tensors)

  def core(q_in):
    env = {first["output"]: q_in}
    for i, op in enumerate(middle):
      if i in swap:  # requantize after the max_pool that follows it (same integers)
        continue
      if i - 1 in swap:
        rq = middle[i - 1]
        env[op["output"]] = requantize(rq, max_pool(env[rq["input"]], op["window"]), tensors)
        continue
      env[op["output"]] = _integer_op(op, env, tensors)
    return env[last["input"]]

  def quantize(images):
    return _integer_op(first, {first["input"]: images}, tensors)

  def run(images):
    return _integer_op(last, {last["input"]: core(quantize(images))}, tensors)

  return jax.jit(run), core, quantize


def intermediates(manifest: dict, tensors: dict, images) -> dict:
  """Every integer tensor of one forward pass, by tensor name (for layer-by-layer comparison)."""
  ops = manifest["ops"]
  _, _, quantize = build(manifest, tensors)
  env = {ops[0]["output"]: quantize(images)}
  for op in ops[1:-1]:
    env[op["output"]] = _integer_op(op, env, tensors)
  return env
