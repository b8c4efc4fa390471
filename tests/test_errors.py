import os
import shutil

import pytest

from conftest import run_cli, snapshot as _snapshot
from mpq import config as config_lib
from mpq.errors import UserError

TINY = ["train.py", "--config=configs/tiny.py"]


def _assert_one_line_error(r, pattern):
  assert r.returncode == 2, (r.returncode, r.stderr)
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "Traceback" not in r.stderr
  import re
  assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("trained") / "w")
  r = run_cli(*TINY, f"--workdir={wd}", "--config.num_train_steps=8")
  assert r.returncode == 0, r.stderr
  return wd


@pytest.mark.parametrize("args,pattern", [
    (["--config.no_such_key=1"], "unknown config key 'no_such_key'"),
    (["--config.batch_size=abc"], "batch_size=abc"),
    (["--config.model=vgg"], "config.model='vgg' is unknown"),
    (["--config.optimizer=lion"], "optimizer='lion'"),
    (["--config.batch_size=-4"], "batch_size=-4 must be positive"),
    (["--config.quant.noise_rng=mt19937"], "noise_rng='mt19937' is unknown; use 'hash' or 'threefry'"),
    (["--config.data_dir=/nonexistent"], "Fashion-MNIST not found in /nonexistent"),
    (["--config.dataset=tfds:no_such_dataset_xyz"], "no_such_dataset_xyz"),
])
def test_bad_train_input_leaves_workdir_intact(trained, args, pattern):
  before = _snapshot(trained)
  r = run_cli(*TINY, f"--workdir={trained}", *args)
  _assert_one_line_error(r, pattern)
  assert _snapshot(trained) == before


def test_weight_freezing_needs_frozen_batchnorm_statistics(tmp_path):
  r = run_cli(*TINY, f"--workdir={tmp_path}/w", "--config.quant.enabled=True",
              "--config.quant.osc_freeze=0.02")
  _assert_one_line_error(r, r"quant.osc_freeze=0.02 needs BatchNorm statistics frozen first; "
                            r"set --config.quant.bn_freeze_step=0")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_missing_config_file(tmp_path):
  r = run_cli("train.py", "--config=configs/nope.py", f"--workdir={tmp_path}/w")
  _assert_one_line_error(r, "cannot load the config file")
  assert not os.path.exists(tmp_path / "w")


def test_eval_missing_and_empty_workdir(tmp_path):
  _assert_one_line_error(run_cli("eval.py", f"--workdir={tmp_path}/none"), "does not exist")
  _assert_one_line_error(run_cli("eval.py", f"--workdir={tmp_path}"), "no checkpoint in")
  _assert_one_line_error(run_cli("eval.py"), "--workdir is required")


def test_eval_unknown_step(trained):
  _assert_one_line_error(run_cli("eval.py", f"--workdir={trained}", "--step=5"),
                         r"no checkpoint for step 5.*available: \[8\]")


def test_corrupt_checkpoint(trained, tmp_path):
  wd = str(tmp_path / "w")
  shutil.copytree(trained, wd)  # one checkpoint (step 8): nothing intact to fall back to
  ckpt = os.path.join(wd, "checkpoints", "8", "state")
  damaged = 0
  for root, _, files in os.walk(ckpt):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 100:
        with open(p, "r+b") as fh:
          fh.truncate(os.path.getsize(p) // 3)
        damaged += 1
  assert damaged
  before = _snapshot(wd)
  _assert_one_line_error(run_cli("eval.py", f"--workdir={wd}"), "corrupt|cannot be restored")
  _assert_one_line_error(run_cli(*TINY, f"--workdir={wd}", "--config.num_train_steps=8"),
                         "corrupt|cannot be restored")
  assert _snapshot(wd) == before


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path):
  wd = str(tmp_path / "w")
  r = run_cli(*TINY, f"--workdir={wd}", "--config.learning_rate=1e30", "--config.optimizer=sgd",
              "--config.log_every=1", "--config.checkpoint_every=1")
  _assert_one_line_error(r, r"loss became (nan|inf|-inf) at step \d+")
  step = int(r.stderr.split("at step ")[1].split(";")[0])
  kept = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert kept and max(kept) == step - 1  # every step before the bad one was saved and is kept


def test_verbose_shows_traceback():
  r = run_cli(*TINY, "--workdir=/tmp/x", "--config.model=vgg", "--verbose")
  assert r.returncode != 0 and "Traceback" in r.stderr


def test_validate_rejects_bad_values(tiny_config):
  tiny_config.log_every = 0
  with pytest.raises(UserError, match="log_every"):
    config_lib.validate(tiny_config)
