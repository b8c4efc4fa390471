"""Integer-export benchmark: the int32 executor against the fake-quant model it was exported from.

Command:  python benchmarks/integer.py [--rows=cnn_w8a8,...] [--resnet_qat_steps=150]
Output:   benchmarks/results/integer.json and a table on stdout (pasted into the README by
          `make bench`).
Runtime:  about 25 minutes on 2 CPU cores when the accuracy and mixed benchmarks' checkpoints and
          the float ResNet-20 exist; training a missing float ResNet-20 adds about 35 minutes.

Rows (Fashion-MNIST test split, 10,000 images):
  cnn_w8a8, cnn_w4a4, cnn_w2a2   the accuracy benchmark's QAT checkpoints (trained if missing)
  cnn_mixed                      the mixed benchmark's `ilp_measured_b3` (3-bit weight budget)
  resnet20_w8a8/w4a4/w2a2        QAT for --resnet_qat_steps from the float ResNet-20
                                 (`configs/fmnist_resnet20.py`, trained into --resnet_float if
                                 missing), stem and head at 8 bits, residual additions' inputs
                                 at 8 bits, SGD at --resnet_qat_lr
  resnet20_mixed                 the same with mixed.method=ilp (measured sensitivity), weights at
                                 an average of 3 bits, activations at 4
  mobilenet_v2_*                 the same four from the float MobileNetV2 (width 0.35,
                                 `configs/fmnist_mobilenet_v2.py`, --mobilenet_float)
Each row: fake-quant accuracy, integer accuracy, top-1 agreement, the largest logit difference in
accumulator LSBs, and the exported size (manifest + weights.npz) against float32 parameters and
batch statistics. Targets: integer accuracy within 0.1 points of fake-quant, agreement >= 99.5%.

Speed (one row per model, the W8A8 export): images/second of the jitted integer executor and of the
jitted float model at batch 256 on the same images, medians of --repeats alternating timed calls
after warm-up, in one process; the ratio int / float (issue target >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import accuracy, cli, mixed  # noqa: E402  pylint: disable=g-import-not-at-top

# Deep models: their float config (`configs/`) and the flag naming their float workdir.
DEEP = {"resnet20": ("fmnist_resnet20", "resnet_float"),
        "mobilenet_v2": ("fmnist_mobilenet_v2", "mobilenet_float")}
ROWS = ([f"cnn_w{b}a{b}" for b in (8, 4, 2)] + ["cnn_mixed"]
        + [f"{m}_{w}" for m in DEEP for w in ("w8a8", "w4a4", "w2a2", "mixed")])
DEEP_PIN = "stem|head"


def split_row(name: str) -> tuple[str, str]:
  """("mobilenet_v2", "w8a8") of row "mobilenet_v2_w8a8"."""
  model, what = name.rsplit("_", 1)
  return model, what


def float_workdir(model: str, args) -> str:
  """Trains (or reuses) the float checkpoint of a deep model; returns its workdir."""
  import importlib  # pylint: disable=g-import-not-at-top
  from mpq.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  config_name, flag = DEEP[model]
  wd = getattr(args, flag)
  train_and_evaluate(importlib.import_module(f"configs.{config_name}").get_config(), wd,
                     progress=False)
  return wd


def row_workdir(name: str, args) -> str:
  """Trains (or reuses) the QAT checkpoint of a row; returns its workdir."""
  from benchmarks import pareto  # pylint: disable=g-import-not-at-top
  from mpq.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  model, what = split_row(name)
  if model == "cnn":
    acc_args = argparse.Namespace(**{**vars(args), "workdir": args.accuracy_workdir})
    accuracy.run_row("fp32", acc_args)
    if what == "mixed":
      weights = mixed.layer_weights(acc_args)
      fp_dir = os.path.join(args.accuracy_workdir, "fp32")
      c = mixed.arm_config(acc_args, 3, ("measured", "ilp"), mixed.budget_avg(3, weights), fp_dir)
      wd = os.path.join(args.mixed_workdir, "ilp_measured_b3")
      train_and_evaluate(c, wd, progress=False)
      return wd
    accuracy.run_row(f"qat_{what}", acc_args)
    return os.path.join(args.accuracy_workdir, f"qat_{what}")
  fp = float_workdir(model, args)
  c = pareto.qat_config(fp, 1.0, args.resnet_qat_lr, DEEP_PIN)
  # residual additions keep 8-bit inputs (at 2 bits every block's sum collapses the signal)
  c.quant.rules = tuple(c.quant.rules) + ((r".*/add", {"a_bits": 8}),)
  c.num_train_steps, c.warmup_steps = args.resnet_qat_steps, max(1, args.resnet_qat_steps // 5)
  if what == "mixed":
    c.quant.w_bits = c.quant.a_bits = 4
    m = c.mixed
    m.enabled, m.sensitivity, m.weight_bits_avg, m.a_bits = True, "measured", 3.0, 4
  else:
    c.quant.w_bits = c.quant.a_bits = int(what[1:what.index("a")])
  wd = os.path.join(args.workdir, name)
  train_and_evaluate(c, wd, progress=False)
  return wd


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def float_bytes(model) -> int:
  """Bytes of the float model's parameters and batch statistics in float32."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = nnx.state(model, nnx.Param, nnx.BatchStat)
  return 4 * sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(state))


