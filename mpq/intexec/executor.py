"""The int32 reference executor for `mpq-int` models (pure jax.numpy / lax, jittable).

`build(manifest, tensors)` returns `(run, core, quantize)`: `run(images) -> logits` quantizes the float input,
executes the integer ops and dequantizes the final accumulator; `core(q_input) -> int32 accumulator`
is the integer part alone (every op on int32, products accumulated in int32 through
`preferred_element_type`), which a test inspects for floating-point ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mpq.intexec.fixedpoint import multiply_by_quantized_multiplier, rounding_divide_by_pot
from mpq.quant.core import round_half_up


def _max_pool(x, w):
  b, h, wd, c = x.shape
  h, wd = h // w, wd // w
  return x[:, :h * w, :wd * w].reshape(b, h, w, wd, w, c).max(axis=(2, 4))


# XLA CPU sends int8 convolutions with at most 16 input and 16 output channels to its generic
# emitter and larger ones to YNNPACK; measured on 256x28x28 inputs, 3x3, 16 -> 16 channels: 87 ms,
# the same with the output zero-padded to 17 channels: 12 ms (24: 13 ms, 32: 15 ms). Padded output
# channels (zero weights) are sliced off, so the result is unchanged.
_SMALL_CHANNELS, _PADDED_CHANNELS = 16, 17


def _matmul_op(op, x, t):
  """conv2d / dense: `sum (x - z_in) w + bias` accumulated in int32.

  When the weights have at most 8 bits and the input grid spans at most 256 values, the operands
  go in as int8 (XLA CPU runs int8 x int8 -> int32 convolutions through oneDNN, about 60x faster
  than int32 ones): `x - z_in = u + off` with `u = x - qmin - 128` in [-128, 127] and
  `off = qmin + 128 - z_in`, so the sum is `sum u w + off * sum_valid w`, the second term a
  convolution of ones (zero padding included) computed on one image. Exact: every term is an
  integer and the accumulation is int32 either way. Small convolutions get zero output channels
  (see `_SMALL_CHANNELS`)."""
  w = t[op["weight"]]
  conv = op["op"] == "conv2d"
  if not conv:
    x = x.reshape(x.shape[0], -1)

  def apply(a, b):
    if conv:
      return jax.lax.conv_general_dilated(
          a, b, tuple(op["stride"]), op["padding"], feature_group_count=op["groups"],
          dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.int32)
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)

  z = int(op["input_zero_point"])
  qmin, qmax = op.get("input_range", (None, None))
  if op["w_bits"] <= 8 and qmin is not None and qmax - qmin <= 255:
    w8 = jnp.asarray(w, jnp.int8)
    cout = w8.shape[-1]
    if conv and op["groups"] == 1 and max(w8.shape[-2], cout) <= _SMALL_CHANNELS:
      w8 = jnp.pad(w8, ((0, 0),) * 3 + ((0, _PADDED_CHANNELS - cout),))
    acc = apply((x - jnp.int32(qmin + 128)).astype(jnp.int8), w8)
    off = qmin + 128 - z
    if off:
      acc = acc + jnp.int32(off) * apply(jnp.ones((1, *x.shape[1:]), jnp.int8), w8)
    acc = acc[..., :cout]
  else:
    acc = apply(x - jnp.int32(z), jnp.asarray(w, jnp.int32))
  return acc + jnp.asarray(t[op["bias"]], jnp.int32)


def _requantize(op, x, t):
  m0 = np.asarray(t[op["multiplier"]])
  y = multiply_by_quantized_multiplier(x, jnp.asarray(m0, jnp.int32),
                                       jnp.asarray(t[op["shift"]], jnp.int32),
                                       nonneg=bool(np.all(m0 >= 0)))
  lo, hi = op["clamp"]
  return jnp.clip(y + jnp.int32(op["zero_point"]), jnp.int32(lo), jnp.int32(hi))


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
  kind = op["op"]
  if kind == "add":  # TFLite ADD: inputs shifted left, rescaled to a common scale, summed
    acc = jnp.int32(0)
    for name, z, m0, sh in zip(op["inputs"], op["input_zero_points"], op["multipliers"],
                               op["shifts"]):
      xi = jnp.left_shift(env[name] - jnp.int32(z), jnp.int32(op["left_shift"]))
      acc = acc + multiply_by_quantized_multiplier(xi, jnp.int32(m0), jnp.int32(sh),
                                                   nonneg=m0 >= 0)
    return acc
  x = env[op["input"]]
  if kind in ("conv2d", "dense"):
    return _matmul_op(op, x, t)
  if kind == "requantize":
    return _requantize(op, x, t)
  if kind == "max_pool":
    return _max_pool(x, op["window"])
  if kind == "shift":  # rounding right shift (RoundingDivideByPOT), headroom before a sum
    return rounding_divide_by_pot(x, jnp.int32(op["right"]))
  if kind == "sum_pool":  # global average pooling's sum; 1 / (H W) is in the next multiplier
    return jnp.sum(x, axis=(1, 2), dtype=jnp.int32)
  if kind == "clamp":
    hi = op["hi"]
    hi = jnp.asarray(t[hi], jnp.int32) if isinstance(hi, str) else jnp.int32(hi)
    return jnp.clip(x, jnp.int32(op["lo"]), hi)
  raise ValueError(f"op {op['name']!r}: {kind!r} is not an integer op")


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
        env[op["output"]] = _requantize(rq, _max_pool(env[rq["input"]], op["window"]), tensors)
        continue
      env[op["output"]] = _integer_op(op, env, tensors)
    return env[last["input"]]

  def quantize(images):
    x = round_half_up(jnp.asarray(images, jnp.float32) / first["scale"]) + first["zero_point"]
    return jnp.clip(x, first["qmin"], first["qmax"]).astype(jnp.int32)

  scale = jnp.asarray(np.asarray(last["scale"], np.float32))

  def run(images):
    return core(quantize(images)).astype(jnp.float32) * scale

  return jax.jit(run), core, quantize


def intermediates(manifest: dict, tensors: dict, images) -> dict:
  """Every integer tensor of one forward pass, by tensor name (for layer-by-layer comparison)."""
  ops = manifest["ops"]
  _, _, quantize = build(manifest, tensors)
  env = {ops[0]["output"]: quantize(images)}
  for op in ops[1:-1]:
    env[op["output"]] = _integer_op(op, env, tensors)
  return env
