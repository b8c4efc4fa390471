"""The int32 reference executor for `mpq-int` models (pure jax.numpy / lax, jittable).

Each IR op runs its registry entry's kernel (`mpq.ops`); this module sequences them.

`build(manifest, tensors)` returns `(run, core, quantize)`, each jitted (one compilation of the
whole graph, much faster than op-by-op dispatch): `run(images) -> logits` quantizes the float input,
executes the integer ops and dequantizes the final accumulator; `core(q_input) -> int32 accumulator`
is the integer part alone (every op on int32, products accumulated in int32 through
`preferred_element_type`), which a test inspects for floating-point ops.
"""

from __future__ import annotations

import jax

from mpq.ops import registry as op_registry


def _swapped(ops, t) -> set[int]:
  """Indices i of ops that may run after op i + 1: op i is `monotone` (a non-decreasing
  elementwise function, e.g. a requantization with M0 >= 0 and no left shift), its output feeds
  only op i + 1, and that op `commutes_with_monotone` (max pooling): `g(f(x)) == f(g(x))`
  exactly, and running f after a 2x2 max pool touches a quarter of the values."""
  uses: dict[str, int] = {}
  for op in ops:
    for name in op_registry.ir_op(op["op"]).inputs(op):
      uses[name] = uses.get(name, 0) + 1
  return {i for i, (op, nxt) in enumerate(zip(ops, ops[1:]))
          if op_registry.ir_op(nxt["op"]).commutes_with_monotone
          and op_registry.ir_op(nxt["op"]).inputs(nxt) == [op["output"]]
          and uses.get(op["output"]) == 1 and op_registry.ir_op(op["op"]).monotone(op, t)}


def _integer_op(op, env, t):
  return op_registry.ir_op(op["op"]).kernel(op, env, t)


def build(manifest: dict, tensors: dict):
  ops = manifest["ops"]
  first, last = ops[0], ops[-1]
  assert first["op"] == "quantize" and last["op"] == "dequantize", "malformed manifest"
  middle = ops[1:-1]

  swap = _swapped(middle, tensors)

  def core(q_in):
    env = {first["output"]: q_in}
    for i, op in enumerate(middle):
      if i in swap:  # runs after the op that follows it (same integers)
        continue
      if i - 1 in swap:
        f = middle[i - 1]
        pooled = _integer_op({**op, "input": f["input"]}, env, tensors)
        env[op["output"]] = _integer_op({**f, "input": "_swapped"}, {"_swapped": pooled}, tensors)
        continue
      env[op["output"]] = _integer_op(op, env, tensors)
    return env[last["input"]]

  def quantize(images):
    return _integer_op(first, {first["input"]: images}, tensors)

  def run(images):
    return _integer_op(last, {last["input"]: core(quantize(images))}, tensors)

  return jax.jit(run), jax.jit(core), jax.jit(quantize)


def intermediates(manifest: dict, tensors: dict, images) -> dict:
  """Every integer tensor of one forward pass, by tensor name (for layer-by-layer comparison)."""
  ops = manifest["ops"]
  _, _, quantize = build(manifest, tensors)
  env = {ops[0]["output"]: quantize(images)}
  for op in ops[1:-1]:
    env[op["output"]] = _integer_op(op, env, tensors)
  return env