def evaluate_row(name: str, wd: str) -> tuple[dict, tuple]:
  from mpq import export, models  # pylint: disable=g-import-not-at-top
  from mpq.export.evaluate import evaluate_int  # pylint: disable=g-import-not-at-top
  from mpq.train.loop import load_model  # pylint: disable=g-import-not-at-top
  fq_model, config, data, step = load_model(wd)
  out = os.path.join(wd, "int_export")
  export.export(fq_model, data.image_shape, out, {"dataset": config.dataset, "model": config.model,
                                                   "workdir": os.path.abspath(wd), "step": step})
  manifest, tensors = export.load(out)
  r = evaluate_int(manifest, tensors, data, fq_model=fq_model)
  fm = models.build(config.model, data.num_classes, data.image_shape,
                    **config.model_kwargs.to_dict())
  fq, it = 100 * r["fake_quant_accuracy"], 100 * r["accuracy"]
  row = {"name": name, "model": config.model, "workdir": os.path.relpath(wd, ROOT),
         "fake_quant_accuracy": round(fq, 2), "int_accuracy": round(it, 2),
         "delta": round(it - fq, 2), "agreement": round(100 * r["agreement_with_fake_quant"], 3),
         "max_logit_lsb_diff": r["max_logit_lsb_diff"], "export_bytes": _dir_bytes(out),
         "float_bytes": float_bytes(fm)}
  row["size_ratio"] = round(row["export_bytes"] / row["float_bytes"], 4)
  row["meets"] = abs(row["delta"]) <= 0.1 + 1e-9 and row["agreement"] >= 99.5
  return row, (manifest, tensors, config, data)


