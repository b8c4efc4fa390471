"""Accuracy against model size: mixed precision (ILP) at several budgets next to uniform precision.

  python benchmarks/pareto.py --workdir=FLOAT_DIR --weight_bits_avg=2.5,3,4,6 \
      [--uniform_bits=2,3,4,8] [--epochs=1] [--sensitivity=hessian] [--out=DIR]

For every budget, a QAT run from the float checkpoint in `FLOAT_DIR` with `mixed.method=ilp`; for
every uniform bitwidth, a QAT run with all layers at that width; the first conv and the head stay
at 8 bits in both (`--pin`). Each run lives in `OUT/<name>` (a re-run reuses finished runs), and
`OUT/pareto.json` and `OUT/pareto.png` hold the points (size in KiB of weights vs test accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mpq import config as config_lib


def qat_config(float_dir: str, epochs: float, lr: float, pin: str):
  from mpq.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  _, meta = ckpt_lib.restore(os.path.join(float_dir, ckpt_lib.LATEST), None, None)
  c = config_lib.from_dict(meta["config"])
  c.init_from, c.num_epochs, c.num_train_steps = float_dir, epochs, -1
  c.learning_rate, c.warmup_steps = lr, 100
  c.quant.enabled = True
  c.quant.rules = ((pin, {"w_bits": 8, "a_bits": 8}),) if pin else ()
  c.mixed.pins = ((pin, 8),) if pin else ()
  return c


def run_point(c, workdir: str) -> dict:
  from mpq.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  r = train_and_evaluate(c, workdir, progress=False)
  with open(os.path.join(workdir, "bits.json"), encoding="utf-8") as f:
    bits = json.load(f)
  layers = {k: v for k, v in bits.items() if not k.startswith("_")}
  from mpq import data as data_lib, models  # pylint: disable=g-import-not-at-top
  data = data_lib.load(c.dataset, c.data_dir or None, 1, 1)
  fm = models.build(c.model, data.num_classes, data.image_shape, **c.model_kwargs.to_dict())
  weights = {p: v["weights"] for p, v in models.layer_costs(fm, data.image_shape).items()}
  size_bits = sum(weights[p] * layers[p]["w_bits"] for p in weights)
  return {"accuracy": round(100 * r["accuracy"], 2), "size_kib": size_bits / 8 / 1024,
          "weight_bits_avg": size_bits / sum(weights.values()),
          "bits": {p: [v["w_bits"], v["a_bits"]] for p, v in layers.items()}}


def plot(points: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, marker in (("uniform", "s"), ("mixed", "o")):
    pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["size_kib"])
    if pts:
      ax.plot([p["size_kib"] for p in pts], [p["accuracy"] for p in pts], marker=marker,
              label=f"{kind} precision" + (" (ILP)" if kind == "mixed" else ""))
      for p in pts:
        ax.annotate(p["label"], (p["size_kib"], p["accuracy"]), fontsize=7,
                    textcoords="offset points", xytext=(3, -9))
  ax.set_xlabel("weights (KiB)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="workdir of the float model")
  p.add_argument("--weight_bits_avg", default="2.5,3,4,6", help="budgets (average weight bits)")
  p.add_argument("--uniform_bits", default="2,3,4,8")
  p.add_argument("--epochs", type=float, default=1.0)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--sensitivity", default="hessian", choices=["hessian", "measured"])
  p.add_argument("--pin", default="conv1|head", help="layers kept at 8 bits ('' = none)")
  p.add_argument("--out", default=None, help="default: WORKDIR/pareto")
  a = p.parse_args(argv)
  try:
    budgets = [float(x) for x in a.weight_bits_avg.split(",") if x]
    uniform = [int(x) for x in a.uniform_bits.split(",") if x]
  except ValueError:
    print("error: --weight_bits_avg and --uniform_bits take comma-separated numbers", file=sys.stderr)
    return 2
  if not os.path.isdir(a.workdir):
    print(f"error: {a.workdir} does not exist; pass the workdir of a float training run",
          file=sys.stderr)
    return 2
  out = a.out or os.path.join(a.workdir, "pareto")
  os.makedirs(out, exist_ok=True)
  points = []
  from mpq.errors import UserError  # pylint: disable=g-import-not-at-top
  try:
    for b in uniform:
      c = qat_config(a.workdir, a.epochs, a.lr, a.pin)
      c.quant.w_bits = c.quant.a_bits = b
      pt = run_point(c, os.path.join(out, f"uniform_w{b}a{b}"))
      points.append({"kind": "uniform", "label": f"W{b}A{b}", **pt})
    for budget in budgets:
      c = qat_config(a.workdir, a.epochs, a.lr, a.pin)
      c.mixed.enabled, c.mixed.weight_bits_avg, c.mixed.sensitivity = True, budget, a.sensitivity
      pt = run_point(c, os.path.join(out, f"mixed_{budget:g}"))
      points.append({"kind": "mixed", "label": f"avg {budget:g}", **pt})
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with open(os.path.join(out, "pareto.json"), "w", encoding="utf-8") as f:
    json.dump({"float_workdir": a.workdir, "points": points, "command": " ".join(sys.argv)}, f,
              indent=2)
  plot(points, os.path.join(out, "pareto.png"), f"{a.workdir}: accuracy vs weight size")
  for pt in points:
    print(f"{pt['label']:>10}  {pt['size_kib']:8.2f} KiB  {pt['accuracy']:.2f}%")
  print(f"wrote {os.path.join(out, 'pareto.png')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
