"""`mpq.losses` against closed forms and NumPy references, and the two training features built on it
end to end through `train.py`: knowledge distillation (`quant.teacher_workdir`) and oscillation
dampening (`quant.osc_dampen`).

The plain KL value of `distillation_loss` and the single-quantizer dampening closed form are tested
in tests/test_quant.py; here: the distillation gradient, the annealing schedule, label smoothing,
and the metrics the two paths write to `metrics.jsonl` (through the CLI, the stable interface).
"""

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli
from mpq import losses

RNG = np.random.RandomState(0)
TINY = ("train.py", "--config=configs/tiny.py")


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


# ------------------------------------------------------------------------------- dampening_weight
@pytest.mark.parametrize("lambda_max,total", [(0.1, 8), (2.5, 1000), (1.0, 4)])
def test_dampening_weight_matches_half_cosine(lambda_max, total):
  w = losses.dampening_weight(lambda_max, total)
  steps = np.asarray([0, total // 4, total // 2, total, 2 * total])
  ref = lambda_max * (1 - np.cos(np.pi * np.minimum(steps / total, 1.0))) / 2
  got = [float(w(int(t))) for t in steps]
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
  # the landmarks, spelled out: 0 at the start, half way at T/2, lambda_max at and after T
  assert got[0] == 0.0
  assert got[1] == pytest.approx(lambda_max * (1 - math.sqrt(0.5)) / 2, rel=1e-6)
  assert got[2] == pytest.approx(lambda_max / 2, rel=1e-6)
  assert got[3] == pytest.approx(lambda_max, rel=1e-6)
  assert got[4] == got[3]


@pytest.mark.parametrize("total", [8, 1000])
def test_dampening_weight_is_monotone_and_constant_after_total(total):
  w = losses.dampening_weight(0.7, total)
  ramp = np.asarray(jax.vmap(w)(jnp.arange(total + 1, dtype=jnp.int32)))  # every step 0..T
  ref = 0.7 * (1 - np.cos(np.pi * np.arange(total + 1) / total)) / 2
  np.testing.assert_allclose(ramp, ref, rtol=1e-5, atol=1e-7)
  assert np.all(np.diff(ramp) >= 0), ramp
  assert np.all(np.diff(ramp) > 0)  # in fact strictly increasing up to T (steps resolve in float32)
  assert ramp[0] == 0.0 and ramp[-1] == pytest.approx(0.7, rel=1e-6)
  after = np.asarray([float(w(t)) for t in (total + 1, 3 * total, 10 * total + 7)])
  np.testing.assert_array_equal(after, ramp[-1])


def test_dampening_weight_takes_int32_step_scalars_eagerly_and_under_jit():
  """The train step passes `state.step`, an int32 scalar: no integer division may sneak in."""
  total, lam = 1000, 0.3
  w = losses.dampening_weight(lam, total)
  jw = jax.jit(w)
  for t in (0, 1, 250, 500, 999, 1000, 4000):
    ref = lam * (1 - math.cos(math.pi * min(t / total, 1.0))) / 2
    step = jnp.asarray(t, jnp.int32)
    assert float(w(step)) == pytest.approx(ref, rel=1e-5, abs=1e-8)
    assert float(jw(step)) == pytest.approx(ref, rel=1e-5, abs=1e-8)
  assert float(w(jnp.asarray(1, jnp.int32))) > 0  # 1 / 1000 in floats, not 0 in integers


# ------------------------------------------------------------------------------ distillation_loss
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_gradient_is_t_times_softmax_difference(temperature):
  """d/ds sum_i T^2 KL(softmax(t_i / T) || softmax(s_i / T)) = T (softmax(s_i / T) - softmax(t_i / T)),
  row by row: example i's gradient depends on example i only."""
  s = (RNG.randn(6, 10) * 2).astype(np.float32)
  t = (RNG.randn(6, 10) * 2).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(losses.distillation_loss(x, jnp.asarray(t), temperature)))(
      jnp.asarray(s))
  want = temperature * (np_softmax(s / temperature) - np_softmax(t / temperature))
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=2e-6)
  # the gradient of one example's loss touches only its own row
  g0 = jax.grad(lambda x: losses.distillation_loss(x, jnp.asarray(t), temperature)[0])(
      jnp.asarray(s))
  np.testing.assert_allclose(np.asarray(g0)[0], want[0], rtol=1e-4, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(g0)[1:], 0.0)
  # and the closed form agrees with central finite differences of the loss itself (float64)
  i, k, h = 2, 3, 1e-3
  def kd(x):
    lt, ls = np_log_softmax(t[i] / temperature), np_log_softmax(x / temperature)
    return temperature ** 2 * np.sum(np.exp(lt) * (lt - ls))
  e = np.zeros(10)
  e[k] = h
  fd = (kd(s[i].astype(np.float64) + e) - kd(s[i].astype(np.float64) - e)) / (2 * h)
  assert want[i, k] == pytest.approx(fd, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distillation_is_zero_with_zero_gradient_when_student_equals_teacher(temperature):
  t = jnp.asarray(RNG.randn(5, 10).astype(np.float32) * 3)
  np.testing.assert_allclose(np.asarray(losses.distillation_loss(t, t, temperature)), 0.0,
                             atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(losses.distillation_loss(x, t, temperature)))(t)
  np.testing.assert_allclose(np.asarray(grad), 0.0, atol=1e-6)
  # a constant shift of the logits leaves the softmax, hence the loss, unchanged
  np.testing.assert_allclose(np.asarray(losses.distillation_loss(t + 5.0, t, temperature)), 0.0,
                             atol=1e-5)


def test_distillation_is_non_negative_and_positive_for_different_logits():
  for scale in (0.1, 1.0, 10.0):
    for temperature in (0.5, 1.0, 4.0):
      s = RNG.randn(64, 10).astype(np.float32) * scale
      t = RNG.randn(64, 10).astype(np.float32) * scale
      kd = np.asarray(losses.distillation_loss(s, t, temperature))
      assert kd.shape == (64,)
      assert np.all(np.isfinite(kd)) and np.all(kd >= 0), (scale, temperature, kd.min())
      assert np.all(kd > 0), (scale, temperature, kd.min())


# ---------------------------------------------------------------------------------- cross_entropy
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_with_label_smoothing_matches_numpy(eps):
  k = 7
  logits = (RNG.randn(9, k) * 3).astype(np.float32)
  labels = RNG.randint(0, k, size=9)
  y = (1 - eps) * np.eye(k)[labels] + eps / k
  ref = -np.sum(y * np_log_softmax(logits), axis=-1)
  got = np.asarray(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps))
  assert got.shape == (9,)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  if eps:  # smoothing changes the loss (the reference is not the unsmoothed one in disguise)
    plain = -np_log_softmax(logits)[np.arange(9), labels]
    assert np.max(np.abs(got - plain)) > 1e-2


