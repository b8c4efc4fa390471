"""Speed benchmark: every figure is a ratio of two medians measured in one process.

Command:  python benchmarks/speed.py [--rows=step,compile,pipeline,sensitivity,memory] [--repeats=8]
Output:   benchmarks/results/speed.json (`{"rows": [...], "device", "command"}`, one row per
          comparison: the two medians, their ratio, the target) and a table on stdout (the README's
          copy comes from `make bench`).
Runtime:  about 15 minutes on 2 CPU cores.

Rows:
  step       train step time, QAT (W4A4 per channel; lsq, ste, tqt, noise, dbits) against float,
             same model and batch 128, cnn and resnet20: `--repeats` alternating timed steps after
             3 warm-up steps each (targets: lsq <= 1.10 cnn, <= 1.15 resnet20, all <= 1.3); and
             the peer, google/qwix int8 QAT of the same model (no target; needs the `bench` extra)
  compile    train-step XLA compilations while every layer's bits change 10 times (target 0 after
             step 1; eager host-side ops that read and set bits are counted apart)
  pipeline   cnn train steps fed by the real input pipeline (grain, Fashion-MNIST, shuffling,
             augmentation) against the same steps on batches already in memory (target >= 0.95)
  sensitivity  resnet20 measured sensitivities (all layers x [2,3,4,5,6,8]): the batched
             (`lax.map`, one compilation) path against one jitted call per configuration; and the
             Hutchinson trace time per probe (all layers at once)
  memory     peak RSS of 30 QAT training steps against 30 float steps (separate child processes,
             cnn, batch 128; target <= 1.5)
The integer executor against the float model is in benchmarks/integer.py (its `speed` rows).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cli  # noqa: E402  pylint: disable=g-import-not-at-top

ESTIMATORS = ("lsq", "ste", "tqt", "noise", "dbits")
TARGETS = {("cnn", "lsq"): 1.10, ("resnet20", "lsq"): 1.15}


def _config(model: str, estimator: str | None, batch: int = 128):
  from configs import fmnist_cnn, fmnist_resnet20  # pylint: disable=g-import-not-at-top
  c = (fmnist_cnn if model == "cnn" else fmnist_resnet20).get_config()
  c.batch_size = batch
  if estimator:
    c.quant.enabled, c.quant.estimator, c.quant.w_bits, c.quant.a_bits = True, estimator, 4, 4
  return c


def _step_fn(config, data):
  """(jitted train step, state, graphdef) for `config` (no calibration: timing only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mpq.train import optim  # pylint: disable=g-import-not-at-top
  from mpq.train.loop import build_model  # pylint: disable=g-import-not-at-top
  from mpq.train.state import init_state, make_train_step  # pylint: disable=g-import-not-at-top
  model, _ = build_model(config, data)
  tx = optim.build(config, 1000)
  graphdef, state = init_state(model, tx)
  return jax.jit(make_train_step(graphdef, tx), donate_argnums=(0,)), state, graphdef


def _qwix_step_fn(config, data):
  """The peer: google/qwix int8 QAT (the `bench` extra) of the same float model, same optimizer:
  `qwix.quantize_model` intercepts every conv and dot_general (int8 per-channel weights, int8
  dynamic per-tensor activations, straight-through gradients); BatchNorm stays a float op."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("error: the qwix peer row needs google/qwix: "
                     ".venv/bin/pip install -e '.[bench]'") from None
  from mpq.train import optim  # pylint: disable=g-import-not-at-top
  from mpq.train.loop import build_model  # pylint: disable=g-import-not-at-top
  from mpq.train.state import init_state, make_train_step  # pylint: disable=g-import-not-at-top
  model, _ = build_model(config, data)
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
  model = qwix.quantize_model(model, qwix.QtProvider(rules),
                              jnp.zeros((2, *data.image_shape), jnp.float32), False)
  tx = optim.build(config, 1000)
  graphdef, state = init_state(model, tx)
  return jax.jit(make_train_step(graphdef, tx), donate_argnums=(0,)), state, graphdef


def _batch(data, n: int):
  from mpq import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.train_dataset(data, n, 0, 10, "none")
  return next(iter(data_lib.iterate(ds, 0)))


def _row(name, a, b, ta, tb, unit, target=None, lower_is_better=True):
  ma, mb = float(np.median(ta)), float(np.median(tb))
  ratio = ma / mb
  row = {"name": name, "a": a, "b": b, "a_median": round(ma, 5), "b_median": round(mb, 5),
         "unit": unit, "ratio": round(ratio, 3), "repeats": len(ta)}
  if target is not None:
    row["target"] = f"{'<=' if lower_is_better else '>='} {target}"
    row["meets"] = bool(ratio <= target if lower_is_better else ratio >= target)
  return row


def step_rows(repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib  # pylint: disable=g-import-not-at-top
  rows = []
  data = data_lib.load("fashion_mnist", None, None, 1000)
  batch = jax.device_put(_batch(data, 128))
  for model in ("cnn", "resnet20"):
    steps = {"float": _step_fn(_config(model, None), data)}
    for e in ESTIMATORS:
      steps[e] = _step_fn(_config(model, e), data)
    steps["qwix"] = _qwix_step_fn(_config(model, None), data)
    states = {k: s for k, (_, s, _) in steps.items()}
    times = {k: [] for k in steps}
    for k, (f, _, _) in steps.items():
      for _ in range(3):
        states[k], m = f(states[k], batch)
        jax.block_until_ready(m)
    for _ in range(repeats):
      for k, (f, _, _) in steps.items():
        t = time.perf_counter()
        states[k], m = f(states[k], batch)
        jax.block_until_ready((states[k], m))
        times[k].append(time.perf_counter() - t)
    for e in ESTIMATORS:
      rows.append(_row(f"step_{model}_{e}", f"QAT W4A4 {e} train step", "float train step",
                       times[e], times["float"], "s per step (batch 128)",
                       TARGETS.get((model, e), 1.3)))
      print(f"{rows[-1]['name']}: {rows[-1]['ratio']:.3f}", flush=True)
    import qwix  # pylint: disable=g-import-not-at-top
    rows.append(_row(f"step_{model}_qwix_int8", f"peer: google/qwix {qwix.__version__} int8 QAT "
                     "train step", "float train step", times["qwix"], times["float"],
                     "s per step (batch 128)"))
    print(f"{rows[-1]['name']}: {rows[-1]['ratio']:.3f}", flush=True)
  return rows


def compile_rows() -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib  # pylint: disable=g-import-not-at-top
  from mpq.quant.quantizer import set_bits  # pylint: disable=g-import-not-at-top
  from mpq.train import compile_count  # pylint: disable=g-import-not-at-top
  from mpq.quant import model as quant_model  # pylint: disable=g-import-not-at-top
  data = data_lib.load("fashion_mnist", None, None, 1000)
  c = _config("cnn", "lsq")
  f, state, graphdef = _step_fn(c, data)
  batch = jax.device_put(_batch(data, 128))
  state, m = f(state, batch)
  jax.block_until_ready(m)
  step_compiles, host_compiles = 0, []
  rng = np.random.RandomState(0)
  for _ in range(10):
    before = compile_count()
    model = nnx.merge(graphdef, state.params, state.rest)
    layers = quant_model.current_bits(model)
    set_bits(model, {p: {"w_bits": int(rng.choice([2, 3, 4, 5, 6, 8])),
                         "a_bits": int(rng.choice([2, 3, 4, 5, 6, 8]))} for p in layers})
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = state._replace(params=params, rest=rest)
    host_compiles.append(compile_count() - before)
    before = compile_count()
    state, m = f(state, batch)
    jax.block_until_ready(m)
    step_compiles += compile_count() - before
  # The target is about the train step; reading and setting bits on the host runs a few small
  # eager jax ops, compiled once on first use (not per change), counted apart.
  return [{"name": "compile_bit_changes", "a": "train-step XLA compilations over 10 changes of "
           "every layer's bits (after step 1)", "b": "", "a_median": step_compiles,
           "b_median": None, "unit": "compilations", "ratio": None, "target": "== 0",
           "meets": step_compiles == 0,
           "note": f"eager host-side ops that read and set bits compiled {host_compiles[0]} times "
                   f"at the first change and {sum(host_compiles[1:])} times over the 9 after it"}]


def pipeline_rows(repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib  # pylint: disable=g-import-not-at-top
  data = data_lib.load("fashion_mnist", None, None, 1000)
  c = _config("cnn", None)
  f, state, _ = _step_fn(c, data)
  n = 20
  ds = data_lib.train_dataset(data, 128, 0, n * (repeats + 1), c.augment)
  it = iter(data_lib.iterate(ds, 0))
  mem = [jax.device_put(_batch(data, 128)) for _ in range(2)]
  for _ in range(3):
    state, m = f(state, mem[0])
  jax.block_until_ready(m)
  real, inmem = [], []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(n):
      state, m = f(state, next(it))
    jax.block_until_ready((state, m))
    real.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(n):
      state, m = f(state, mem[i % 2])
    jax.block_until_ready((state, m))
    inmem.append(time.perf_counter() - t)
  # throughput ratio = (1 / real) / (1 / inmem) = inmem / real
  row = _row("pipeline_throughput", f"{n} cnn steps on batches in memory",
             f"{n} cnn steps fed by the grain pipeline ({c.augment} augmentation)", inmem, real,
             f"s per {n} steps", 0.95, lower_is_better=False)
  row["note"] = "ratio = pipeline throughput / in-memory throughput"
  return [row]


def sensitivity_rows(repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib, models, quant  # pylint: disable=g-import-not-at-top
  from mpq.allocate import sensitivity as sens  # pylint: disable=g-import-not-at-top
  from mpq.quant import model as quant_model  # pylint: disable=g-import-not-at-top
  from mpq.losses import cross_entropy  # pylint: disable=g-import-not-at-top
  data = data_lib.load("fashion_mnist", None, None, 1000)
  c = _config("resnet20", "dbits")
  c.quant.rules = ()
  model, table = quant_model.build(c, data.num_classes, data.image_shape)
  b = _batch(data, 256)
  x, y = np.asarray(b["image"]), np.asarray(b["label"])
  quant.calibrate(model, [x], "percentile", "mse")
  paths = [p for p in table if not p.endswith("add")]
  choices = [(k, k) for k in (2, 3, 4, 5, 6, 8)]
  batched, single = [], []
  for _ in range(max(1, repeats // 4)):
    t = time.perf_counter()
    s_b, _ = sens.measured_sensitivity(model, paths, choices, x, y)
    batched.append(time.perf_counter() - t)
    t = time.perf_counter()
    s_1, _ = sens.measured_sensitivity(model, paths, choices, x, y, batched=False)
    single.append(time.perf_counter() - t)
  np.testing.assert_allclose(s_b, s_1, rtol=1e-4, atol=1e-6)
  rows = [_row("sensitivity_measured_resnet20", f"batched measured sensitivity ({len(paths)} layers "
               f"x {len(choices)} choices, one compilation)", "one jitted call per configuration",
               batched, single, "s (incl. compilation)", 1.0)]
  graphdef, params, rest = nnx.split(models.build("resnet20", data.num_classes, data.image_shape),
                                     nnx.Param, ...)

  def loss(p):
    return jnp.mean(cross_entropy(nnx.merge(graphdef, p, rest)(jnp.asarray(x), train=False),
                                  jnp.asarray(y)))

  groups = [lambda n, pre="".join(f"['{q}']" for q in p.split("/")): n.startswith(pre) and
            "['kernel']" in n for p in paths]
  t = time.perf_counter()
  r = sens.hutchinson_traces(loss, params, groups, jax.random.key(0), min_probes=8, max_probes=8)
  total = time.perf_counter() - t
  rows.append({"name": "hutchinson_resnet20", "a": f"Hutchinson traces of {len(paths)} layers, "
               f"{r['probes']} probes, 256 examples", "b": "", "a_median": round(total, 2),
               "b_median": None, "unit": "s (incl. compilation)", "ratio": None,
               "per_probe_s": round(total / r["probes"], 3)})
  return rows


_MEM_CHILD = """
import sys, jax
sys.path.insert(0, {root!r})
from benchmarks import speed
from mpq import data as data_lib
data = data_lib.load("fashion_mnist", None, None, 1000)
f, state, _ = speed._step_fn(speed._config("cnn", {est!r}), data)
batch = jax.device_put(speed._batch(data, 128))
for _ in range(30):
  state, m = f(state, batch)
jax.block_until_ready(m)
# VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark across exec
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def memory_rows(repeats: int) -> list[dict]:
  peaks = {"qat": [], "float": []}
  for _ in range(max(1, repeats // 4)):
    for k, est in (("qat", "lsq"), ("float", None)):
      out = subprocess.run([sys.executable, "-c", _MEM_CHILD.format(root=ROOT, est=est)],
                           capture_output=True, text=True, check=True)
      peaks[k].append(int(out.stdout.strip().splitlines()[-1]) / 1024)
  return [_row("memory_peak_rss", "peak RSS, 30 QAT W4A4 lsq steps (cnn, batch 128)",
               "peak RSS, 30 float steps", peaks["qat"], peaks["float"], "MiB", 1.5)]


ROWS = {"step": step_rows, "compile": lambda r: compile_rows(), "pipeline": pipeline_rows,
        "sensitivity": sensitivity_rows, "memory": memory_rows}


def table(rows) -> str:
  lines = ["| comparison | a | b | a median | b median | unit | ratio | target | meets |",
           "|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  for r in rows:
    meets = "" if "meets" not in r else ("yes" if r["meets"] else "**no**")
    lines.append(f"| {r['name']} | {r['a']} | {r['b']} | {fmt(r['a_median'])} | "
                 f"{fmt(r['b_median'])} | {r['unit']} | {fmt(r['ratio'])} | {r.get('target', '')} | "
                 f"{meets} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", default=",".join(ROWS))
  p.add_argument("--repeats", type=int, default=8)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "speed.json"))
  args = p.parse_args()
  names = cli.select_rows(args.rows, ROWS)
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  rows = []
  for n in names:
    print(f"== {n}", flush=True)
    rows += ROWS[n](args.repeats)
  cmd = ("python benchmarks/speed.py " + " ".join(sys.argv[1:])).strip()
  for r in rows:
    r["command"] = cmd
  out = {"rows": rows, "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
         "command": cmd,
         "seconds": round(time.time() - t0, 1)}
  if os.path.exists(args.out):  # keep rows of earlier runs that this run did not redo
    with open(args.out, encoding="utf-8") as f:
      old = json.load(f).get("rows", [])
    done = {r["name"] for r in rows}
    out["rows"] = [r for r in old if r["name"] not in done] + rows
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(table(out["rows"]))


if __name__ == "__main__":
  main()
