"""LiteRT's rounding rule for each op the .tflite export uses, in each kernel family, against the
real runtime (issue 15 (a)); `benchmarks/litert_rules.py` runs the same cases at full size.

Every case is a single-op .tflite model written by `mpq.export.tflite_builder`, run by LiteRT with
`OpResolverType.BUILTIN_REF` (`litert-ref`), `BUILTIN_WITHOUT_DEFAULT_DELEGATES` (`litert-ruy`) and
`AUTO` (`litert-auto`, XNNPACK), and compared output for output with the int64 NumPy rule of
`mpq.export.litert_rules` that the family follows: 0 mismatches, random and tie-heavy scales.
"""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest

# The runtime is part of `make setup` (the deploy extra): without it these tests fail, not skip.
import ai_edge_litert  # noqa: E402,F401

from benchmarks import litert_rules as B  # noqa: E402
from mpq.export import litert_rules as R  # noqa: E402
from mpq.export import tflite_builder as tb  # noqa: E402

# each (case, regime): CONFIGS random models of about OUTPUTS outputs, run in all three families
OUTPUTS = 40_000
CONFIGS = 8
GRID = [(name, regime) for name in B.CASES for regime in B.REGIMES.get(name, B.DEFAULT_REGIMES)]


@pytest.mark.parametrize("name,regime", GRID, ids=[f"{n}-{r}" for n, r in GRID])
def test_rule_matches_runtime(name, regime):
  rng = np.random.default_rng(zlib.crc32(f"{name}/{regime}".encode()))
  compared = 0
  for _ in range(CONFIGS):
    case = B.CASES[name](rng, regime, OUTPUTS)
    for family in B.FAMILIES:
      r = B.measure(case, family)
      assert r["rule"] == case.expected[family][0]
      assert r["mismatches"] == 0, (name, regime, family, r, case.params)
      assert r["delegation_as_expected"], (name, family, r["delegated"], case.params)
      compared += r["outputs"]
  assert compared >= 3 * OUTPUTS  # some outputs in each family


def _fc(wdtype, k, cout=8, conv=None):
  """A FULLY_CONNECTED (or CONV_2D / DEPTHWISE_CONV_2D with `conv`) model with `wdtype` weights."""
  b = tb.TFLiteBuilder()
  rng = np.random.default_rng(0)
  lo, hi = B._WRANGE[wdtype]  # pylint: disable=protected-access
  if conv is None:
    x = b.add_tensor("x", [2, k], "int8", scale=0.1, zero_point=3)
    w = b.add_tensor("w", [cout, k], wdtype, data=rng.integers(lo, hi + 1, (cout, k)),
                     scale=np.full(cout, 0.01), zero_point=0)
    y = b.add_tensor("y", [2, cout], "int8", scale=0.2, zero_point=0)
    op, opts = "FULLY_CONNECTED", b.options("FullyConnectedOptions")
  else:
    depthwise = conv == "DEPTHWISE_CONV_2D"
    wshape = [1, 3, 3, k] if depthwise else [cout, 3, 3, k]
    cout = k if depthwise else cout
    x = b.add_tensor("x", [1, 6, 6, k], "int8", scale=0.1, zero_point=3)
    w = b.add_tensor("w", wshape, wdtype, data=rng.integers(lo, hi + 1, wshape),
                     scale=np.full(cout, 0.01), zero_point=0, quantized_dimension=3 if depthwise else 0)
    y = b.add_tensor("y", [1, 6, 6, cout], "int8", scale=0.2, zero_point=0)
    op = conv
    opts = (b.options("DepthwiseConv2DOptions", padding="SAME", strideH=1, strideW=1,
                      depthMultiplier=1) if depthwise else
            b.options("Conv2DOptions", padding="SAME", strideH=1, strideW=1))
  bias = b.add_tensor("b", [cout], "int32", data=np.zeros(cout, np.int64),
                      scale=np.full(cout, 0.001), zero_point=0)
  b.add_operator(op, [x, w, bias], [y], opts)
  b.set_io([x], [y])
  return b.finish()


@pytest.mark.parametrize("wdtype,k,taken", [
    ("int8", 15, True), ("int4", 16, True), ("int4", 15, False),
    ("int2", 16, True), ("int2", 18, False), ("int2", 15, False)])
def test_xnnpack_takes_fully_connected(wdtype, k, taken):
  """XNNPACK takes INT4 / INT2 FULLY_CONNECTED only when weight rows start on a byte."""
  assert R.xnnpack_takes("FULLY_CONNECTED", weights=wdtype, k=k) == taken
  expected = (["FULLY_CONNECTED"], []) if taken else ([], ["FULLY_CONNECTED"])
  assert tb.delegated_ops(_fc(wdtype, k)) == expected
  for family in ("litert-ref", "litert-ruy"):  # no delegate outside AUTO
    assert tb.delegated_ops(_fc(wdtype, k), family) == ([], ["FULLY_CONNECTED"])


@pytest.mark.parametrize("op", ["CONV_2D", "DEPTHWISE_CONV_2D"])
def test_xnnpack_convs_int8_only(op):
  """XNNPACK takes int8 convs, not INT4 ones; INT2 conv weights are rejected at prepare."""
  assert tb.delegated_ops(_fc("int8", 16, conv=op)) == ([op], [])
  assert tb.delegated_ops(_fc("int4", 16, conv=op)) == ([], [op])
  assert not R.xnnpack_takes(op, weights="int4") and R.xnnpack_takes(op, weights="int8")
  with pytest.raises(RuntimeError, match="failed to prepare"):
    tb.interpreter(_fc("int2", 16, conv=op), "litert-ref")


def test_builder_imports_lazily():
  """Importing the builder and the rules loads no runtime (jax itself imports flatbuffers)."""
  code = ("import sys, mpq.export, mpq.export.tflite_builder, mpq.export.litert_rules; "
          "bad = [m for m in ('ai_edge_litert', 'onnxruntime', 'onnx') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("threads", [2, 3])
def test_mean_rule_with_threads(threads):
  """The optimized MEAN's vector/tail split follows its per-thread channel ranges; the reference
  and XNNPACK results do not depend on the thread count."""
  rng = np.random.default_rng(threads)
  for regime in ("random", "ties", "same"):
    case = B.case_mean(rng, regime, OUTPUTS)
    p = case.params
    for family in B.FAMILIES:
      exp = case.expected[family][1]
      if family == "litert-ruy":
        exp = R.mean_optimized_hw(case.inputs[0], p["z_in"], p["s_in"], p["z_out"], p["s_out"],
                                  threads=threads)
      (got,) = tb.run(case.model, case.inputs, family, num_threads=threads)
      assert np.array_equal(got.astype(np.int64).reshape(exp.shape), exp), (family, regime, p)
