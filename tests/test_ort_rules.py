"""ONNX Runtime's integer rule for each op the onnx export uses, against the real runtime (issue 15
(a), the ORT half); `benchmarks/ort_rules.py` runs the same cases at full size.

Every case is an ONNX model written by `mpq.export.onnx_builder`, run by ONNX Runtime's CPU execution
provider at ORT_DISABLE_ALL and ORT_ENABLE_ALL with 1 and 2 intra-op threads, and compared output for
output with the NumPy rule of `mpq.export.ort_rules`: 0 mismatches, random and tie-heavy scales.
The QDQ forms are checked for what ORT runs after optimization (fused into QLinearConv or not).
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest

# The runtime is part of `make setup` (the deploy extra): without it these tests fail, not skip.
import onnxruntime  # noqa: E402,F401

from benchmarks import ort_rules as B  # noqa: E402
from mpq.export import onnx_builder as ob  # noqa: E402
from mpq.export import ort_rules as R  # noqa: E402

# each (case, regime): CONFIGS random models of about OUTPUTS outputs, at each level x threads
OUTPUTS = 20_000
CONFIGS = 3
# int8-weight cases depend on the CPU (they saturate without VNNI): measured by the benchmark only
RULE_CASES = [n for n in B.CASES if not n.startswith("QDQ") and not n.endswith("s8w")]
GRID = [(name, regime) for name in RULE_CASES for regime in B.REGIMES]


@pytest.mark.parametrize("name,regime", GRID, ids=[f"{n}-{r}" for n, r in GRID])
def test_rule_matches_runtime(name, regime):
  rng = np.random.default_rng(zlib.crc32(f"{name}/{regime}".encode()))
  compared = 0
  for _ in range(CONFIGS):
    case = B.CASES[name](rng, regime, OUTPUTS)
    for level in B.LEVELS:
      for threads in B.THREADS:
        r = B.measure(case, level, threads)
        assert r["mismatches"] == 0, (name, regime, level, threads, r, case.params)
        compared += r["outputs"]
  assert compared >= CONFIGS * len(B.LEVELS) * len(B.THREADS) * min(OUTPUTS, 1000)


@pytest.mark.parametrize("regime", B.REGIMES)
def test_qdq_uint8_conv_fuses_and_matches(regime):
  """DequantizeLinear -> Conv -> QuantizeLinear with uint8 activations and uint8 weights runs as
  QLinearConv from ORT_ENABLE_EXTENDED up (NHWC com.microsoft.QLinearConv between Transposes at
  ORT_ENABLE_LAYOUT and ORT_ENABLE_ALL), then follows QLinearConv's rule exactly; below that it
  runs the float ops."""
  rng = np.random.default_rng(zlib.crc32(f"qdq/{regime}".encode()))
  case = B.case_qdq_conv(rng, regime, OUTPUTS)
  float_ops = ["DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv", "QuantizeLinear"]
  assert ob.kernels(case.model, "disable") == float_ops
  assert ob.kernels(case.model, "basic") == float_ops
  assert ob.kernels(case.model, "extended") == ["QLinearConv"]
  assert ob.kernels(case.model, "all") == ["Transpose", "com.microsoft.QLinearConv", "Transpose"]
  for level in ("extended", "all"):
    for threads in B.THREADS:
      assert B.measure(case, level, threads)["mismatches"] == 0, (level, threads, case.params)


@pytest.mark.parametrize("name", ["QDQConv/i8", "QDQConv/u8-int4w", "QDQMatMul/u8-int4w"])
def test_qdq_forms_that_stay_float(name):
  """Not fused at any level, so they run float Conv / MatMul (not integer-exact in general): int8
  activations (x86), and INT4 weights (opset-21 DequantizeLinear; per-channel, no MatMulNBits)."""
  case = B.CASES[name](np.random.default_rng(0), "random", 2_000)
  float_op = "MatMul" if "MatMul" in name else "Conv"
  for level in ob.LEVELS:
    ran = ob.kernels(case.model, level)
    assert float_op in ran and not any(k.split(".")[-1].startswith("QLinear") for k in ran), \
        (level, ran)


def test_qlinear_add_rule_is_not_the_documented_formula():
  """QLinearAdd's AVX2 kernel folds the zero points into a float constant before rounding, so it
  differs from `rint((s_a (a - z_a) + s_b (b - z_b)) / s_c) + z_c` on exact ties; the runtime
  follows `ort_rules.qlinear_add` there."""
  a = np.array([[216, 203, 2]], np.uint8)
  b = np.array([[86, 182, 137]], np.uint8)
  builder = ob.OnnxBuilder()
  xa, xb = builder.input("a", [1, 3], "uint8"), builder.input("b", [1, 3], "uint8")
  s_a, s_b, s_c, z_a, z_b, z_c = 2.0 ** -6, 2.0 ** -10, 2.0 ** -8, 206, 120, 131
  y = builder.node("QLinearAdd", [xa, builder.const(None, s_a), builder.const(None, z_a, "uint8"),
                                  xb, builder.const(None, s_b), builder.const(None, z_b, "uint8"),
                                  builder.const(None, s_c), builder.const(None, z_c, "uint8")], ["y"])
  builder.output(y, "uint8", [1, 3])
  (got,) = ob.run(builder.finish(), [a, b])
  documented = np.rint((s_a * (a.astype(np.int64) - z_a) + s_b * (b.astype(np.int64) - z_b)) / s_c) \
      + z_c
  assert got[0, 0] == R.qlinear_add(a, z_a, s_a, b, z_b, s_b, s_c, z_c)[0, 0] == 162
  assert documented[0, 0] == 163


@pytest.mark.parametrize("s,z,a,b,want", [
    ((0.061692003, 0.029375948, 0.007202051), (230, 202, 125), 234, 205, 171),
    ((0.0054555745, 0.0018741342, 0.003962359), (94, 160, 26), 164, 63, 77)])
def test_qlinear_add_constant_is_one_fma(s, z, a, b, want):
  """The kernel's constant `z_c - (r_a z_a + r_b z_b)` is compiled with the first product fused
  (`fma(r_a, z_a, r_b z_b)`): on these inputs (found among random models) the unfused sum gives the
  output one off, and ORT gives what `ort_rules.qlinear_add` predicts. (Tensors of one element take
  ORT's scalar-broadcast path, which folds the constant differently: not a shape the export
  writes.)"""
  (s_a, s_b, s_c), (z_a, z_b, z_c) = [np.float32(v) for v in s], z
  builder = ob.OnnxBuilder()
  xa, xb = builder.input("a", [1, 8], "uint8"), builder.input("b", [1, 8], "uint8")
  y = builder.node("QLinearAdd", [xa, builder.const(None, s_a), builder.const(None, z_a, "uint8"),
                                  xb, builder.const(None, s_b), builder.const(None, z_b, "uint8"),
                                  builder.const(None, s_c), builder.const(None, z_c, "uint8")], ["y"])
  builder.output(y, "uint8", [1, 8])
  qa, qb = np.full((1, 8), a, np.uint8), np.full((1, 8), b, np.uint8)
  (got,) = ob.run(builder.finish(), [qa, qb])
  np.testing.assert_array_equal(got, R.qlinear_add(qa, z_a, s_a, qb, z_b, s_b, s_c, z_c))
  assert got[0, 0] == want
  unfused = B._alt_add_constant(qa, z_a, s_a, qb, z_b, s_b, s_c, z_c)  # pylint: disable=protected-access
  assert abs(int(unfused[0, 0]) - want) == 1


def test_uint8_zero_point_shift_is_exact():
  """mpq's signed grid stored as uint8 with zero point + 128: a QLinearConv on `q + 128` with
  z + 128 equals the same conv on int8-equivalent inputs (the rules use only q - z)."""
  rng = np.random.default_rng(3)
  q_i8 = rng.integers(-128, 128, (2, 3, 6, 6))
  w = rng.integers(-127, 128, (4, 3, 3, 3))
  s_w = np.full(4, 0.01, np.float32)
  a = R.qlinear_conv(R.to_uint8(q_i8), 5 + 128, 0.05, w, s_w, 0.3, 128, pads=[1, 1, 1, 1])
  acc = R.conv_accumulator(q_i8, 5, w, pads=[1, 1, 1, 1])
  b = R.requantize(acc, R.output_scale(0.05, s_w, 0.3).reshape(1, -1, 1, 1), 0, R.I8) + 128
  np.testing.assert_array_equal(a, b)


def test_fma_f32_is_one_rounding():
  """`fma_f32` rounds a * b + c once: against exact rational arithmetic on hard cases."""
  from fractions import Fraction
  rng = np.random.default_rng(1)
  a = (rng.integers(0, 256, 2000)).astype(np.float32)
  b = (10 ** rng.uniform(-3, 2, 2000)).astype(np.float32)
  c = (rng.standard_normal(2000) * 300).astype(np.float32)
  got = R.fma_f32(a, b, c)
  for i in range(0, 2000, 7):
    exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
    lo = np.float32(float(exact))  # nearest double, then float32: check against both neighbours
    cands = [np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))]
    best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact),
                                     int(np.float32(v).view(np.int32)) & 1))
    assert got[i] == best, (a[i], b[i], c[i])


def test_builder_imports_lazily():
  """Importing the builder and the rules loads no runtime."""
  code = ("import sys, mpq.export, mpq.export.onnx_builder, mpq.export.ort_rules; "
          "bad = [m for m in ('onnxruntime', 'onnx') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_level_and_dtype_are_rejected():
  with pytest.raises(ValueError, match="optimization level"):
    ob.session_options("fast")
  with pytest.raises(ValueError, match="int4 data"):
    ob.OnnxBuilder().const("w", [8], "int4")
