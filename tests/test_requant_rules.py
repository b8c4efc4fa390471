"""The executor's requantization rules (`mpq.ops.io.REQUANT_RULES`): each kernel family's arithmetic
in int32 (and float32 where the family computes in float32), checked against LiteRT and ONNX
Runtime themselves on FULLY_CONNECTED / QLinearMatMul, and against the int64 NumPy transcriptions
that `tests/test_litert_rules.py` verifies against LiteRT, on random and exact-tie accumulators."""

import math

import numpy as np
import pytest

# The runtimes are part of `make setup` (the deploy extra): without them these tests fail.
import ai_edge_litert  # noqa: F401
import onnxruntime  # noqa: F401

import jax.numpy as jnp

from mpq import intexec
from mpq.errors import UserError
from mpq.export import litert_rules as R
from mpq.export import onnx_builder as ob
from mpq.export import tflite_builder as tb
from mpq.fixedpoint import quantize_multiplier
from mpq.ops import io

F32 = np.float32


def _accumulators(rng, n, m0, shift):
  """int32 accumulators: random, and for M0 = 2^30 (M = 2^(shift-1)) exact ties x M = k + 1/2."""
  x = rng.integers(-2 ** 22, 2 ** 22, n).astype(np.int64)
  if m0 == 1 << 30 and shift <= 0:
    k = 2 ** min(12, 28 + shift)  # |x| < 2^30
    x[: n // 4] = (2 * rng.integers(-k, k, n // 4) + 1) << -shift
  return x


def _run_rule(rule, acc, tensors_by_field, z_out=0, clamp=(-2 ** 31, 2 ** 31 - 1)):
  """The executor's requantize op with `rule` on `acc` (shape [B, C])."""
  op = {"op": "requantize", "name": "rq", "input": "a", "output": "q", "rule": rule,
        "zero_point": z_out, "clamp": list(clamp), "bits": 16}
  tensors = {}
  for field, dtype in io.REQUANT_RULES[rule].fields:
    tensors[f"rq/{field}"] = np.asarray(tensors_by_field[field], dtype)
    op[field] = f"rq/{field}"
  return np.asarray(io.requantize(op, jnp.asarray(acc, jnp.int32), tensors), np.int64)


@pytest.mark.parametrize("rule,numpy_rule", [
    ("double", R.mbqm), ("double_up", R.mbqm_up), ("single_away", R.mbqm_single_away)])
def test_fixed_point_rules_equal_their_int64_transcriptions(rule, numpy_rule):
  rng = np.random.default_rng(0)
  shifts = [0, -1, -5, -10, -17, -25, 2, 7]
  for shift in shifts:
    for m0 in (1 << 30, (1 << 30) + (1 << 20), int(rng.integers(1 << 30, 1 << 31)), 1518500250):
      x = _accumulators(rng, 4000, m0, shift)
      if shift > 0:
        x >>= shift + 1  # no wrap on the left shift
      got = _run_rule(rule, x[:, None], {"multiplier": [m0], "shift": [shift]})[:, 0]
      np.testing.assert_array_equal(got, numpy_rule(x, m0, shift), err_msg=f"{m0} {shift}")


def test_float32_rule_equals_rounding_in_float32():
  rng = np.random.default_rng(1)
  x = rng.integers(-2 ** 24, 2 ** 24, (3000, 3)).astype(np.int64)
  x[:1000] = rng.integers(-500, 500, (1000, 3)) * 2 + 1  # odd: halves under scale 0.5
  scale = np.asarray([0.5, 2.0 ** -7, 0.013671875], F32)
  got = _run_rule("float32_even", x, {"scale": scale})
  np.testing.assert_array_equal(got, R.rint_f32(x.astype(F32) * scale))


def _fc_case(rng, ties: bool):
  """int8 activations, per-channel int8 weights, int32 bias; scales random or powers of two."""
  k, c, b = 24, 6, 500
  q = rng.integers(-128, 128, (b, k)).astype(np.int64)
  w = rng.integers(-127, 128, (c, k)).astype(np.int64)
  bias = rng.integers(-2000, 2000, c).astype(np.int64)
  if ties:
    s_in, s_out = 2.0 ** -4, 2.0 ** -2
    s_w = 2.0 ** -rng.integers(5, 9, c).astype(np.float64)
  else:
    s_in, s_out = rng.uniform(0.01, 0.1), rng.uniform(0.05, 0.5)
    s_w = rng.uniform(0.001, 0.02, c)
  return q, w, bias, float(s_in), s_w, float(s_out), 3  # input zero point 3


def _manifest(q_shape, w, bias, z_in, rule, fields, z_out):
  """quantize -> dense -> requantize(rule) -> dequantize, as the executor runs it."""
  tensors = {"fc/weight": np.asarray(w.T, np.int32), "fc/bias": np.asarray(bias, np.int32)}
  rq = {"op": "requantize", "name": "fc->out", "input": "acc", "output": "y", "rule": rule,
        "zero_point": z_out, "clamp": [-128, 127], "bits": 8}
  for field, dtype in io.REQUANT_RULES[rule].fields:
    tensors[f"rq/{field}"] = np.asarray(fields[field], dtype)
    rq[field] = f"rq/{field}"
  ops = [{"op": "quantize", "name": "in", "input": "input", "output": "x", "scale": 1.0,
          "zero_point": 0, "qmin": -128, "qmax": 127, "bits": 8},
         {"op": "dense", "name": "fc", "input": "x", "output": "acc", "weight": "fc/weight",
          "bias": "fc/bias", "weight_shape": [q_shape[1], w.shape[0]], "w_bits": 8, "a_bits": 8,
          "input_zero_point": z_in, "input_range": [-128, 127]},
         rq, {"op": "dequantize", "name": "out", "input": "y", "output": "logits", "scale": [1.0]}]
  return {"ops": ops}, tensors


def _fields(rule, s_in, s_w, s_out):
  """The requantize op's tensors for `rule`, derived from the float32 scales as the runtimes do."""
  if rule == "float32_even":
    return {"scale": (F32(F32(s_in) * s_w.astype(F32)) / F32(s_out)).astype(F32)}
  pairs = [quantize_multiplier(float(F32(s_in)) * float(F32(sw)) / float(F32(s_out))) for sw in s_w]
  return {"multiplier": [p[0] for p in pairs], "shift": [p[1] for p in pairs]}


def _tflite_fc(q, w, bias, s_in, s_w, s_out, z_in, z_out):
  b = tb.TFLiteBuilder()
  x = b.add_tensor("x", list(q.shape), "int8", scale=s_in, zero_point=z_in)
  wt = b.add_tensor("w", list(w.shape), "int8", data=w, scale=s_w, zero_point=0)
  bt = b.add_tensor("b", [w.shape[0]], "int32", data=bias, scale=F32(s_in) * s_w.astype(F32),
                    zero_point=0)
  y = b.add_tensor("y", [q.shape[0], w.shape[0]], "int8", scale=s_out, zero_point=z_out)
  b.add_operator("FULLY_CONNECTED", [x, wt, bt], [y], b.options("FullyConnectedOptions"))
  b.set_io([x], [y])
  return b.finish()


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("family,rule", [("litert-ref", "single_away"), ("litert-ruy", "double_up"),
                                         ("litert-auto", "float32_even")])
def test_executor_dense_equals_litert_fully_connected(family, rule, ties):
  rng = np.random.default_rng(7 + ties)
  q, w, bias, s_in, s_w, s_out, z_in = _fc_case(rng, ties)
  z_out = -5
  model = _tflite_fc(q, w, bias, s_in, s_w, s_out, z_in, z_out)
  if family == "litert-auto":
    assert tb.delegated_ops(model) == (["FULLY_CONNECTED"], [])  # XNNPACK's rule applies
  (want,) = tb.run(model, [q.astype(np.int8)], family)
  manifest, tensors = _manifest(q.shape, w, bias, z_in, rule, _fields(rule, s_in, s_w, s_out),
                                z_out)
  _, core, _ = intexec.build(manifest, tensors)
  got = np.asarray(core(jnp.asarray(q, jnp.int32)))
  np.testing.assert_array_equal(got, want.astype(np.int64))


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_executor_dense_equals_onnx_runtime_qlinearmatmul(ties):
  rng = np.random.default_rng(11 + ties)
  q, w, _, s_in, s_w, s_out, z_in = _fc_case(rng, ties)
  s_w = np.full_like(s_w, s_w[0])  # QLinearMatMul: one weight scale per tensor here
  z_out = 128
  b = ob.OnnxBuilder()
  x = b.input("x", list(q.shape), "uint8")
  args = [x, b.const("sx", np.float32(s_in)), b.const("zx", np.uint8(z_in + 128), "uint8"),
          b.const("w", (w.T + 128).astype(np.uint8), "uint8"), b.const("sw", np.float32(s_w[0])),
          b.const("zw", np.uint8(128), "uint8"), b.const("sy", np.float32(s_out)),
          b.const("zy", np.uint8(z_out), "uint8")]
  (y,) = b.node("QLinearMatMul", args, ["y"])
  b.output(y, "uint8", [q.shape[0], w.shape[0]])
  (want,) = ob.run(b.finish(), [(q + 128).astype(np.uint8)])
  fields = _fields("float32_even", s_in, s_w, s_out)
  manifest, tensors = _manifest(q.shape, w, np.zeros(w.shape[0], np.int64), z_in, "float32_even",
                                fields, z_out - 128)
  _, core, _ = intexec.build(manifest, tensors)
  got = np.asarray(core(jnp.asarray(q, jnp.int32))) + 128
  np.testing.assert_array_equal(got, want.astype(np.int64))


def test_rules_differ_where_the_runtimes_do():
  """Exact ties separate the rules (so the tests above could fail): x M = k + 1/2."""
  m0, shift = 1 << 30, -3  # M = 2^-4: x = 8 (mod 16) is a tie
  x = np.asarray([[8], [-8], [24], [-24]], np.int64)
  out = {r: _run_rule(r, x, {"multiplier": [m0], "shift": [shift]})[:, 0].tolist()
         for r in ("double", "double_up", "single_away", "exact")}
  out["float32_even"] = _run_rule("float32_even", x, {"scale": [2.0 ** -4]})[:, 0].tolist()
  assert out == {"double": [1, -1, 2, -2], "double_up": [1, 0, 2, -1],
                 "single_away": [1, -1, 2, -2], "exact": [1, 0, 2, -1],
                 "float32_even": [0, 0, 2, -2]}


def _need(op, field, ok, what):
  if not ok:
    raise UserError(f"op {op['name']!r}: field {field!r} {what}")


def test_manifest_rule_is_validated():
  op = {"op": "requantize", "name": "rq", "input": "a", "output": "q", "rule": "nearest",
        "multiplier": "m", "shift": "s", "zero_point": 0, "clamp": [-128, 127], "bits": 8}
  raw = {"m": np.asarray([1 << 30], np.int32), "s": np.asarray([-3], np.int32)}
  with pytest.raises(UserError, match="field 'rule' must be one of double, double_up"):
    io.Requantize().validate(op, raw, {}, _need)
  io.Requantize().validate({**op, "rule": "single_away"}, raw, {}, _need)  # valid
  fl = {**op, "rule": "float32_even", "scale": "sc"}
  with pytest.raises(UserError, match="field 'scale' must hold finite numbers >= 0"):
    io.Requantize().validate(fl, {"sc": np.asarray([-1.0], np.float32)}, {}, _need)
  with pytest.raises(UserError, match="float32 tensor"):
    io.Requantize().validate(fl, {"sc": np.asarray([1], np.int32)}, {}, _need)
  with pytest.raises(UserError, match="field 'shift' must hold integers in \\[-31, 30\\] \\(rule 'single_away'\\)"):
    io.Requantize().validate({**op, "rule": "single_away"},
                             {"m": raw["m"], "s": np.asarray([31], np.int32)}, {}, _need)


def _xnnpack_case(op, rng, ratio, tie):
  """A single ADD / QUANTIZE int8 -> int8 model whose first input's scale ratio to the output is
  `ratio` (power-of-two scales with `tie`), its inputs, and the IR op the emulation runs for it."""
  from benchmarks.litert_rules import _single_op  # pylint: disable=g-import-not-at-top
  n = 4096
  s_out = float(2.0 ** -rng.integers(3, 9)) if tie else float(F32(rng.uniform(1e-3, 0.1)))
  s_a = float(F32(s_out * ratio))
  s_b = float(F32(s_a * (0.5 if tie else rng.uniform(0.4, 1.0))))
  z_a, z_b, z_out = (int(v) for v in rng.integers(-128, 128, 3))
  a, b = (rng.integers(-128, 128, (1, n)).astype(np.int8) for _ in range(2))
  if op == "ADD":
    model = _single_op("ADD", [("a", [1, n], "int8", dict(scale=s_a, zero_point=z_a)),
                               ("b", [1, n], "int8", dict(scale=s_b, zero_point=z_b))],
                       ("y", [1, n], "int8", dict(scale=s_out, zero_point=z_out)))
    ir = {"op": "add_grid", "rule": "xnnpack", "name": "add", "inputs": ["a", "b"],
          "output": "y", "input_scales": [s_a, s_b], "input_zero_points": [z_a, z_b],
          "input_storage": [0, 0], "a_bits": [8, 8], "quantizers": ["a", "b"],
          "output_scale": s_out, "output_zero_point": z_out, "output_storage": 0}
    return model, [a, b], ir, [s_a / s_out, s_b / s_out]
  model = _single_op("QUANTIZE", [("a", [1, n], "int8", dict(scale=s_a, zero_point=z_a))],
                     ("y", [1, n], "int8", dict(scale=s_out, zero_point=z_out)))
  ir = {"op": "requantize_grid", "rule": "xnnpack", "name": "q", "input": "a", "output": "y",
        "input_scale": s_a, "input_zero_point": z_a, "scale": s_out, "zero_point": z_out,
        "clamp": [-128, 127], "bits": 8}
  return model, [a], ir, [s_a / s_out]


@pytest.mark.parametrize("op", ["ADD", "QUANTIZE"])
def test_xnnpack_add_and_quantize_rules_equal_litert_auto(op):
  """XNNPACK's qs8 add and qs8 convert (what LiteRT `AUTO` runs for ADD and QUANTIZE int8 -> int8
  when XNNPACK takes them) are the executor's `add_grid` / `requantize_grid` rule `xnnpack`, output
  for output, on random and power-of-two scales; whether XNNPACK takes the op follows
  `xnnpack_takes` at both sides of its scale-ratio bounds (ADD [2^-10, 2^8), QUANTIZE
  [2^-8, 2^7]). Where it does not take an ADD the builtin kernel's results differ (QUANTIZE then
  saturates almost every value either way)."""
  from mpq.ops.add import AddGridIR  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7 if op == "ADD" else 8)
  inside = [2.0 ** -7, 0.03, 0.7, 1.0, 3.3, 100.0] + ([2.0 ** 7] if op == "QUANTIZE" else [200.0])
  outside = [2.0 ** -12, 300.0, 2.0 ** 9] if op == "ADD" else [2.0 ** -10, 200.0]
  compared = 0
  for ratio in inside + outside:
    for tie in (False, True):
      model, inputs, ir, ratios = _xnnpack_case(op, rng, ratio, tie)
      taken, _ = tb.delegated_ops(model, "litert-auto")
      expect = R.xnnpack_takes(op, ratios=[float(F32(r)) for r in ratios])
      assert bool(taken) == expect == (ratio in inside), (op, ratio, taken)
      (got,) = tb.run(model, inputs, "litert-auto")
      env = dict(zip(["a", "b"], [jnp.asarray(x, jnp.int32) for x in inputs]))
      if op == "ADD":
        want = np.clip(np.asarray(AddGridIR().kernel(ir, env, {})) + ir["output_zero_point"],
                       -128, 127)
      else:
        want = np.asarray(io.RequantizeGrid().kernel(ir, env, {}))
      if expect:
        np.testing.assert_array_equal(got, want, err_msg=f"{op} ratio {ratio} tie {tie}")
        compared += got.size
      elif op == "ADD" and ratio > 1:
        assert np.any(got != want), (op, ratio)  # the builtin kernel rounds otherwise
  assert compared >= 12 * 4096


