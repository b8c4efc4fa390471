"""Deployment benchmark: QAT checkpoints exported to .tflite and .onnx and run in the real runtimes.

Command:  python benchmarks/deploy.py [--rows=cnn_w8a8,cnn_w4a4,cnn_w2a2,cnn_mixed]
          [--num_examples=10000] [--latency_repeats=300]
Output:   benchmarks/results/deploy.json and a table on stdout (pasted into the README).
Runtime:  about 15 minutes on 2 CPU cores for the four cnn rows when their checkpoints exist
          (`benchmarks/integer.py`'s rows: the accuracy benchmark's QAT checkpoints and the mixed
          benchmark's `ilp_measured_b3`, trained first if missing: about 30 minutes more);
          resnet20 and mobilenet_v2 rows (`--rows=resnet20_w8a8,...,mobilenet_v2_mixed`) train
          their float model first if missing (`configs/fmnist_resnet20.py`,
          `configs/fmnist_mobilenet_v2.py`), then 150 QAT steps per row (`benchmarks/integer.py`).

Each row's checkpoint is exported with `--target=tflite` and `--target=onnx` (output grid
calibrated on 1,000 training images, as `eval.py --export` does), and the file is run on the first
--num_examples test images (uint8 pixels, as the dataset stores them) by each runtime path: LiteRT's
`litert-ref` (BUILTIN_REF), `litert-ruy` (the builtin optimized kernels) and `litert-auto` (the
default: XNNPACK where it takes an op), and ONNX Runtime (`ort`). Per (row, runtime), besides
`model`, `bits` (the row's: w8a8, w4a4, w2a2, mixed), `target` and `runtime`:

  size_bytes            the .tflite / .onnx file
  float_tflite_bytes    the float32 twin (`tflite_target.to_float_tflite`: same graph, float
                        weights and activations)
  accuracy              top-1 of the runtime's integer logits (ties to the lowest index), in percent
  mismatches            output values that differ from mpq's executor emulating that runtime path
                        (`--emulate`): the exactness claim, 0 expected
  agreement_fake_quant  top-1 agreement of the runtime with the fake-quant model, in percent
  latency_ratio         (LiteRT only) median time of one batch-1 `invoke` of the integer file over
                        that of its float twin under the same resolver, one thread; the two are
                        timed alternately in one process (--latency_repeats calls each after 20
                        warm-up calls), so machine load affects both alike. Below 1: the integer
                        file is faster. `latency_ms`: the integer file's median (absolute times on a
                        shared machine are noisy; the ratio is the figure)
  latency_ms            (ORT) the median batch-1 session run, one thread, ORT_ENABLE_ALL
  weight_bits           the bits each layer's weights were trained at
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import cli, integer, ort_rules  # noqa: E402  pylint: disable=g-import-not-at-top

ROWS = integer.ROWS
RUNTIMES = {"tflite": ("litert-ref", "litert-ruy", "litert-auto"), "onnx": ("ort",)}
FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}


def _median_pair(calls: dict, repeats: int, warmup: int = 20) -> dict:
  """Median seconds of each zero-argument call, timed alternately (`repeats` rounds)."""
  for f in calls.values():
    for _ in range(warmup):
      f()
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, f in calls.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def tflite_latency(int_model: bytes, float_model: bytes, family: str, pixels, image,
                   repeats: int) -> dict:
  """Batch-1 single-thread `invoke` medians of the integer file and its float twin (alternating)."""
  from mpq.export import tflite_builder as tb  # pylint: disable=g-import-not-at-top
  interps = {}
  for key, model, x in (("int", int_model, pixels[:1]), ("float", float_model, image[:1])):
    interp = tb.interpreter(model, family, num_threads=1)
    (d,) = interp.get_input_details()
    interp.resize_tensor_input(d["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(d["index"], np.asarray(x, d["dtype"]))
    interps[key] = interp
  med = _median_pair({k: i.invoke for k, i in interps.items()}, repeats)
  return {"latency_ms": round(1e3 * med["int"], 4), "float_latency_ms": round(1e3 * med["float"], 4),
          "latency_ratio": round(med["int"] / med["float"], 3)}


def ort_latency(model: bytes, x, repeats: int) -> dict:
  from mpq.export import onnx_builder as ob  # pylint: disable=g-import-not-at-top
  sess = ob.session(model, "all", 1)
  name = sess.get_inputs()[0].name
  med = _median_pair({"int": lambda: sess.run(None, {name: x[:1]})}, repeats)
  return {"latency_ms": round(1e3 * med["int"], 4)}


def run_row(name: str, args) -> list[dict]:
  """Exports row `name`'s checkpoint to both targets and runs each runtime path."""
  from mpq import export  # pylint: disable=g-import-not-at-top
  from mpq.export import tflite_target  # pylint: disable=g-import-not-at-top
  from mpq.export.evaluate import (  # pylint: disable=g-import-not-at-top
      calibration_images, evaluate_runtime, test_set)
  from mpq.export import exporter  # pylint: disable=g-import-not-at-top
  from mpq.train.loop import load_model  # pylint: disable=g-import-not-at-top
  wd = integer.row_workdir(name, args)
  fq_model, config, data, step = load_model(wd)
  calib = calibration_images(data)
  ts = test_set(data, args.num_examples)
  fq_top1 = exporter.fake_quant_logits(fq_model, ts["image"]).argmax(-1)
  fq_acc = 100 * float(np.mean(fq_top1 == ts["label"]))
  out_rows = []
  for target, runtimes in RUNTIMES.items():
    out = os.path.join(wd, f"deploy_{target}")
    if os.path.isdir(out):  # an earlier run's export: replaced as a whole
      shutil.rmtree(out)
    export.export(fq_model, data.image_shape, out,
                  {"dataset": config.dataset, "model": config.model, "step": step,
                   "workdir": os.path.abspath(wd)}, target=target, calibration=calib)
    manifest, tensors = export.load(out)
    layer_bits = {k: v["w_bits"] for k, v in exporter.layer_bits(manifest).items()}
    with open(os.path.join(out, FILES[target]), "rb") as f:
      data_bytes = f.read()
    twin = tflite_target.to_float_tflite(manifest, tensors) if target == "tflite" else None
    for runtime in runtimes:
      t0 = time.time()
      r = evaluate_runtime(out, manifest, tensors, data, runtime, args.num_examples,
                           keep_outputs=True)
      row = {"name": name, "model": config.model, "bits": integer.split_row(name)[1],
             "target": target, "runtime": runtime,
             "size_bytes": len(data_bytes),
             "accuracy": round(100 * r["accuracy"], 2),
             "emulation_accuracy": round(100 * r["emulation_accuracy"], 2),
             "fake_quant_accuracy": round(fq_acc, 2),
             "mismatches": r["mismatches"], "num_examples": r["num_examples"],
             "outputs_compared": int(r["outputs"].size),
             "agreement_fake_quant": round(100 * float(np.mean(
                 r["outputs"].argmax(-1) == fq_top1)), 2)}
      if twin is not None:
        row["float_tflite_bytes"] = len(twin)
        row.update(tflite_latency(data_bytes, twin, runtime, r["images"], ts["image"],
                                  args.latency_repeats))
      else:
        row.update(ort_latency(data_bytes, r["images"], args.latency_repeats))
      row["weight_bits"] = layer_bits
      row["seconds"] = round(time.time() - t0, 1)
      out_rows.append(row)
      print(f"   {name} {runtime:11s} acc {row['accuracy']:.2f}% mismatches {row['mismatches']} "
            f"agreement {row['agreement_fake_quant']:.2f}% size {row['size_bytes']:,} B"
            + (f" latency x{row['latency_ratio']:.2f} of float" if "latency_ratio" in row else
               f" latency {row['latency_ms']:.3f} ms"), flush=True)
  return out_rows