# -------------------------------------------------------------------------- end to end, train.py
STEPS = 8


def _train(workdir, *flags):
  return run_cli(*TINY, f"--workdir={workdir}", *flags)


def _in_parallel(jobs):
  """Runs `train.py` jobs side by side (start-up and compilation are mostly single-threaded)."""
  with ThreadPoolExecutor(len(jobs)) as pool:
    return list(pool.map(lambda job: _train(*job), jobs))


def _train_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["split"] == "train"]


def _ok(result):
  assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Two float models of the tiny config trained 32 steps (65-71% test accuracy): seed 0 (the
  teacher and the students' init) and seed 1 (another model: the wrong teacher). One after the
  other: the second compiles nothing."""
  root = tmp_path_factory.mktemp("teachers")
  t0, t1 = str(root / "seed0"), str(root / "seed1")
  _ok(_train(t0, "--config.num_train_steps=32"))
  _ok(_train(t1, "--config.num_train_steps=32", "--config.seed=1"))
  return t0, t1


@pytest.fixture(scope="module")
def qat_runs(teachers, tmp_path_factory):
  """Three short QAT runs initialised from the seed-0 float model:
    same    16-bit student distilled from its own float model (lr 1e-9: it stays that model)
    other   the same student distilled from the seed-1 float model
    damp    W2A4 with oscillation dampening, no teacher
  `bn_freeze_step=0` makes the students' training forward use the BatchNorm EMA statistics, as the
  teacher's eval-mode forward does; with batch statistics the 16-bit student differs from its
  teacher by the batch-vs-EMA normalisation (distill 1e-3 to 6e-3 measured, 30-300x more),
  not only by quantization. `same` and `damp` run side by side, then `other` (compiled by `same`).
  Returns {name: (workdir, CompletedProcess)}."""
  t0, t1 = teachers
  root = tmp_path_factory.mktemp("qat")
  common = ("--config.quant.enabled=True", f"--config.init_from={t0}",
            f"--config.num_train_steps={STEPS}", "--config.log_every=1",
            f"--config.eval_every={STEPS}", f"--config.checkpoint_every={STEPS}",
            # cheap calibration (one batch, max ranges): the full default costs ~7 s per run
            "--config.quant.calib_batches=1", "--config.quant.calib_weight=max",
            "--config.quant.calib_act=max")
  student = common + ("--config.quant.w_bits=16", "--config.quant.a_bits=16",
                      "--config.quant.bn_freeze_step=0", "--config.quant.distill_weight=1.0",
                      "--config.quant.osc_dampen=0", "--config.learning_rate=1e-9")
  jobs = {
      "same": student + (f"--config.quant.teacher_workdir={t0}",),
      "damp": common + ("--config.quant.w_bits=2", "--config.quant.a_bits=4",
                        "--config.quant.osc_dampen=0.1"),
      "other": student + (f"--config.quant.teacher_workdir={t1}",),
  }
  dirs = {name: str(root / name) for name in jobs}
  results = dict(zip(("same", "damp"), _in_parallel(
      [(dirs["same"], *jobs["same"]), (dirs["damp"], *jobs["damp"])])))
  results["other"] = _train(dirs["other"], *jobs["other"])
  return {name: (dirs[name], results[name]) for name in jobs}


def _rows(qat_runs, name):
  workdir, result = qat_runs[name]
  _ok(result)
  rows = _train_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # log_every=1: one row per step
  return rows


def test_distillation_from_own_float_model_is_near_zero_and_from_another_is_not(qat_runs):
  same, other = _rows(qat_runs, "same"), _rows(qat_runs, "other")
  for rows in (same, other):
    assert all("distill" in r for r in rows), rows[0].keys()
    assert all(math.isfinite(r["distill"]) and r["distill"] >= 0 for r in rows), rows
  d_same = np.asarray([r["distill"] for r in same])
  d_other = np.asarray([r["distill"] for r in other])
  # the 16-bit student is its teacher up to quantization error (activations beyond the calibrated
  # range are clipped): measured <= 4e-5 per step
  assert d_same.max() < 1e-3, d_same
  # a different teacher (seed 1): measured 0.32-0.44 per step, 10^4 x the same-teacher value
  assert d_other.min() > 10 * d_same.max(), (d_same, d_other)


def test_distillation_still_reports_the_cross_entropy_as_loss(qat_runs):
  """With distill_weight=1 the optimised total is the KD term alone, but `loss` stays the task
  cross-entropy: positive, far above `distill`, and the same whichever teacher (the students are the
  same model seeing the same batches)."""
  same, other = _rows(qat_runs, "same"), _rows(qat_runs, "other")
  for rows in (same, other):
    assert all("loss" in r and math.isfinite(r["loss"]) for r in rows)
  loss_same = np.asarray([r["loss"] for r in same])
  loss_other = np.asarray([r["loss"] for r in other])
  assert np.all(loss_same > 0.1), loss_same  # a 32-step float model: CE 0.66-0.94 measured
  assert np.all(loss_same > 100 * np.asarray([r["distill"] for r in same]))
  np.testing.assert_allclose(loss_same, loss_other, rtol=1e-3)


def test_dampening_logs_a_bounded_term_every_step(qat_runs):
  rows = _rows(qat_runs, "damp")
  layers = sorted(k for k in rows[0] if k.startswith("clip/"))  # one per weight quantizer
  assert len(layers) == 5, layers  # the cnn: conv1..3, fc1, head
  for r in rows:
    assert "damp" in r, r.keys()
    damp = r["damp"]
    assert math.isfinite(damp), r
    # `damp` is the sum over the weight quantizers of the mean squared distance of each weight to
    # its grid point in LSB^2: at most (1/2)^2 for a weight inside the grid, exactly 0 for a
    # clipped one (its grid point is the grid end it is clipped to). So it lies in
    # [0, sum_l (1 - clip_l) / 4] <= n_layers / 4 -- not [0, 1/4]: that bounds one layer's term.
    # A float model's weights are not on the 2-bit grid: it is not 0 either.
    inside = sum(1 - r[k] for k in layers)
    assert 0 < damp <= inside / 4 + 1e-6 <= len(layers) / 4 + 1e-6, r
  assert all("distill" not in r for r in rows)  # no teacher, no distillation term


def test_no_dampening_metric_without_osc_dampen(qat_runs):
  for name in ("same", "other"):  # QAT runs with quant.osc_dampen=0
    rows = _rows(qat_runs, name)
    assert all("damp" not in r for r in rows), rows[0].keys()
    assert any(k.startswith("clip/") for k in rows[0])  # quantized: the quantizer metrics are there
