"""Trains a model: `python train.py --config=configs/fmnist_cnn.py --workdir=DIR [--config.KEY=V]`.

Re-running the same command on the same workdir resumes from the newest checkpoint. A resumed run
keeps its config: fields other than the schedule's length (extended only), logging, checkpointing,
eval_batch_size and data_dir may not change unless --allow_config_change is given (recorded in
WORKDIR/config_history.jsonl). One run at a time owns a workdir. Ctrl-C (or SIGTERM) saves a
checkpoint at the current step and exits 130 (143).
"""

from absl import app, flags
from ml_collections import config_flags

from mpq import cli
from mpq.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.DEFINE_bool("progress", None, "Progress bar (default: when stderr is a terminal).")
flags.DEFINE_bool("allow_config_change", False, "Resume a run with a config that differs from its "
                  "saved one in fields that may not change otherwise (recorded in "
                  "config_history.jsonl).")


@cli.guarded
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
  if FLAGS.config is None:
    raise UserError("--config is required, e.g. --config=configs/fmnist_cnn.py")
  if not FLAGS.workdir:
    raise UserError("--workdir is required: the directory for checkpoints and logs")
  from mpq.experiment import train_and_evaluate  # pylint: disable=g-import-not-at-top
  result = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                              allow_config_change=FLAGS.allow_config_change)
  print(f"final: step {result['step']}  test accuracy {100 * result['accuracy']:.2f}%  "
        f"loss {result['loss']:.4f}  ({result['num_examples']} examples)")


if __name__ == "__main__":
  cli.quiet_jax_logs()
  app.run(main, flags_parser=cli.parse_flags)
