"""Evaluates a checkpoint.

  python eval.py --workdir=DIR [--step=N | --which=best] [--json=PATH] [--mode=float|fake_quant]
  python eval.py --workdir=FLOAT_DIR --ptq [--w_bits=8 --a_bits=8 --calib_act=percentile]
  python eval.py --workdir=QAT_DIR --mode=int [--export=OUT] [--compare]   (or FLOAT_DIR --ptq)
  python eval.py --workdir=QAT_DIR --export=OUT --target=tflite  (OUT/model.tflite + mpq manifest)
  python eval.py --workdir=QAT_DIR --export=OUT --target=onnx    (OUT/model.onnx + mpq manifest)
  python eval.py --model=OUT --mode=int [--emulate=litert-ruy]  (an exported model alone, in mpq's
                                                               executor, emulating a kernel family)
  python eval.py --model=OUT --runtime=litert-ref|ort           (the file in the real runtime,
                                                               compared with mpq's emulation)
  [--num_examples=N] [--save_outputs=F.npz] with --mode=int or --runtime
"""

import json
import os

import numpy as np
from absl import app, flags

from mpq import cli
from mpq.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Recent checkpoints or the best one.")
flags.DEFINE_string("json", None, "Write the results as JSON to this path.")
flags.DEFINE_string("data_dir", None, "Override the dataset location stored in the checkpoint.")
flags.DEFINE_enum("mode", "auto", ["auto", "float", "fake_quant", "int"],
                  "auto: fake_quant for QAT checkpoints (and --ptq), float otherwise; float on a QAT "
                  "checkpoint bypasses its quantizers; int runs the exported integer model.")
flags.DEFINE_string("export", None, "Export the (QAT) checkpoint as an integer model to this dir.")
flags.DEFINE_string("model", None, "Evaluate an exported integer model dir (with --mode=int).")
flags.DEFINE_bool("compare", False, "Print a layer-by-layer fake-quant vs integer comparison.")
flags.DEFINE_bool("ptq", False, "Post-training quantization: calibrate a float checkpoint on training "
                  "batches and evaluate it fake-quantized.")
flags.DEFINE_string("export_bits", None, "Write the checkpoint's per-layer bit assignment (JSON).")
flags.DEFINE_integer("w_bits", 8, "--ptq: weight bits.")
flags.DEFINE_integer("a_bits", 8, "--ptq: activation bits.")
flags.DEFINE_string("calib_act", "percentile", "--ptq: max, percentile, mse or entropy.")
flags.DEFINE_string("calib_weight", "mse", "--ptq: max or mse (per channel).")
flags.DEFINE_string("target", "mpq", "--export: the export target, mpq (manifest.json + "
                    "weights.npz), tflite (model.tflite and the mpq manifest of the same model) or "
                    "onnx (model.onnx and the mpq manifest).")
flags.DEFINE_string("emulate", None, "--mode=int: the kernel family mpq's executor emulates (mpq; "
                    "litert-ref, litert-ruy, litert-auto for tflite exports; ort for onnx "
                    "exports); default: the exported manifest's (mpq, litert-ref or ort).")
flags.DEFINE_string("runtime", None, "Run the exported file in a real runtime (litert-ref, "
                    "litert-ruy, litert-auto for .tflite; ort for .onnx; needs the deploy extra) "
                    "and compare it with mpq's emulation of that path.")
flags.DEFINE_integer("num_examples", None, "Evaluate the first N test images only.")
flags.DEFINE_string("save_outputs", None, "--mode=int / --runtime: write images (what the file "
                    "takes), outputs (what it produces) and labels to this .npz, in test order.")
flags.DEFINE_enum("tflite_weights", None, ["compact", "exact"], "--target=tflite: compact "
                  "(default: weights of 2-4 bits as INT2/INT4 tensors) or exact (int8 weights "
                  "scaled by 2^k so that LiteRT's fixed-point requantization rounds more exactly; "
                  "see the README).")
flags.DEFINE_integer("calib_examples", 1000, "--export to a target with integer logits: training "
                     "images that calibrate the output grid.")


def table(rows):
  """Formats [(name, value), ...] as a two-column text table."""
  w = max(len(k) for k, _ in rows)
  lines = [f"{'metric':<{w}}  value", f"{'-' * w}  {'-' * 12}"]
  lines += [f"{k:<{w}}  {v}" for k, v in rows]
  return "\n".join(lines)