def speed(model_name: str, exported, float_dir: str, repeats: int) -> dict:
  """Integer executor vs the jitted float model, batch 256, medians of alternating timed calls."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib, intexec  # pylint: disable=g-import-not-at-top
  from mpq.train.loop import load_model  # pylint: disable=g-import-not-at-top
  manifest, tensors, _, data = exported
  run, _, _ = intexec.build(manifest, tensors)
  fm, _, _, _ = load_model(float_dir)
  graphdef, state = nnx.split(fm)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))
  x = jax.numpy.asarray(next(data_lib.eval_batches(data, 256))["image"])
  calls = {"int": lambda: run(x), "float": lambda: fwd(state, x)}
  times = {k: [] for k in calls}
  for k, f in calls.items():  # compile and warm up
    for _ in range(2):
      jax.block_until_ready(f())
  for _ in range(repeats):
    for k, f in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t)
  med = {k: float(np.median(v)) for k, v in times.items()}
  ips = {k: 256 / v for k, v in med.items()}
  return {"name": f"{model_name}_int_vs_float", "a": "integer executor (W8A8 export)",
          "b": "jitted float model", "batch": 256, "a_median": round(med["int"], 5),
          "b_median": round(med["float"], 5), "unit": "s per batch",
          "int_img_s": round(ips["int"], 1), "float_img_s": round(ips["float"], 1),
          "ratio": round(ips["int"] / ips["float"], 3), "target": ">= 0.5",
          "meets": ips["int"] / ips["float"] >= 0.5, "repeats": repeats}


def table(rows, speeds) -> str:
  lines = ["| row | fake-quant (%) | int (%) | delta | agreement (%) | max logit diff (LSB) | "
           "export / float32 size | meets |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['fake_quant_accuracy']:.2f} | {r['int_accuracy']:.2f} | "
                 f"{r['delta']:+.2f} | {r['agreement']:.2f} | {r['max_logit_lsb_diff']:.0f} | "
                 f"{r['export_bytes']:,} / {r['float_bytes']:,} B ({r['size_ratio']:.3f}) | "
                 f"{'yes' if r['meets'] else '**no**'} |")
  if speeds:
    lines += ["", "| model | int img/s | float img/s | int / float | target | meets |",
              "|---|---|---|---|---|---|"]
    for s in speeds:
      lines.append(f"| {s['name'].split('_')[0]} | {s['int_img_s']:.0f} | {s['float_img_s']:.0f} | "
                   f"{s['ratio']:.3f} | {s['target']} | {'yes' if s['meets'] else '**no**'} |")
  return "\n".join(lines)


def add_row_args(p: argparse.ArgumentParser) -> None:
  """The flags `row_workdir` reads: where the rows' checkpoints live and how missing ones train."""
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "bench_integer"))
  p.add_argument("--accuracy_workdir", default=os.path.join(ROOT, "workdirs", "bench_accuracy"))
  p.add_argument("--mixed_workdir", default=os.path.join(ROOT, "workdirs", "bench_mixed"))
  p.add_argument("--resnet_float", default=os.path.join(ROOT, "workdirs", "bench_integer",
                                                        "resnet20_fp32"))
  p.add_argument("--mobilenet_float", default=os.path.join(ROOT, "workdirs", "bench_integer",
                                                           "mobilenet_v2_fp32"))
  p.add_argument("--resnet_qat_steps", type=int, default=150,
                 help="QAT steps of every deep-model row (resnet20, mobilenet_v2)")
  p.add_argument("--resnet_qat_lr", type=float, default=0.01,
                 help="QAT learning rate of every deep-model row")
  accuracy.add_recipe_args(p)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_row_args(p)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "integer.json"))
  args = p.parse_args()
  names = cli.select_rows(args.rows, ROWS)
  t0 = time.time()
  rows, speeds = [], []
  for name in names:
    print(f"== {name}", flush=True)
    t1 = time.time()
    row, exported = evaluate_row(name, row_workdir(name, args))
    row["seconds"] = round(time.time() - t1, 1)
    rows.append(row)
    print(f"== {name}: fake-quant {row['fake_quant_accuracy']:.2f}%, int {row['int_accuracy']:.2f}%,"
          f" agreement {row['agreement']:.2f}%", flush=True)
    if name.endswith("_w8a8"):
      model = split_row(name)[0]
      float_dir = (os.path.join(args.accuracy_workdir, "fp32") if model == "cnn"
                   else getattr(args, DEEP[model][1]))
      speeds.append(speed(model, exported, float_dir, args.repeats))
      print(f"== {speeds[-1]['name']}: {speeds[-1]['int_img_s']:.0f} vs "
            f"{speeds[-1]['float_img_s']:.0f} img/s", flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  out = {"dataset": "fashion_mnist", "rows": rows, "speed": speeds,
         "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
         "command": ("python benchmarks/integer.py " + " ".join(sys.argv[1:])).strip(),
         "seconds": round(time.time() - t0, 1)}
  for r in rows + speeds:
    r["command"] = out["command"]
  if os.path.exists(args.out):  # keep rows of earlier runs that this run did not redo
    with open(args.out, encoding="utf-8") as f:
      old = json.load(f)
    for key in ("rows", "speed"):
      done = {r["name"] for r in out[key]}
      out[key] = [r for r in old.get(key, []) if r["name"] not in done] + out[key]
    out["rows"].sort(key=lambda r: ROWS.index(r["name"]))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(table(out["rows"], out["speed"]))


if __name__ == "__main__":
  main()
