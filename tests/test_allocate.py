"""Bit allocation: the ILP against brute-force enumeration, ties, several budgets, infeasibility."""

import itertools

import numpy as np
import pytest

from mpq.allocate import InfeasibleBudgetError, min_costs, solve_greedy, solve_ilp


def brute_force(s, costs, budgets, ties=()):
  best, arg = np.inf, None
  layers, choices = s.shape
  for combo in itertools.product(range(choices), repeat=layers):
    combo = np.asarray(combo)
    if any(len({combo[i] for i in t}) > 1 for t in ties):
      continue
    if any(costs[n][np.arange(layers), combo].sum() > b + 1e-9 for n, b in budgets.items()):
      continue
    v = s[np.arange(layers), combo].sum()
    if v < best - 1e-12:
      best, arg = v, combo
  return best, arg


def instance(rs, layers, choices, nbudgets):
  bits = np.arange(2, 2 + choices)
  params = rs.randint(10, 1000, size=layers)
  s = rs.rand(layers, choices) * np.exp(-bits)[None] * rs.rand(layers, 1) * 10
  costs = {"size": params[:, None] * bits[None].astype(float),
           "bops": rs.randint(1, 50, size=layers)[:, None] * (bits[None] ** 2).astype(float)}
  lows = min_costs(costs)
  highs = {n: k.max(axis=1).sum() for n, k in costs.items()}
  names = list(costs)[:nbudgets]
  budgets = {n: lows[n] + rs.rand() * (highs[n] - lows[n]) for n in names}
  return s, costs, budgets


@pytest.mark.parametrize("seed", range(12))
def test_ilp_matches_brute_force(seed):
  rs = np.random.RandomState(seed)
  layers, choices = rs.randint(2, 6), rs.randint(2, 4)
  s, costs, budgets = instance(rs, layers, choices, 1 + seed % 2)
  ties = [tuple(rs.choice(layers, 2, replace=False))] if seed % 3 == 0 else []
  best, _ = brute_force(s, costs, budgets, ties)
  if not np.isfinite(best):
    with pytest.raises(InfeasibleBudgetError):
      solve_ilp(s, costs, budgets, ties)
    return
  got = solve_ilp(s, costs, budgets, ties)
  assert s[np.arange(layers), got].sum() == pytest.approx(best, rel=1e-9, abs=1e-12)
  for n, b in budgets.items():
    assert costs[n][np.arange(layers), got].sum() <= b + 1e-6
  for t in ties:
    assert len({got[i] for i in t}) == 1
  g = solve_greedy(s, costs, budgets, ties)  # feasible, never better than the optimum
  for n, b in budgets.items():
    assert costs[n][np.arange(layers), g].sum() <= b + 1e-6
  assert s[np.arange(layers), g].sum() >= best - 1e-12