@cli.guarded
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  _check_outputs(FLAGS)
  if FLAGS.model or FLAGS.export or FLAGS.mode == "int" or FLAGS.compare or FLAGS.runtime:
    return _integer(FLAGS)
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the directory of a training run")
  from mpq.experiment import evaluate_run  # pylint: disable=g-import-not-at-top
  overrides = {"data_dir": FLAGS.data_dir} if FLAGS.data_dir else None
  r = evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.which, overrides, FLAGS.mode, _ptq(FLAGS))
  mode = r["mode"] + (f" (as {r['target']} computes it: config.quant.target)" if "target" in r
                      else "")
  rows = [("workdir", FLAGS.workdir), ("step", r["step"]), ("mode", mode),
          ("model", r["config"]["model"]), ("dataset", r["config"]["dataset"]),
          ("examples", r["num_examples"]), ("accuracy", f"{100 * r['accuracy']:.2f}%"),
          ("loss", f"{r['loss']:.4f}")]
  if "fake_quant_accuracy" in r:
    rows.append(("fake-quant acc.", f"{100 * r['fake_quant_accuracy']:.2f}%"))
  print(table(rows))
  if FLAGS.export_bits:
    if "bits" not in r:
      raise UserError(f"{FLAGS.workdir} holds a float model: there is no bit assignment to export")
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.export_bits)), exist_ok=True)
    with open(FLAGS.export_bits, "w", encoding="utf-8") as f:
      json.dump(r["bits"], f, indent=2)
  if FLAGS.json:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(r, f, indent=2)


def _check_outputs(F):
  """Every output path's kind and writability, before any work."""
  from mpq import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if F.num_examples is not None and F.num_examples < 1:
    raise UserError(f"--num_examples={F.num_examples} must be at least 1")
  from mpq.export import targets  # pylint: disable=g-import-not-at-top
  targets.get(F.target)  # a one-line error for an unknown target
  for flag, kind in (("emulate", "emulations"), ("runtime", "runtimes")):
    name = getattr(F, flag)
    known = sorted({n for t in targets.TARGETS.values() for n in getattr(t, kind)})
    if name is not None and name not in known:
      raise UserError(f"--{flag}={name} is unknown; use one of {', '.join(known)}")
  if F.target != "mpq" and not F.export:
    raise UserError(f"--target={F.target} names the format of an export: use it with --export=OUT")
  if F.tflite_weights and F.target != "tflite":
    raise UserError("--tflite_weights is an option of --target=tflite")
  if F.save_outputs and F.mode != "int" and not F.runtime and not F.model:
    raise UserError("--save_outputs writes what an exported model produces: use it with "
                    "--mode=int or --runtime")
  for flag in ("json", "export_bits", "save_outputs"):
    if getattr(F, flag):
      workdir_lib.check_file(getattr(F, flag), f"--{flag}")
  if F.export:
    from mpq.export import check_out_dir  # pylint: disable=g-import-not-at-top
    check_out_dir(F.export)


def _ptq(F):
  """The `config.quant` overrides of --ptq, or None."""
  if not F.ptq:
    return None
  return {"w_bits": F.w_bits, "a_bits": F.a_bits, "calib_act": F.calib_act,
          "calib_weight": F.calib_weight, "estimator": "lsq"}


def _run_target(F, config) -> str:
  """The export target: --target, or for a run with config.quant.target (and no --target) the
  target whose files that kernel family runs."""
  from mpq.export import targets  # pylint: disable=g-import-not-at-top
  family = config.quant.target
  if F["target"].present or not family or F.ptq:
    return F.target
  return targets.for_emulation(family).name


