"""Accuracy benchmark: float, PTQ and QAT (every estimator) on the Fashion-MNIST test split.

Command:  python benchmarks/accuracy.py [--workdir=workdirs/bench_accuracy] [--rows=fp32,qat_w4a4]
Output:   benchmarks/results/accuracy.json and a table on stdout (also pasted into the README by
          `make bench`).
Runtime:  about 40 minutes on 2 CPU cores with the defaults (each row's workdir is kept, so a
          re-run resumes or reuses finished rows; delete the workdir for a clean run).

Recipe (the same for every QAT row; see the README for what matters):
  fp32       configs/fmnist_cnn.py for --float_epochs epochs (50 warm-up steps, no augmentation,
             weight decay 5e-4)
  ptq_w8a8   the fp32 checkpoint calibrated on 4 training batches (activations: 99.99th percentile,
             weights: per-channel MSE) and evaluated fake-quantized, no training
  qat_*      from the fp32 checkpoint (`init_from`), calibrated as for PTQ, then --qat_epochs of
             fine-tuning with adamw at --qat_lr (cosine, 100 warm-up steps); the first conv and the
             head at 8 bits (`quant.rules`), every other layer at the row's bits, per-channel weights
  peer_qwix_w8a8  google/qwix int8 QAT (`qwix.QtProvider`) on the same float model and recipe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from configs import fmnist_cnn  # noqa: E402  pylint: disable=g-import-not-at-top
from mpq.experiment import train_and_evaluate  # noqa: E402
from mpq.train import evaluate_checkpoint  # noqa: E402

TARGETS = {"ptq_w8a8": 0.5, "qat_w8a8": 0.5, "qat_w4a4": 0.5, "qat_w3a3": 1.0, "qat_w2a2": 3.0}
ROWS = (["fp32", "ptq_w8a8", "qat_w8a8", "qat_w4a4", "qat_w3a3", "qat_w2a2"]
        + [f"qat_w{b}a{b}_{e}" for e in ("ste", "tqt", "noise") for b in (4, 2)]
        + ["peer_qwix_w8a8"])
# Ablations of the W2A2 recipe (not run by default; `--rows=ablate_w2a2_osc,...`):
#   osc      + oscillation dampening (0.1) and iterative freezing (threshold 0.02), with BatchNorm
#            statistics frozen from the start (`bn_freeze_step=0`, which freezing requires)
#   scratch  no float initialisation: QAT from random weights for --qat_epochs
#   1ep      half the fine-tuning (1 epoch)
#   maxcal   activation ranges from the plain max instead of the 99.99th percentile
#   distill  + knowledge distillation from the fp32 model (weight 0.5, T = 1)
ABLATIONS = ["ablate_w2a2_osc", "ablate_w2a2_scratch", "ablate_w2a2_1ep", "ablate_w2a2_maxcal",
             "ablate_w2a2_distill"]


def float_config(args):
  """configs/fmnist_cnn.py with the demo's short schedule: no augmentation, light weight decay."""
  c = fmnist_cnn.get_config()
  c.num_epochs = args.float_epochs
  c.warmup_steps = 50
  c.augment = "none"
  c.weight_decay = 5e-4
  c.seed = args.seed
  return c


def qat_config(args, bits: int, estimator: str):
  c = float_config(args)
  c.init_from = os.path.join(args.workdir, "fp32")
  c.num_epochs = args.qat_epochs
  c.learning_rate = args.qat_lr
  c.warmup_steps = 100
  q = c.quant
  q.enabled, q.w_bits, q.a_bits, q.estimator = True, bits, bits, estimator
  q.rules = (("conv1|head", {"w_bits": 8, "a_bits": 8}),)
  return c


def parse_row(name: str):
  """'qat_w4a4_tqt' -> (4, 'tqt')."""
  parts = name.split("_")
  bits = int(parts[1][1:parts[1].index("a")])
  return bits, parts[2] if len(parts) > 2 else "lsq"


