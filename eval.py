"""Evaluates a checkpoint.

  python eval.py --workdir=DIR [--step=N | --which=best] [--json=PATH] [--mode=float|fake_quant]
  python eval.py --workdir=FLOAT_DIR --ptq [--w_bits=8 --a_bits=8 --calib_act=percentile]
"""

import json
import os

from absl import app, flags

from mpq import cli
from mpq.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Recent checkpoints or the best one.")
flags.DEFINE_string("json", None, "Write the results as JSON to this path.")
flags.DEFINE_string("data_dir", None, "Override the dataset location stored in the checkpoint.")
flags.DEFINE_enum("mode", "auto", ["auto", "float", "fake_quant"],
                  "auto: fake_quant for QAT checkpoints (and --ptq), float otherwise; float on a QAT "
                  "checkpoint bypasses its quantizers.")
flags.DEFINE_bool("ptq", False, "Post-training quantization: calibrate a float checkpoint on training "
                  "batches and evaluate it fake-quantized.")
flags.DEFINE_string("export_bits", None, "Write the checkpoint's per-layer bit assignment (JSON).")
flags.DEFINE_integer("w_bits", 8, "--ptq: weight bits.")
flags.DEFINE_integer("a_bits", 8, "--ptq: activation bits.")
flags.DEFINE_string("calib_act", "percentile", "--ptq: max, percentile, mse or entropy.")
flags.DEFINE_string("calib_weight", "mse", "--ptq: max or mse (per channel).")


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
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the directory of a training run")
  from mpq.train import evaluate_checkpoint  # pylint: disable=g-import-not-at-top
  overrides = {"data_dir": FLAGS.data_dir} if FLAGS.data_dir else None
  ptq = None
  if FLAGS.ptq:
    ptq = {"w_bits": FLAGS.w_bits, "a_bits": FLAGS.a_bits, "calib_act": FLAGS.calib_act,
           "calib_weight": FLAGS.calib_weight, "estimator": "lsq"}
  r = evaluate_checkpoint(FLAGS.workdir, FLAGS.step, FLAGS.which, overrides, FLAGS.mode, ptq)
  print(table([("workdir", FLAGS.workdir), ("step", r["step"]), ("mode", r["mode"]),
               ("model", r["config"]["model"]), ("dataset", r["config"]["dataset"]),
               ("examples", r["num_examples"]), ("accuracy", f"{100 * r['accuracy']:.2f}%"),
               ("loss", f"{r['loss']:.4f}")]))
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


if __name__ == "__main__":
  cli.quiet_jax_logs()
  app.run(main, flags_parser=cli.parse_flags)