def _integer(F):
  """--export, --mode=int (from --workdir or --model) and --compare."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib, export  # pylint: disable=g-import-not-at-top
  from mpq.export.evaluate import (  # pylint: disable=g-import-not-at-top
      calibration_images, evaluate_int)
  from mpq.train.loop import load_model  # pylint: disable=g-import-not-at-top
  if F.model and F.workdir:
    raise UserError("pass --workdir (a checkpoint) or --model (an exported dir), not both")
  fq_model, result = None, {}
  if F.model:
    if F.mode not in ("int", "auto") or F.export:
      raise UserError("--model evaluates an exported integer model: use it with --mode=int or "
                      "--runtime only")
    manifest, tensors = export.load(F.model)
    src = manifest.get("source", {})
    data = data_lib.load(src.get("dataset", "fashion_mnist"), F.data_dir or src.get("data_dir") or None,
                         None, src.get("num_test_examples") or None,
                         src.get("input_norm", "channel"))
    export.check_input(manifest, data.image_shape, F.model)
    model_dir = F.model
  else:
    if not F.workdir:
      raise UserError("--workdir is required: the directory of a QAT training run")
    overrides = {"data_dir": F.data_dir} if F.data_dir else None
    fq_model, config, data, step = load_model(F.workdir, F.step, F.which, overrides, _ptq(F))
    if not config.quant.enabled:
      raise UserError(f"{F.workdir} holds a float model; integer export needs a QAT checkpoint, "
                      "or --ptq to calibrate this one")
    model_dir = F.export or tempfile.mkdtemp(prefix="mpq_int_")
    target = _run_target(F, config)
    calib = None
    if export.TARGETS[target].output_dtype:
      calib = calibration_images(data, F.calib_examples)
    family = config.quant.target if not F.ptq else ""
    export.export(fq_model, data.image_shape, model_dir,
                  {"dataset": config.dataset, "data_dir": config.data_dir,
                   "num_test_examples": config.num_test_examples, "model": config.model,
                   "input_norm": config.input_norm,
                   "workdir": os.path.abspath(F.workdir), "step": step, "ptq": _ptq(F),
                   **({"quant_target": family} if family else {})},
                  target=target, calibration=calib,
                  options={"weights": F.tflite_weights} if F.tflite_weights else None)
    manifest, tensors = export.load(model_dir)
    result["step"] = step
    print(f"exported the integer model to {model_dir}")
  if F.compare:
    if fq_model is None:
      raise UserError("--compare needs --workdir (the fake-quant model to compare against)")
    from mpq.export.compare import compare  # pylint: disable=g-import-not-at-top
    batch = next(iter(data_lib.eval_batches(data, 256)))
    rows = compare(fq_model, manifest, tensors, batch["image"])
    result["compare"] = rows
    tie = lambda r: ("" if r["near_tie"] is None else
                     f" ({100 * r['near_tie']:.0f}% of them at float32 rounding ties)")
    print(table([(r["layer"], f"max {r['max_lsb']:.0f} LSB, mean {r['mean_lsb']:.4f}, "
                  f"{100 * r['mismatch']:.2f}% differ{tie(r)}") for r in rows]))
  if F.runtime:
    from mpq.export.evaluate import evaluate_runtime  # pylint: disable=g-import-not-at-top
    r = evaluate_runtime(model_dir, manifest, tensors, data, F.runtime, F.num_examples,
                         keep_outputs=bool(F.save_outputs))
    _save_outputs(F, r)
    result.update(r, model=model_dir)
    print(table([("model", model_dir), ("runtime", F.runtime), ("examples", r["num_examples"]),
                 ("accuracy", f"{100 * r['accuracy']:.2f}%"),
                 ("emulation acc.", f"{100 * r['emulation_accuracy']:.2f}%"),
                 ("agreement", f"{100 * r['agreement_with_emulation']:.2f}% of top-1 with mpq's "
                  f"emulation of {F.runtime}"),
                 ("mismatches", f"{r['mismatches']} output values in {r['mismatched_examples']} "
                  "images")]))
  elif F.mode == "int" or F.model:
    r = evaluate_int(manifest, tensors, data, fq_model=fq_model, num_examples=F.num_examples,
                     emulate=F.emulate, model_dir=model_dir, keep_outputs=bool(F.save_outputs))
    _save_outputs(F, r)
    result.update(r, model=model_dir)
    rows = [("model", model_dir), ("mode", "int"), ("emulate", r["emulate"]),
            ("examples", r["num_examples"])]
    if fq_model is not None:  # float, fake-quant and integer accuracy side by side
      from mpq.train import evaluate_checkpoint  # pylint: disable=g-import-not-at-top
      fl = evaluate_checkpoint(F.workdir, F.step, F.which, overrides, "float")
      result["float_accuracy"] = fl["accuracy"]
      rows += [("float accuracy", f"{100 * fl['accuracy']:.2f}%"),
               ("fake-quant acc.", f"{100 * r['fake_quant_accuracy']:.2f}%")]
    rows += [("int accuracy", f"{100 * r['accuracy']:.2f}%"), ("int loss", f"{r['loss']:.4f}")]
    if "agreement_with_fake_quant" in r:
      rows += [("agreement", f"{100 * r['agreement_with_fake_quant']:.2f}%"),
               ("max logit diff", f"{r['max_logit_lsb_diff']:.1f} LSB")]
    print(table(rows))
  if F.json and (F.runtime or F.mode == "int" or F.model):
    os.makedirs(os.path.dirname(os.path.abspath(F.json)), exist_ok=True)
    with open(F.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


def _save_outputs(F, r: dict) -> None:
  """--save_outputs: `images`, `outputs`, `labels` of `r` (removed from it) to an .npz."""
  arrays = {k: r.pop(k) for k in ("images", "outputs", "labels") if k in r}
  if F.save_outputs:
    import io  # pylint: disable=g-import-not-at-top
    from mpq.workdir import write_atomic  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    os.makedirs(os.path.dirname(os.path.abspath(F.save_outputs)), exist_ok=True)
    write_atomic(F.save_outputs, buf.getvalue())
    print(f"wrote {', '.join(arrays)} to {F.save_outputs}")


if __name__ == "__main__":
  cli.quiet_jax_logs()
  app.run(main, flags_parser=cli.parse_flags)
