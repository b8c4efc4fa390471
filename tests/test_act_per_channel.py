"""Activation quantizers per tensor or per channel (`a_per_channel`: one scale per index of the
last axis), against NumPy references; per-channel inputs train and evaluate in fake quant, and the
integer export refuses them with one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from mpq.quant import calibration as calib
from mpq.quant import core
from mpq.quant.quantizer import Quantizer

RNG = np.random.RandomState(0)


def _x(c=3):
  scales = np.asarray([0.5, 2.0, 8.0][:c], np.float32)
  return (RNG.randn(4, 5, c).astype(np.float32) * scales)


@pytest.mark.parametrize("estimator", ["lsq", "tqt", "dbits", "noise", "ste"])
def test_per_channel_activation_forward_matches_numpy(estimator):
  x = _x()
  q = Quantizer("l", "act", estimator, 4, signed=True, act_channels=3)
  amax = np.abs(x).reshape(-1, 3).max(axis=0)
  q.set_range(amax, lo=x.reshape(-1, 3).min(axis=0))
  g = q.integer_grid()
  assert np.shape(g["scale"]) == (3,)
  ref = np.asarray(core.dequantize(core.quantize(x, g["scale"], g["zero_point"], g["bits"],
                                                 g["signed"], g["narrow"]), g["scale"],
                                   g["zero_point"]))
  np.testing.assert_allclose(np.asarray(q(jnp.asarray(x), train=False)), ref, rtol=1e-6, atol=1e-7)
  # each channel on its own grid: channel c's values are multiples of its own step
  y = np.asarray(q(jnp.asarray(x), train=False)).reshape(-1, 3)
  s = np.asarray(g["scale"]).reshape(-1)
  z = np.broadcast_to(np.asarray(g["zero_point"]).reshape(-1), (3,))
  k = y / s + z
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)


def test_per_channel_lsq_step_gradient_is_the_per_channel_sum():
  """d/ds_c of sum(Q(x)) = sum over channel c of (round(v) - v inside, n or p outside), times
  LSQ's gradient scale 1 / sqrt(N_c p) with N_c = elements of channel c per example."""
  x = _x()
  from flax import nnx
  q = Quantizer("l", "act", "lsq", 3, signed=True, act_channels=3)
  q.step_size.value = jnp.asarray([0.2, 0.5, 3.0], jnp.float32)
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)

  def f(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(jnp.asarray(x), train=False))

  g = np.asarray(jax.grad(f)(params)["step_size"].value)
  n, p = -4, 3
  v = x.reshape(-1, 3) / np.asarray([0.2, 0.5, 3.0])
  elem = np.where(v < n, n, np.where(v > p, p, np.floor(v + 0.5) - v))
  per_example = x.size / x.shape[0] / 3
  np.testing.assert_allclose(g, elem.sum(axis=0) / np.sqrt(per_example * p), rtol=1e-4, atol=1e-5)


def test_per_channel_ste_range_follows_each_channels_min_and_max():
  x = _x()
  q = Quantizer("l", "act", "ste", 8, signed=True, act_channels=3, ema_decay=0.5)
  q.set_range(np.ones(3), lo=-np.ones(3))
  q(jnp.asarray(x), train=True)
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(np.asarray(q.lo.value), 0.5 * -1 + 0.5 * flat.min(axis=0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.hi.value), 0.5 * 1 + 0.5 * flat.max(axis=0), rtol=1e-6)


def test_per_channel_calibration_is_max_or_percentile_per_channel():
  from flax import nnx
  from mpq.quant.layers import LayerQuant, QuantLayers
  layers = QuantLayers({"d": LayerQuant(8, 4, "lsq", a_per_channel=True)})
  m = layers.dense("d", 3, 2, flatten=False, rngs=nnx.Rngs(0))
  x = _x()
  calib.calibrate(m, [x], act_method="max")
  _, p = core.qrange(4, True)
  np.testing.assert_allclose(np.asarray(m.aq.step_size.value),
                             np.abs(x).reshape(-1, 3).max(axis=0) / float(p), rtol=1e-6)
  calib.calibrate(m, [x], act_method="percentile", percentile=90.0)
  np.testing.assert_allclose(np.asarray(m.aq.step_size.value),
                             np.percentile(np.abs(x).reshape(-1, 3), 90.0, axis=0) / float(p),
                             rtol=1e-5)
  with pytest.raises(Exception, match="per-channel activation calibration supports max and"):
    calib.calibrate(m, [x], act_method="mse")


def test_per_channel_rule_trains_evaluates_and_export_refuses_it(tmp_path):
  wd = tmp_path / "w"
  rules = "--config.quant.rules=(('fc1', {'a_per_channel': True}),)"
  out = run_cli("train.py", "--config=configs/tiny.py", f"--workdir={wd}", "--config.num_train_steps=8",
                "--config.quant.enabled=True", "--config.quant.w_bits=4", "--config.quant.a_bits=4",
                "--config.eval_every=8", "--config.checkpoint_every=8", rules)
  assert out.returncode == 0, out.stderr
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  test = [r for r in rows if r["split"] == "test"][-1]
  assert test["accuracy"] > 0.3  # 8 steps from scratch at W4A4: well above chance (0.1)
  out = run_cli("eval.py", f"--workdir={wd}", "--mode=int", f"--export={tmp_path / 'int'}")
  assert out.returncode == 2
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and "fc1/act quantizes per channel" in err[0], out.stderr
  bad = run_cli("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'b'}",
                "--config.quant.enabled=True",
                "--config.quant.rules=(('fc1', {'a_per_channel': 1}),)")
  assert bad.returncode == 2 and "a_per_channel=1 must be True or False" in bad.stderr


def test_per_channel_default_leaves_additions_per_tensor_and_needs_max_or_percentile():
  from configs import tiny
  from mpq.config import validate
  from mpq.errors import UserError
  from mpq.quant import model as quant_model
  c = tiny.get_config()
  import ml_collections
  c.model, c.quant.enabled, c.quant.a_per_channel = "resnet20", True, True
  c.model_kwargs = ml_collections.ConfigDict({"width": 8})
  c.quant.calib_act = "mse"
  with pytest.raises(UserError, match="calib_act='mse' cannot calibrate per-channel"):
    validate(c)
  c.quant.calib_act = "max"
  validate(c)
  model, _ = quant_model.build(c, 10, (28, 28, 1))
  assert model.stage1.block0.conv1.aq.shape == (8,)  # conv inputs per channel
  assert model.stage1.block0.add.aq_a.shape == ()  # additions per tensor


def test_hooks_nest_and_restore_the_outer_hook():
  from flax import nnx
  from mpq.quant.layers import LayerQuant, QuantLayers
  from mpq.quant.quantizer import hooks
  m = QuantLayers({"d": LayerQuant(8, 8, "lsq")}).dense("d", 3, 2, rngs=nnx.Rngs(0))
  seen, tapped = [], []
  with hooks(m, observe=lambda q, x: seen.append(q.role)):
    with hooks(m, tap=lambda q, x, y: tapped.append(q.role)):
      m(jnp.ones((1, 3)))
    m(jnp.ones((1, 3)))
  assert seen == ["act", "weight", "act", "weight"] and tapped == ["act", "weight"]
  assert m.aq.hooks.observe is None and m.aq.hooks.tap is None