def test_exact_rule_is_one_half_up_rounding_of_the_exact_product():
  """Rule `exact` (the mpq target's) against exact rational arithmetic: floor(x M0 2^(shift-31)
  + 1/2) for random accumulators, exact ties of both signs and the int32 edges, every shift."""
  from fractions import Fraction
  rng = np.random.default_rng(5)
  for shift in (-31, -25, -17, -12, -5, -1, 0, 3, 12):
    for m0 in (1 << 30, (1 << 31) - 1, int(rng.integers(1 << 30, 1 << 31)), 2995975, 1):
      n = 31 - shift
      lim = min(2 ** 31 - 1, (2 ** 31 - 1) * 2 ** n // m0)  # results within int32
      x = rng.integers(-lim, lim, 600, endpoint=True)
      x = np.concatenate([x, [0, 1, -1, lim, -lim]])
      if m0 == 1 << 30 and n <= 32:  # x M = k + 1/2 exactly: ties of either sign
        x = np.concatenate([x, [2 ** (n - 31) * (2 * k + 1) for k in (-3, -1, 0, 2)]])
      x = x.astype(np.int64)
      got = _run_rule("exact", x[:, None], {"multiplier": [m0], "shift": [shift]})[:, 0]
      want = [math.floor(Fraction(int(v) * m0, 2 ** n) + Fraction(1, 2)) for v in x]
      np.testing.assert_array_equal(got, want, err_msg=f"{m0} {shift}")


def test_exact_rule_has_no_double_rounding():
  """x m = 41035 * 2^-31 * 1178939956 * 2^-12 = 5.49992 (a trained layer's channel): TFLite's
  normalised double rounding gives 6 (its first rounding lands on 5.5), `exact` gives 5."""
  x = np.asarray([[41035], [-41035]], np.int64)
  f = {"multiplier": [1178939956], "shift": [-12]}
  assert _run_rule("double", x, f)[:, 0].tolist() == [6, -6]
  assert _run_rule("exact", x, f)[:, 0].tolist() == [5, -5]