def run_row(name: str, args) -> dict:
  wd = os.path.join(args.workdir, name)
  t0 = time.time()
  if name == "fp32":
    r = train_and_evaluate(float_config(args), wd, progress=False)
  elif name == "ptq_w8a8":
    r = evaluate_checkpoint(os.path.join(args.workdir, "fp32"), mode="auto",
                            ptq={"w_bits": 8, "a_bits": 8, "estimator": "lsq"})
  elif name == "peer_qwix_w8a8":
    from benchmarks import qwix_peer  # pylint: disable=g-import-not-at-top
    r = qwix_peer.train_and_evaluate(qat_config(args, 8, "lsq"), wd)
  elif name.startswith("ablate_"):
    c = qat_config(args, 2, "lsq")
    what = name.rsplit("_", 1)[1]
    if what == "osc":
      c.quant.osc_dampen, c.quant.osc_freeze = 0.1, 0.02
      c.quant.bn_freeze_step = 0  # freezing needs frozen BatchNorm statistics (QuantConvBN)
    elif what == "scratch":
      c.init_from, c.learning_rate = "", float_config(args).learning_rate
    elif what == "1ep":
      c.num_epochs = args.qat_epochs / 2
    elif what == "maxcal":
      c.quant.calib_act = "max"
    elif what == "distill":
      c.quant.teacher_workdir = os.path.join(args.workdir, "fp32")
    r = train_and_evaluate(c, wd, progress=False)
  else:
    bits, estimator = parse_row(name)
    r = train_and_evaluate(qat_config(args, bits, estimator), wd, progress=False)
  return {"name": name, "accuracy": round(100 * r["accuracy"], 2),
          "seconds": round(time.time() - t0, 1)}


def table(rows) -> str:
  lines = ["| row | accuracy (%) | delta to fp32 | target | meets | seconds |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    tgt = f"within {r['target']}" if "target" in r else ""
    lines.append(f"| {r['name']} | {r['accuracy']:.2f} | {r.get('delta', 0):+.2f} | {tgt} | "
                 f"{'' if 'meets' not in r else ('yes' if r['meets'] else 'NO')} | {r['seconds']} |")
  return "\n".join(lines)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
  """The recipe flags `float_config` and `qat_config` read (shared with benchmarks/mixed.py)."""
  p.add_argument("--float_epochs", type=float, default=5)
  p.add_argument("--qat_epochs", type=float, default=2)
  p.add_argument("--qat_lr", type=float, default=5e-4)
  p.add_argument("--seed", type=int, default=0)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "bench_accuracy"))
  p.add_argument("--rows", default=",".join(ROWS),
                 help="comma-separated subset of " + ",".join(ROWS + ABLATIONS))
  add_recipe_args(p)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "accuracy.json"))
  args = p.parse_args()
  names = cli.select_rows(args.rows, ROWS + ABLATIONS)
  t0 = time.time()
  rows = []
  for n in ["fp32"] + [n for n in names if n != "fp32"]:
    print(f"== {n}", flush=True)
    rows.append(run_row(n, args))
    print(f"== {n}: {rows[-1]['accuracy']:.2f}% in {rows[-1]['seconds']} s", flush=True)
  fp = rows[0]["accuracy"]
  for r in rows[1:]:
    r["delta"] = round(r["accuracy"] - fp, 2)
    if r["name"] in TARGETS:
      r["target"] = TARGETS[r["name"]]
      r["meets"] = r["delta"] >= -TARGETS[r["name"]]
  cmd = ("python benchmarks/accuracy.py " + " ".join(sys.argv[1:])).strip()
  for r in rows:
    r["command"] = cmd
  if os.path.exists(args.out):  # keep rows of earlier runs that this run did not redo
    with open(args.out, encoding="utf-8") as f:
      old = {r["name"]: r for r in json.load(f).get("rows", [])}
    new = {r["name"]: r for r in rows}
    rows = [new.get(n) or old[n] for n in ROWS + ABLATIONS if n in new or n in old]
  out = {"model": "cnn", "dataset": "fashion_mnist", "rows": rows, "command": cmd,
         "seconds": round(time.time() - t0, 1),
         "recipe": {"float_epochs": args.float_epochs, "qat_epochs": args.qat_epochs,
                    "qat_lr": args.qat_lr, "first_last_bits": 8, "seed": args.seed}}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(table(rows))


if __name__ == "__main__":
  main()
