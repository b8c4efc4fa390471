"""Mixed-precision benchmark: uniform vs greedy vs ILP (Hessian, measured) at equal weight size.

Command:  python benchmarks/mixed.py [--workdir=workdirs/bench_mixed] [--budgets=3,4] [--qat_epochs=2]
Output:   benchmarks/results/mixed.json, a table on stdout, and the Pareto PNG
          benchmarks/results/mixed_pareto.png (accuracy against weight size).
Runtime:  about 8 QAT runs of --qat_epochs each plus the fp32 model (about 35 minutes on 2 CPU
          cores with the defaults; finished runs are reused on a re-run).

Arms, for each budget b (the size of uniform b-bit weights with the first conv and the head at 8
bits, which all arms pin at 8): `uniform_w{b}` (W b A b), `greedy_hessian`, `ilp_hessian`,
`ilp_measured` (mixed.method=ilp with that sensitivity and solver, weight bits from 2,3,4,5,6,8
and activations at b bits, as in the uniform arm). Same float checkpoint, recipe and epochs as
benchmarks/accuracy.py's QAT rows.
Targets: ILP+QAT beats uniform by >= 0.3 points at the 3-bit budget and is no worse at 4 bits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import accuracy  # noqa: E402  pylint: disable=g-import-not-at-top
from mpq import data as data_lib, models  # noqa: E402
from benchmarks import pareto  # noqa: E402
from mpq.experiment import train_and_evaluate  # noqa: E402

PIN = "conv1|head"


def budget_avg(b: int, weights: dict) -> float:
  """Average weight bits of uniform b-bit weights with the pinned layers at 8."""
  import re  # pylint: disable=g-import-not-at-top
  total = sum(weights.values())
  return sum(n * (8 if re.fullmatch(PIN, p) else b) for p, n in weights.items()) / total


def layer_weights(args) -> dict:
  """Kernel elements per dense/conv layer of the benchmark's float model."""
  c0 = accuracy.float_config(args)
  data = data_lib.load(c0.dataset, None, 1, 1)
  fm = models.build(c0.model, data.num_classes, data.image_shape)
  return {k: v["weights"] for k, v in models.layer_costs(fm, data.image_shape).items()}


def arm_config(args, b: int, how, avg: float, fp_dir: str):
  """The QAT config of one arm: uniform W b A b (`how` None) or (sensitivity, solver) allocation
  of the weight bits under the average `avg`, activations at b bits."""
  c = accuracy.qat_config(args, b, "lsq")
  c.init_from = fp_dir
  if how is not None:
    c.mixed.enabled, c.mixed.weight_bits_avg = True, avg
    c.mixed.sensitivity, c.mixed.solver = how
    c.mixed.a_bits = b  # activations as in the uniform arm: only weight bits are allocated
    c.mixed.pins = ((PIN, 8),)  # W8A8, as the uniform arm's rules
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "bench_mixed"))
  p.add_argument("--budgets", default="3,4")
  accuracy.add_recipe_args(p)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mixed.json"))
  args = p.parse_args()
  t0 = time.time()
  fp_dir = os.path.join(args.workdir, "fp32")
  fp = train_and_evaluate(accuracy.float_config(args), fp_dir, progress=False)
  weights = layer_weights(args)
  rows, points = [], []
  for b in [int(x) for x in args.budgets.split(",")]:
    avg = budget_avg(b, weights)
    arms = {f"uniform_w{b}": None, "greedy_hessian": ("hessian", "greedy"),
            "ilp_hessian": ("hessian", "ilp"), "ilp_measured": ("measured", "ilp")}
    for arm, how in arms.items():
      c = arm_config(args, b, how, avg, fp_dir)
      name = arm if how is None else f"{arm}_b{b}"
      t1 = time.time()
      pt = pareto.run_point(c, os.path.join(args.workdir, name))
      rows.append({"name": name, "budget_bits": b, "budget_weight_bits_avg": round(avg, 4),
                   "accuracy": pt["accuracy"], "weight_bits_avg": round(pt["weight_bits_avg"], 4),
                   "size_kib": round(pt["size_kib"], 2), "bits": pt["bits"],
                   "seconds": round(time.time() - t1, 1)})
      points.append({"kind": "uniform" if how is None else "mixed",
                     "label": name, **{k: pt[k] for k in ("accuracy", "size_kib")}})
      print(f"== {name}: {pt['accuracy']:.2f}% at {pt['weight_bits_avg']:.3f} avg weight bits",
            flush=True)
  summary = {}
  for b in [int(x) for x in args.budgets.split(",")]:
    uni = next(r for r in rows if r["name"] == f"uniform_w{b}")["accuracy"]
    best = max(r["accuracy"] for r in rows if r["name"] in (f"ilp_hessian_b{b}", f"ilp_measured_b{b}"))
    need = 0.3 if b == 3 else 0.0
    summary[f"{b}bit"] = {"uniform": uni, "best_ilp": best, "gain": round(best - uni, 2),
                          "target": f">= +{need}", "meets": best - uni >= need - 1e-9}
  out = {"model": "cnn", "dataset": "fashion_mnist", "fp32": round(100 * fp["accuracy"], 2),
         "rows": rows, "summary": summary, "seconds": round(time.time() - t0, 1),
         "command": ("python benchmarks/mixed.py " + " ".join(sys.argv[1:])).strip()}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  pareto.plot(points, os.path.join(os.path.dirname(args.out), "mixed_pareto.png"),
              "cnn on Fashion-MNIST: accuracy vs weight size")
  for r in rows:
    print(f"{r['name']:>20}  {r['accuracy']:6.2f}%  {r['weight_bits_avg']:.3f} bits")
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