def test_ties_chain_transitively():
  s = np.asarray([[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
  costs = {"size": np.asarray([[1.0, 2.0]] * 3)}
  got = solve_ilp(s, costs, {"size": 6.0}, ties=[(0, 1), (1, 2)])
  assert len(set(got)) == 1
  assert list(solve_ilp(s, costs, {"size": 6.0})) == [0, 1, 0]


def test_infeasible_budget_names_smallest_values():
  s = np.zeros((3, 2))
  costs = {"size": np.asarray([[2.0, 4.0]] * 3), "bops": np.asarray([[4.0, 1.0]] * 3)}
  with pytest.raises(InfeasibleBudgetError, match=r"size <= 5 \(smallest achievable 6\)"):
    solve_ilp(s, costs, {"size": 5.0})
  # each budget alone is feasible, together they are not
  with pytest.raises(InfeasibleBudgetError, match="cannot all hold at once"):
    solve_ilp(s, costs, {"size": 6.0, "bops": 3.0})
  assert issubclass(InfeasibleBudgetError, ValueError)
  with pytest.raises(ValueError, match="no cost table"):
    solve_ilp(s, costs, {"latency": 1.0})


def test_ilp_solves_200_layers_by_7_choices():
  """Correctness at scale (its speed is measured by benchmarks/mixed.py, not asserted here)."""
  rs = np.random.RandomState(0)
  bits = np.asarray([2, 3, 4, 5, 6, 7, 8], float)
  params = rs.randint(100, 100_000, size=200).astype(float)
  s = rs.rand(200, 7) * np.exp(-bits)[None] * 100
  costs = {"size": params[:, None] * bits[None]}
  budget = {"size": float(params.sum() * 4.0)}
  got = solve_ilp(s, costs, budget)
  assert costs["size"][np.arange(200), got].sum() <= budget["size"] + 1e-6
  # optimal: no greedy assignment does better
  g = solve_greedy(s, costs, budget)
  assert s[np.arange(200), got].sum() <= s[np.arange(200), g].sum() + 1e-12


# ------------------------------------------------------------------------------------ sensitivity
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mpq.allocate import sensitivity as sens  # noqa: E402


def _tiny_mlp_loss():
  rs = np.random.RandomState(0)
  params = {"l1": {"kernel": jnp.asarray(rs.randn(5, 4) * 0.5, jnp.float32),
                   "bias": jnp.zeros(4, jnp.float32)},
            "l2": {"kernel": jnp.asarray(rs.randn(4, 3) * 0.5, jnp.float32)}}
  x = jnp.asarray(rs.randn(16, 5), jnp.float32)
  y = jax.nn.one_hot(rs.randint(0, 3, 16), 3)

  def loss(p):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(h @ p["l2"]["kernel"]), -1))
  return loss, params


def test_hutchinson_matches_exact_hessian_trace():
  loss, params = _tiny_mlp_loss()
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  h = jax.hessian(lambda f: loss(unravel(f)))(flat)
  # flat layout (ravel_pytree orders leaves by key): l1.bias [0:4], l1.kernel [4:24], l2.kernel [24:36]
  exact_l1 = float(jnp.trace(h[4:24, 4:24]))
  exact_l2 = float(jnp.trace(h[24:36, 24:36]))
  groups = [lambda n: "l1" in n and "kernel" in n, lambda n: "l2" in n]
  r = sens.hutchinson_traces(loss, params, groups, jax.random.key(0), rel_tol=0.01,
                             min_probes=64, max_probes=4000, chunk=64)
  for got, se, exact in zip(r["trace"], r["stderr"], (exact_l1, exact_l2)):
    assert abs(got - exact) <= 4 * se + 1e-6, (got, exact, se)
    assert got == pytest.approx(exact, rel=0.05)
  # the stopping rule: relative standard error reached, or the probe budget spent
  assert r["probes"] >= 4000 or np.all(r["stderr"] <= 0.01 * np.abs(r["trace"]))
  r = sens.hutchinson_traces(loss, params, groups, jax.random.key(1), rel_tol=0.5, min_probes=8,
                             chunk=4)
  assert 8 <= r["probes"] < 4000 and np.all(r["stderr"] <= 0.5 * np.abs(r["trace"]))


def test_hessian_sensitivity_formula():
  w = np.random.RandomState(1).randn(3, 3, 2, 4).astype(np.float32)
  out = sens.hessian_sensitivity(np.asarray([2.0]), [w], [(2, 2), (4, 4), (8, 8)])
  for j, b in enumerate((2, 4, 8)):
    assert out[0, j] == pytest.approx(2.0 / w.size * sens.quantization_perturbation(w, b))
  assert out[0, 0] > out[0, 1] > out[0, 2] > 0


def test_measured_sensitivity_equals_one_at_a_time_evaluation():
  from mpq import config as config_lib, data
  from mpq.quant import calibrate, model as quant_model
  from mpq.quant.calibration import weight_amax
  from mpq.losses import cross_entropy
  c = config_lib.base_config()
  c.quant.enabled, c.quant.estimator = True, "dbits"
  c.model_kwargs.width = 0.25
  model, table = quant_model.build(c, 10, (28, 28, 1))
  d = data.load("fashion_mnist", num_train=256, num_test=10)
  batch = next(iter(data.iterate(data.train_dataset(d, 128, 0, 1))))
  x, y = np.asarray(batch["image"]), np.asarray(batch["label"])
  calibrate(model, [x])
  choices = [(2, 4), (4, 8)]
  layers = ["conv2", "fc1"]
  s, base = sens.measured_sensitivity(model, layers, choices, x, y, batch_size=64)

  def direct(layer, choice):
    from flax import nnx
    m = nnx.clone(model)
    for path, q in sens._quantizers(m):
      owner = path.rsplit("/", 1)[0]
      bits = 16
      if owner == layer:
        bits = choice[0] if q.role == "weight" else choice[1]
      q.bits.value = jnp.float32(bits)
    seen = {}
    from mpq.quant.quantizer import hooks
    with hooks(m, observe=lambda q, w: seen.__setitem__(id(q), w)):
      m(jnp.asarray(x[:1]), train=False)
    for _, q in sens._quantizers(m):
      if q.role == "weight":
        q.amax.value = jnp.asarray(weight_amax(seen[id(q)], "mse", int(q.bits.value))).reshape(q.shape)
    return float(jnp.mean(cross_entropy(m(jnp.asarray(x), train=False), jnp.asarray(y))))

  b0 = direct(None, None)
  assert base == pytest.approx(b0, rel=1e-4)
  for i, l in enumerate(layers):
    for j, ch in enumerate(choices):
      assert s[i, j] == pytest.approx(direct(l, ch) - b0, abs=2e-4)
  assert s[0, 0] > s[0, 1]  # 2-bit weights hurt more than 4-bit


@pytest.mark.parametrize("seed", range(6))
def test_allowed_columns_match_brute_force(seed):
  rs = np.random.RandomState(100 + seed)
  layers, choices = 4, 3
  s, costs, budgets = instance(rs, layers, choices, 1)
  allowed = rs.rand(layers, choices) > 0.3
  allowed[np.arange(layers), rs.randint(0, choices, layers)] = True
  penal = np.where(allowed, s, 1e6)  # brute force over allowed columns only
  best, _ = brute_force(penal, costs, budgets)
  if best >= 1e6 or not np.isfinite(best):
    with pytest.raises(InfeasibleBudgetError):
      solve_ilp(s, costs, budgets, allowed=allowed)
    return
  got = solve_ilp(s, costs, budgets, allowed=allowed)
  assert allowed[np.arange(layers), got].all()
  assert s[np.arange(layers), got].sum() == pytest.approx(best, rel=1e-9)
  g = solve_greedy(s, costs, budgets, allowed=allowed)
  assert allowed[np.arange(layers), g].all()


# ------------------------------------------------------------------------------------- workflow
import json  # noqa: E402
import os  # noqa: E402

from conftest import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def float_tiny(tmp_path_factory):
  from configs import tiny
  from mpq.experiment import train_and_evaluate
  wd = str(tmp_path_factory.mktemp("float"))
  train_and_evaluate(tiny.get_config(), wd, progress=False)
  return wd


@pytest.mark.parametrize("sensitivity", ["hessian", "measured"])
def test_tiny_mixed_ilp_run_meets_its_budget(float_tiny, tmp_path, sensitivity):
  from configs import tiny
  from mpq.experiment import train_and_evaluate
  c = tiny.get_config()
  c.quant.enabled, c.init_from, c.num_train_steps = True, float_tiny, 8
  m = c.mixed
  m.enabled, m.sensitivity, m.weight_bits_avg, m.calib_examples = True, sensitivity, 3.0, 64
  m.hutchinson_max_probes = 8
  m.pins = (("conv1|head", 8),)
  wd = str(tmp_path / "w")
  r = train_and_evaluate(c, wd, progress=False)
  assert r["accuracy"] > 0.3
  bits = json.load(open(os.path.join(wd, "bits.json")))
  layers = {k: v for k, v in bits.items() if not k.startswith("_")}
  assert layers["conv1"]["w_bits"] == 8 and layers["head"]["w_bits"] == 8
  # hand-counted kernels of the quarter-width CNN (fc1: 3x3x32 inputs after three 2x2 pools)
  weights = {"conv1": 3 * 3 * 1 * 8, "conv2": 3 * 3 * 8 * 16, "conv3": 3 * 3 * 16 * 32,
             "fc1": 288 * 32, "head": 32 * 10}
  used = sum(weights[k] * v["w_bits"] for k, v in layers.items())
  assert used <= 3.0 * sum(weights.values()) + 1e-6
  assert bits["_totals"]["weight_bits"] == pytest.approx(used)
  assert bits["_budgets"]["weight_bits"] == pytest.approx(3.0 * sum(weights.values()))
  assert all(v["w_bits"] == v["a_bits"] for v in layers.values())
  assert set(bits["_allocation"]) >= {"sensitivity", "solver", "choices"}
  # the checkpoint holds the assignment: eval.py --export_bits writes it
  out = run_cli("eval.py", f"--workdir={wd}", f"--export_bits={tmp_path / 'b.json'}")
  assert out.returncode == 0, out.stderr
  exported = json.load(open(tmp_path / "b.json"))
  assert {k: (v["w_bits"], v["a_bits"]) for k, v in exported.items()} == \
      {k: (v["w_bits"], v["a_bits"]) for k, v in layers.items()}


@pytest.mark.parametrize("flags,message", [
    (["--config.mixed.pins=(('conv9', 8),)", "--config.mixed.weight_bits_avg=4"],
     "mixed.pins[0] pattern 'conv9' matches no allocated layer; layer paths: conv1, conv2"),
    (["--config.mixed.weight_bits_avg=1.5"],
     "weight_bits <= 23052 (smallest achievable 30736)"),  # 1.5 and 2 bits x 15368 weights
    (["--config.mixed.pins=(('conv1', 7),)", "--config.mixed.weight_bits_avg=4"],
     "not among mixed.bit_choices"),
    ([], "needs a budget"),
])
def test_mixed_config_errors(float_tiny, tmp_path, flags, message):
  out = run_cli("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                "--config.quant.enabled=True", f"--config.init_from={float_tiny}",
                "--config.mixed.enabled=True", "--config.mixed.hutchinson_max_probes=4",
                "--config.mixed.calib_examples=32", *flags)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr
  assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_tiny_dbits_run_rounds_to_a_feasible_assignment(float_tiny, tmp_path):
  from configs import tiny
  from mpq.experiment import train_and_evaluate
  c = tiny.get_config()
  c.quant.enabled, c.quant.estimator, c.quant.w_bits = True, "dbits", 6
  c.init_from, c.num_train_steps = float_tiny, 24
  m = c.mixed
  m.enabled, m.method, m.weight_bits_avg = True, "dbits", 3.0
  m.pins, m.lagrange_lr, m.dbits_lr = (("conv1|head", 8),), 0.5, 0.05
  wd = str(tmp_path / "w")
  r = train_and_evaluate(c, wd, progress=False)
  assert r["accuracy"] > 0.3
  bits = json.load(open(os.path.join(wd, "bits.json")))
  layers = {k: v for k, v in bits.items() if not k.startswith("_")}
  weights = {"conv1": 72, "conv2": 1152, "conv3": 4608, "fc1": 9216, "head": 320}
  assert layers["conv1"]["w_bits"] == 8 and layers["head"]["w_bits"] == 8
  assert all(v["a_bits"] == 8 for v in layers.values())  # activations fixed at quant.a_bits
  assert all(float(v["w_bits"]).is_integer() for v in layers.values())
  used = sum(weights[k] * v["w_bits"] for k, v in layers.items())
  assert used <= 3.0 * sum(weights.values()) + 1e-6
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  lam = [r_["lagrange"] for r_ in rows if "lagrange" in r_]
  ratio = [r_["size_ratio"] for r_ in rows if "size_ratio" in r_]
  assert ratio[0] > 1.0 and lam[-1] > 0.0  # the budget was violated at 6 bits, so lambda rose
  assert ratio[-1] <= 1.0 + 1e-6  # after rounding the size meets the budget
  out = run_cli("eval.py", f"--workdir={wd}", f"--json={tmp_path / 'e.json'}")  # restores lambda too
  assert out.returncode == 0, out.stderr
  assert json.load(open(tmp_path / "e.json"))["accuracy"] == pytest.approx(r["accuracy"])


@pytest.mark.parametrize("a_bits", [0, 3])
def test_pins_fix_weight_and_activation_bits(a_bits):
  import ml_collections
  from mpq.allocate import workflow
  mc = ml_collections.ConfigDict({"bit_choices": (2, 3, 4, 8), "a_bits": a_bits,
                                  "pins": (("conv1|head", 8),), "activation_bits_max": 0})
  choices = workflow.choices_of(mc)
  paths = ["conv1", "conv2", "fc1", "head"]
  allowed = workflow.allowed_mask(paths, choices, mc)
  picks = {p: {choices[j] for j in np.flatnonzero(allowed[i])} for i, p in enumerate(paths)}
  if a_bits:
    assert choices == [(2, 3), (3, 3), (4, 3), (8, 3), (8, 8)]
    assert picks["conv1"] == picks["head"] == {(8, 8)}
    assert picks["conv2"] == picks["fc1"] == {(2, 3), (3, 3), (4, 3), (8, 3)}
  else:
    assert choices == [(2, 2), (3, 3), (4, 4), (8, 8)]
    assert picks["conv1"] == picks["head"] == {(8, 8)}
    assert picks["fc1"] == set(choices)
