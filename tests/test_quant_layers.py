"""Quantized layers, BN folding, rules, calibration, no recompilation on bit changes, tiny QAT."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_cli
from mpq import config as config_lib, data, models
from mpq.errors import UserError
from mpq.layers import ConvBN
from mpq.quant import calibration as calib, model as quant_model
from mpq.quant import LayerQuant, QuantLayers, QuantOptions, Quantizer, resolve, set_bits
from mpq.quant.layers import QuantConvBN
from mpq.experiment import train_and_evaluate
from mpq.train import compile_count, optim, state as st

RNG = np.random.RandomState(0)


# ------------------------------------------------------------------------------------------- rules
KINDS = {"conv1": "conv_bn", "pool1": "max_pool", "stage1/block0/conv1": "conv_bn",
         "stage1/block0/add": "add", "head": "dense"}
DEFAULTS = {"w_bits": 4, "a_bits": 4, "estimator": "lsq"}


def test_rules_first_match_wins_and_defaults_fill_the_rest():
  t = resolve(KINDS, [("conv1|head", {"w_bits": 8, "a_bits": 8}), ("stage1/.*", {"w_bits": 2}),
                      ("head", {"estimator": "ste"})][:2], DEFAULTS)
  assert set(t) == {"conv1", "stage1/block0/conv1", "stage1/block0/add", "head"}  # no pool
  assert t["conv1"] == LayerQuant(8, 8, "lsq") and t["head"] == LayerQuant(8, 8, "lsq")
  assert t["stage1/block0/conv1"] == LayerQuant(2, 4, "lsq")
  assert t["stage1/block0/add"] == LayerQuant(2, 4, "lsq")
  # fullmatch: "conv1" does not match "stage1/block0/conv1"
  t = resolve(KINDS, [("conv1", {"estimator": "tqt"})], DEFAULTS)
  assert t["conv1"].estimator == "tqt" and t["stage1/block0/conv1"].estimator == "lsq"


@pytest.mark.parametrize("rules,message", [
    ([("stage9/.*", {"w_bits": 2})], "matches no layer; layer paths: conv1, stage1/block0/conv1"),
    ([("conv1", {"w_bits": 8}), ("conv1", {"w_bits": 2})], "never applies"),
    ([("conv1", {"w_bit": 8})], "unknown key 'w_bit'"),
    ([("conv1", {"w_bits": 1})], "w_bits=1 must be an integer from 2 to 16"),
    ([("conv1", {"w_bits": 4.5})], "must be an integer"),
    ([("conv1", {"estimator": "magic"})], "estimator='magic' is unknown"),
    ([("conv1(", {"w_bits": 4})], "bad regex"),
    ([("conv1",)], "must be a pair"),
])
def test_rule_errors(rules, message):
  with pytest.raises(UserError, match=message.replace("(", r"\(")):
    resolve(KINDS, rules, DEFAULTS)


def test_bad_quant_config_is_a_one_line_error(tmp_path):
  out = run_cli("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                "--config.quant.enabled=True", "--config.quant.rules=(('nope', {'w_bits': 2}),)")
  assert out.returncode != 0
  assert "quant.rules[0] pattern 'nope' matches no layer; layer paths: conv1, conv2, conv3, fc1, head" \
      in out.stderr
  assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
  out = run_cli("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                "--config.quant.enabled=True", "--config.quant.w_bits=17")
  assert out.returncode != 0 and "w_bits=17 must be an integer from 2 to 16" in out.stderr


# ------------------------------------------------------------------------------------- BN folding
@pytest.mark.parametrize("groups", [1, 6])
def test_bn_folding_matches_unfolded_conv_bn_in_float(groups):
  """With identity quantizers the folded layer computes exactly ConvBN: train (batch statistics,
  EMA update) and eval (EMA statistics)."""
  cin = 6
  ref = ConvBN("c", cin, 6, 3, 2, groups, rngs=nnx.Rngs(0))
  q = QuantConvBN("c", cin, 6, 3, 2, groups, LayerQuant(8, 8, "none"), QuantOptions(),
                  rngs=nnx.Rngs(0))
  # non-trivial BN parameters and statistics
  for m in (ref, q):
    m.bn.scale.value = jnp.linspace(0.5, 1.5, 6)
    m.bn.bias.value = jnp.linspace(-0.2, 0.3, 6)
    m.bn.mean.value = jnp.linspace(-0.1, 0.1, 6)
    m.bn.var.value = jnp.linspace(0.5, 2.0, 6)
  x = jnp.asarray(RNG.randn(4, 9, 9, cin).astype(np.float32))
  np.testing.assert_allclose(q(x, train=False), ref(x, train=False), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(q(x, train=True), ref(x, train=True), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(q.bn.mean.value, ref.bn.mean.value, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(q.bn.var.value, ref.bn.var.value, rtol=1e-4, atol=1e-6)


def test_bn_freeze_uses_ema_statistics_and_stops_updating():
  q = QuantConvBN("c", 3, 4, 3, 1, 1, LayerQuant(8, 8, "none"), QuantOptions(bn_freeze_step=1),
                  rngs=nnx.Rngs(0))
  x = jnp.asarray(RNG.randn(4, 6, 6, 3).astype(np.float32))
  q(x, train=True)  # call 1: batch statistics, EMA updated
  mean = np.asarray(q.bn.mean.value)
  y = q(x, train=True)  # call 2: frozen
  np.testing.assert_array_equal(q.bn.mean.value, mean)
  np.testing.assert_allclose(y, q(x, train=False), rtol=1e-6)


def rhu(v):
  """Round half up in float64 (the independent reference of core.round_half_up)."""
  return np.floor(np.asarray(v, np.float64) + 0.5)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_eval_is_integer_conv_plus_int32_bias(bits):
  """Eval = (conv(x_int, w_int) + round(b_fold / (s_a s_w))) * s_a s_w: integer operands, the bias
  on the int32 grid, exactly what the exporter writes."""
  q = QuantConvBN("c", 3, 4, 3, 1, 1, LayerQuant(bits, bits, "lsq"), QuantOptions(),
                  rngs=nnx.Rngs(0))
  x = jnp.asarray(RNG.randn(2, 5, 5, 3).astype(np.float32))
  calib.calibrate(q, [x])
  q.bn.mean.value = jnp.asarray([7.3, -11.9, 5.1, 13.7], jnp.float32)  # a non-trivial bias
  w_fold, b_fold, _ = q.folded()
  sw = q.wq.integer_grid(q.folded()[0])["scale"]
  sa, za = q.aq.integer_grid()["scale"], q.aq.integer_grid()["zero_point"]
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  sw64 = np.asarray(sw, np.float64).reshape(-1)
  wi = np.clip(rhu(np.asarray(w_fold) / sw64), lo, hi)
  xi = np.clip(rhu(np.asarray(x) / float(sa)) + float(za), lo, hi)  # signed input grid
  acc = jax.lax.conv_general_dilated(jnp.asarray(xi, jnp.float32), jnp.asarray(wi, jnp.float32),
                                     (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  bias = rhu(np.asarray(b_fold) / (float(sa) * sw64))
  ref = (np.asarray(acc, np.float64) + bias) * float(sa) * sw64
  assert np.all(np.abs(bias) >= 2)
  np.testing.assert_allclose(q(x, train=False), ref, rtol=1e-6, atol=1e-7)
  # the float form differs by the bias rounding, which the integer form must include
  plain = np.asarray(acc, np.float64) * float(sa) * sw64 + np.asarray(b_fold)
  assert np.max(np.abs(plain - ref)) > 1e-7


# ------------------------------------------------------------------------------------ calibration
def test_histogram_grows_with_the_data():
  h = calib.Histogram(num_bins=100)
  h.update(np.linspace(0, 1, 1001))
  h.update(np.asarray([2.5]))
  assert len(h.counts) == 250 and h.counts.sum() == 1002 and h.amax == 2.5


def test_calibrators_on_known_distributions():
  rs = np.random.RandomState(1)
  u = rs.uniform(0, 1, 200_000)
  h = calib.Histogram()
  h.update(u)
  assert calib.act_amax(h, "max", 8, False) == pytest.approx(u.max())
  assert calib.act_amax(h, "percentile", 8, False, 99.0) == pytest.approx(0.99, abs=2e-3)
  # uniform data: no clipping pays off, so MSE and entropy keep (almost) the whole range
  assert calib.act_amax(h, "mse", 8, False) == pytest.approx(1.0, abs=0.01)
  assert calib.act_amax(h, "entropy", 8, False) > 0.95

  g = np.abs(rs.randn(200_000))
  g[:10] = 40.0  # a few outliers
  h = calib.Histogram()
  h.update(g)
  for bits in (4, 8):
    amax = calib.act_amax(h, "mse", bits, False)
    # brute force: the amax minimising the actual fake-quant MSE of the samples
    cands = np.linspace(1.0, 41.0, 801)
    errs = [np.mean((np.clip(np.round(g / (a / (2 ** bits - 1))), 0, 2 ** bits - 1)
                     * (a / (2 ** bits - 1)) - g) ** 2) for a in cands]
    best = cands[int(np.argmin(errs))]
    assert amax == pytest.approx(best, rel=0.08)
  assert 2.0 < calib.act_amax(h, "entropy", 8, False) < 10.0  # KL ignores magnitude: outliers clipped
  assert calib.act_amax(h, "percentile", 8, False, 99.9) == pytest.approx(3.29, rel=0.03)


def test_weight_calibration_per_channel():
  w = RNG.randn(3, 3, 8, 5).astype(np.float32) * np.arange(1, 6, dtype=np.float32)
  np.testing.assert_allclose(calib.weight_amax(w, "max", 4), np.abs(w).max(axis=(0, 1, 2)))
  amax = np.asarray(calib.weight_amax(w, "mse", 4))
  for c in range(5):  # brute force per channel over the same candidates
    wc = w[..., c]
    cands = np.linspace(0.2, 1.0, 81) * np.abs(wc).max()
    errs = [np.sum((np.clip(np.round(wc / (a / 7)), -7, 7) * (a / 7) - wc) ** 2) for a in cands]
    assert amax[c] == pytest.approx(cands[int(np.argmin(errs))], rel=1e-4)
  assert np.all(amax < np.abs(w).max(axis=(0, 1, 2)))  # 4-bit MSE clips Gaussian tails


# --------------------------------------------------------------------------------- recompilation
def _quant_cnn(estimator="lsq", bits=4):
  c = config_lib.base_config()
  c.quant.enabled, c.quant.estimator, c.quant.w_bits, c.quant.a_bits = True, estimator, bits, bits
  c.model_kwargs.width = 0.25
  return c, quant_model.build(c, 10, (28, 28, 1))


@pytest.mark.parametrize("estimator", ["lsq", "ste", "dbits"])
def test_changing_bits_does_not_recompile(estimator, tiny_config):
  config, (model, table) = _quant_cnn(estimator)
  d = data.load("fashion_mnist", num_train=256, num_test=100)
  batches = list(data.iterate(data.train_dataset(d, 32, 0, 4)))
  calib.calibrate(model, [batches[0]["image"]])
  tx = optim.build(tiny_config, 100)
  graphdef, state = st.init_state(model, tx)
  step = jax.jit(st.make_train_step(graphdef, tx))
  state, m = step(state, batches[0])
  jax.block_until_ready(m)
  before = compile_count()
  losses = []
  for i, b in enumerate(batches[1:]):
    model = nnx.merge(graphdef, state.params, state.rest)
    new_bits = {p: {"w_bits": 2 + (i + j) % 7, "a_bits": 8 - (i + j) % 5} for j, p in enumerate(table)}
    set_bits(model, new_bits)
    _, params, rest = st.split_model(model)
    state = state._replace(params=params, rest=rest)
    state, m = step(state, b)
    losses.append(float(m["loss"]))
    held = quant_model.current_bits(nnx.merge(graphdef, state.params, state.rest))
    if estimator != "dbits":  # dbits trains its bits
      want = {p: {k: float(v) for k, v in b_.items()} for p, b_ in new_bits.items()}
      want["conv1"]["a_bits"] = 8.0  # conv1 reads the image: its input grid is the pixel grid
      assert held == want
  assert compile_count() == before
  assert np.all(np.isfinite(losses))


# -------------------------------------------------------------------------------------- QAT runs
def test_tiny_qat_run_from_float_checkpoint(tiny_config, tmp_path):
  fdir, qdir = str(tmp_path / "float"), str(tmp_path / "qat")
  rf = train_and_evaluate(tiny_config, fdir, progress=False)
  c = tiny_config
  c.quant.enabled, c.quant.w_bits, c.quant.a_bits = True, 4, 4
  c.quant.rules = (("conv1|head", {"w_bits": 8, "a_bits": 8}),)
  c.init_from = fdir
  c.num_train_steps, c.learning_rate = 32, 1e-3
  rq = train_and_evaluate(c, qdir, progress=False)
  assert rq["accuracy"] > 0.5 and abs(rq["accuracy"] - rf["accuracy"]) < 0.1
  bits = json.load(open(os.path.join(qdir, "bits.json")))
  assert bits["conv1"] == {"w_bits": 8, "a_bits": 8, "estimator": "lsq", "params": 72,
                           "macs": 28 * 28 * 8 * 9}
  assert bits["conv2"]["w_bits"] == 4 and bits["fc1"]["a_bits"] == 4
  out = run_cli("eval.py", f"--workdir={qdir}", f"--json={tmp_path / 'e.json'}")
  assert out.returncode == 0, out.stderr
  e = json.load(open(tmp_path / "e.json"))
  assert e["mode"] == "fake_quant" and e["accuracy"] == pytest.approx(rq["accuracy"])
  assert e["bits"]["conv2"]["w_bits"] == 4
  out = run_cli("eval.py", f"--workdir={fdir}", "--ptq", f"--json={tmp_path / 'p.json'}")
  assert out.returncode == 0, out.stderr
  p = json.load(open(tmp_path / "p.json"))
  assert p["mode"] == "fake_quant" and abs(p["accuracy"] - rf["accuracy"]) < 0.03  # 8-bit PTQ
  out = run_cli("eval.py", f"--workdir={fdir}", "--mode=fake_quant")
  assert out.returncode != 0 and "holds a float model" in out.stderr


def test_weight_decay_skips_quantizer_parameters():
  config, (model, _) = _quant_cnn("lsq")
  config.weight_decay, config.learning_rate = 0.5, 1e-9
  tx = optim.build(config, 10)
  _, state = st.init_state(model, tx)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = tx.update(zeros, state.opt_state, state.params)
  flat = {jax.tree_util.keystr(k): float(jnp.abs(v).max())
          for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert flat["['conv2']['conv']['kernel'].value"] > 0  # decayed
  assert flat["['conv2']['wq']['step_size'].value"] == 0  # per-channel step sizes are not
  assert flat["['conv2']['aq']['step_size'].value"] == 0


def test_non_finite_added_loss_terms_stop_the_run():
  from mpq.train.loop import _first_non_finite
  ok = {"loss": 0.5, "damp": 3.0}
  assert _first_non_finite([(1, ok), (2, ok)]) is None
  assert _first_non_finite([(1, ok), (2, {"loss": 0.5, "damp": float("nan")})])[:2] == (2, "damp")
  assert _first_non_finite([(3, {"loss": float("inf")})])[:2] == (3, "loss")
  assert _first_non_finite([(4, {"loss": 1.5, "grad_norm": float("nan")})])[:2] == (4, "grad_norm")