def table(rows) -> str:
  lines = ["| row | runtime | file size (float .tflite) | accuracy (%) | fake-quant (%) | "
           "mismatches | agreement (%) | latency vs float |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    size = f"{r['size_bytes']:,} B"
    if "float_tflite_bytes" in r:
      size += f" ({r['float_tflite_bytes']:,} B)"
    lat = f"{r['latency_ratio']:.2f}x" if "latency_ratio" in r else f"{r['latency_ms']:.3f} ms"
    lines.append(f"| {r['name']} | {r['runtime']} | {size} | {r['accuracy']:.2f} | "
                 f"{r['fake_quant_accuracy']:.2f} | {r['mismatches']} of {r['outputs_compared']:,}"
                 f" | {r['agreement_fake_quant']:.2f} | {lat} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  integer.add_row_args(p)
  p.add_argument("--rows", default=",".join(r for r in ROWS if r.startswith("cnn")),
                 help="comma-separated subset of " + ",".join(ROWS))
  p.add_argument("--num_examples", type=int, default=10_000)
  p.add_argument("--latency_repeats", type=int, default=300)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "deploy.json"))
  args = p.parse_args(argv)
  names = cli.select_rows(args.rows, ROWS)
  from mpq.export import onnx_builder, tflite_builder  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  rows = []
  for name in names:
    print(f"== {name}", flush=True)
    rows += run_row(name, args)
  command = ("python benchmarks/deploy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
  out = {"dataset": "fashion_mnist", "rows": rows, "command": command.strip(),
         "runtimes": {"ai-edge-litert": tflite_builder.litert_version(),
                      "onnxruntime": onnx_builder.ort_version()},
         "cpu": f"{os.cpu_count()} cores", "cpu_flags": ort_rules.cpu_flags(),
         "seconds": round(time.time() - t0, 1)}
  if os.path.exists(args.out):  # keep rows of earlier runs that this run did not redo
    with open(args.out, encoding="utf-8") as f:
      old = json.load(f)
    done = {r["name"] for r in rows}
    out["rows"] = [r for r in old.get("rows", []) if r["name"] not in done] + rows
    out["rows"].sort(key=lambda r: (ROWS.index(r["name"]), r["target"], r["runtime"]))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=2)
  print(table(out["rows"]))
  bad = [r for r in out["rows"] if r["mismatches"]]
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
