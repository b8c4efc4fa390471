"""A workdir is owned by one run, a resumed run is the same run, and bad paths are one-line errors
(issue 18). Most tests run the command-line programs, since the behaviour is theirs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_cli, snapshot as _snapshot
from mpq import workdir as workdir_lib
from mpq.errors import UserError

TINY = ["train.py", "--config=configs/tiny.py"]
QAT = ["--config.quant.enabled=True", "--config.quant.w_bits=4", "--config.quant.a_bits=4"]


def _one_line_error(r, pattern, code=2):
  assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert re.search(pattern, lines[0]), lines[0]


def _steps(wd):
  return sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
  """A finished W4A4 run of 16 steps (checkpoints at 8 and 16)."""
  wd = str(tmp_path_factory.mktemp("qat") / "w")
  r = run_cli(*TINY, f"--workdir={wd}", *QAT, "--config.num_train_steps=16",
              "--config.checkpoint_every=8", "--config.eval_every=8", "--config.log_every=8")
  assert r.returncode == 0, r.stderr
  return wd


# -- 1. a resumed run is the same run


@pytest.mark.parametrize("args,fields", [
    (["--config.quant.w_bits=8", "--config.quant.a_bits=8"], ["quant.a_bits 4 -> 8",
                                                              "quant.w_bits 4 -> 8"]),
    (["--config.seed=1"], ["seed 0 -> 1"]),
    (["--config.learning_rate=0.01"], ["learning_rate 0.003 -> 0.01"]),
    (["--config.num_train_steps=12"], ["num_train_steps 16 -> 12", "schedule would shrink"]),
    (["--config.batch_size=100000"], ["batch_size 64 -> 100000"]),  # a failed start writes nothing
])
def test_resume_refuses_a_different_config_and_writes_nothing(qat_run, args, fields):
  before = _snapshot(qat_run)
  r = run_cli(*TINY, f"--workdir={qat_run}", *QAT, "--config.num_train_steps=16",
              "--config.checkpoint_every=8", "--config.eval_every=8", "--config.log_every=8", *args)
  _one_line_error(r, "holds a run with a different config")
  for f in fields:
    assert f in r.stderr, r.stderr
  assert "--allow_config_change" in r.stderr
  assert _snapshot(qat_run) == before


def test_resume_allows_listed_changes_and_records_forced_ones(qat_run, tmp_path):
  wd = str(tmp_path / "w")
  shutil.copytree(qat_run, wd)
  common = [*TINY, f"--workdir={wd}", *QAT, "--config.checkpoint_every=8", "--config.eval_every=8"]
  # extending the schedule and logging more often: allowed, with a note on the cosine decay
  r = run_cli(*common, "--config.num_train_steps=24", "--config.log_every=4")
  assert r.returncode == 0, r.stderr
  assert "num_train_steps 16 -> 24" in r.stdout and "reshapes the learning-rate decay" in r.stdout
  assert _steps(wd)[-1] == 24
  saved = json.load(open(os.path.join(wd, "config.json")))
  assert saved["num_train_steps"] == 24 and saved["quant"]["w_bits"] == 4
  # a changed seed needs --allow_config_change, which is recorded
  r = run_cli(*common, "--config.num_train_steps=32", "--config.log_every=4", "--config.seed=5",
              "--allow_config_change")
  assert r.returncode == 0, r.stderr
  history = [json.loads(l) for l in open(os.path.join(wd, "config_history.jsonl"))]
  assert [h["event"] for h in history] == ["start", "resume", "resume"]
  assert [h["step"] for h in history] == [0, 16, 24]
  assert history[1]["changes"] == {"log_every": [8, 4], "num_train_steps": [16, 24]}
  assert not history[1]["allow_config_change"]
  assert history[2]["changes"] == {"num_train_steps": [24, 32], "seed": [0, 5]}
  assert history[2]["allow_config_change"]
  assert json.load(open(os.path.join(wd, "config.json")))["seed"] == 5


def test_differences_are_json_normalised_and_ignore_removed_fields():
  saved = {"a": [1, 2], "q": {"bits": 4, "gone": 1}, "lr": 0.1}
  new = {"a": (1, 2), "q": {"bits": 8, "added": 3}, "lr": 0.1}
  assert workdir_lib.differences(saved, new) == {"q.bits": (4, 8)}
  with pytest.raises(UserError, match="q.bits 4 -> 8"):
    workdir_lib.resume_changes("W", saved, new, 10, 10, allow=False)
  assert workdir_lib.resume_changes("W", saved, new, 10, 10, allow=True) == {"q.bits": (4, 8)}
  ok = {"a": [1, 2], "q": {"bits": 4}, "lr": 0.1, "num_train_steps": 20}
  assert workdir_lib.resume_changes("W", {**saved, "num_train_steps": 10}, ok, 10, 20, False) == {
      "num_train_steps": (10, 20)}


# -- 2. failed starts leave nothing behind


def test_failed_start_on_a_new_workdir_leaves_no_directory(tmp_path):
  wd = tmp_path / "a" / "b" / "w"
  r = run_cli(*TINY, f"--workdir={wd}", "--config.init_from=/nonexistent_run")
  _one_line_error(r, "no checkpoint in /nonexistent_run")
  assert os.listdir(tmp_path) == []


# -- 3. the lock


def test_a_workdir_in_use_is_refused_and_a_killed_owner_does_not_block(qat_run):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from mpq.workdir import Lock; "
       f"l = Lock({qat_run!r}).__enter__(); print('locked', flush=True); time.sleep(600)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(qat_run)
    r = run_cli(*TINY, f"--workdir={qat_run}", *QAT, "--config.num_train_steps=16",
                "--config.checkpoint_every=8", "--config.eval_every=8", "--config.log_every=8")
    _one_line_error(r, rf"workdir {re.escape(qat_run)} is in use by another run \(pid "
                       rf"{holder.pid} on ")
    assert _snapshot(qat_run) == before
  finally:
    holder.send_signal(signal.SIGKILL)  # its lock file stays, its flock goes with the process
    holder.wait()
  assert os.path.exists(os.path.join(qat_run, workdir_lib.LOCK))
  with workdir_lib.Lock(qat_run):
    pass
  assert not os.path.exists(os.path.join(qat_run, workdir_lib.LOCK))


def test_lock_is_taken_by_process_zero_only(tmp_path):
  with workdir_lib.Lock(str(tmp_path)):
    with pytest.raises(UserError, match="in use by another run"):
      workdir_lib.Lock(str(tmp_path)).__enter__()
    with workdir_lib.Lock(str(tmp_path), active=False):  # another host of a multi-host run
      pass


# -- 4. paths


def test_output_paths_are_checked_up_front(qat_run, tmp_path):
  afile = tmp_path / "file"
  afile.write_text("x")
  _one_line_error(run_cli(*TINY, f"--workdir={afile}"), "is a file, not a directory")
  _one_line_error(run_cli(*TINY, f"--workdir={afile}/sub"), "is a file, so this path cannot be")
  assert afile.read_text() == "x"
  _one_line_error(run_cli("eval.py", f"--workdir={qat_run}", f"--json={tmp_path}"),
                  "--json=.* is a directory")
  _one_line_error(run_cli("eval.py", f"--workdir={qat_run}", f"--export_bits={tmp_path}"),
                  "--export_bits=.* is a directory")
  _one_line_error(run_cli("eval.py", f"--workdir={qat_run}", f"--export={afile}"),
                  "is a file")
  assert afile.read_text() == "x"


def test_read_only_paths_are_refused(tmp_path, monkeypatch):
  # Tests may run as root, for whom every path is writable: os.access stands in for permissions.
  ro = str(tmp_path / "ro")
  os.mkdir(ro)
  real = os.access
  monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(ro) else real(p, m))
  with pytest.raises(UserError, match="--workdir=.*/ro is not writable"):
    workdir_lib.check_dir(ro)
  with pytest.raises(UserError, match="cannot create it, .*/ro is not writable"):
    workdir_lib.check_dir(os.path.join(ro, "new"))
  with pytest.raises(UserError, match="--json=.*cannot create it"):
    workdir_lib.check_file(os.path.join(ro, "r.json"), "--json")


def test_remaining_os_errors_are_one_line(tmp_path):
  script = ("import sys; from absl import app, flags; from mpq import cli\n"
            "def main(argv):\n"
            f"  open({str(tmp_path / 'missing' / 'x')!r}, 'w')\n"
            "app.run(cli.guarded(main), flags_parser=cli.parse_flags)\n")
  r = run_cli("-c", script)
  _one_line_error(r, rf"error: {re.escape(str(tmp_path))}/missing/x: No such file or directory")


# -- 5./6. exported models (the checks themselves: tests/test_export_validation.py)


def test_eval_of_a_broken_export_is_one_line(qat_run, tmp_path):
  out = str(tmp_path / "int")
  r = run_cli("eval.py", f"--workdir={qat_run}", f"--export={out}")
  assert r.returncode == 0, r.stderr
  m = json.load(open(os.path.join(out, "manifest.json")))
  m["ops"][0]["scale"] = float("nan")
  with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(m, f)
  _one_line_error(run_cli("eval.py", f"--model={out}", "--mode=int"), "scale")
  with open(os.path.join(out, "weights.npz"), "r+b") as f:
    f.truncate(100)
  _one_line_error(run_cli("eval.py", f"--model={out}", "--mode=int"), r"not a valid \.npz")


def test_export_refuses_a_directory_of_other_files(qat_run, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "manifest.json").write_text('{"my": "own file"}')
  _one_line_error(run_cli("eval.py", f"--workdir={qat_run}", f"--export={out}"), str(out))
  assert (out / "manifest.json").read_text() == '{"my": "own file"}'


# -- 7. a named data location is used or rejected


def test_named_data_directory_is_never_skipped(tmp_path):
  r = run_cli(*TINY, f"--workdir={tmp_path}/w", env={"MPQ_FASHION_MNIST_DIR": str(tmp_path)})
  _one_line_error(r, r"Fashion-MNIST not found in .* \(\$MPQ_FASHION_MNIST_DIR\): it lacks")
  assert not os.path.exists(tmp_path / "w")


# -- 8. interrupts, and the smaller items


def _train_until(args, wd, step, sig):
  """Starts a run, sends `sig` once it logged `step`, returns (returncode, stderr)."""
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  path = os.path.join(wd, "metrics.jsonl")
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(json.loads(l)["step"] >= step for l in open(path)
                                    if l.endswith("\n")):
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=240)
  return proc.returncode, err


def _params(wd):
  import jax
  from flax import nnx
  from mpq.train.loop import load_model
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(load_model(wd)[0], nnx.Param))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def test_interrupts_and_kills_resume_to_the_uninterrupted_result(tmp_path):
  """SIGINT, then SIGTERM (each saves at its step and exits 130/143 with one line), then SIGKILL
  (nothing saved: the next run resumes from the SIGTERM checkpoint and drops the metrics the killed
  run logged after it): the final parameters equal an uninterrupted run's bit for bit."""
  flags = ["--config.num_train_steps=48", "--config.checkpoint_every=48", "--config.log_every=2",
           "--config.eval_every=48"]
  ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
  assert run_cli(*TINY, f"--workdir={ref}", *flags).returncode == 0
  args = [*TINY, f"--workdir={cut}", *flags]
  code, err = _train_until(args, cut, 4, signal.SIGINT)
  assert code == 130, err
  m = re.fullmatch(r"interrupted at step (\d+); checkpoint saved; re-run the same command to "
                   r"resume", err.strip().splitlines()[-1])
  assert m, err
  first = int(m.group(1))
  assert "Traceback" not in err and 4 <= first < 48 and _steps(cut) == [first]
  code, err = _train_until(args, cut, first + 4, signal.SIGTERM)
  assert code == 143, err
  second = int(re.search(r"interrupted at step (\d+)", err).group(1))
  assert first < second < 40 and _steps(cut)[-1] == second
  code, _ = _train_until(args, cut, second + 4, signal.SIGKILL)
  assert code == -signal.SIGKILL and _steps(cut)[-1] == second
  r = run_cli(*args)
  assert r.returncode == 0, r.stderr
  assert f"resuming from step {second}" in r.stdout
  a, b = _params(ref), _params(cut)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # metrics: every step once (the interrupted steps also logged what they had trained)
  rows = lambda wd: [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  keys = [(r["step"], r["split"]) for r in rows(cut)]
  assert len(keys) == len(set(keys)) and [k[0] for k in keys] == sorted(k[0] for k in keys)
  assert set(keys) - {(r["step"], r["split"]) for r in rows(ref)} <= {(first, "train"),
                                                                     (second, "train")}
  assert rows(cut)[-1] == rows(ref)[-1]  # the final evaluation


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
  from mpq.train import metrics
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in (2, 4, 6, 8)]
  path.write_text("\n".join(lines) + "\n" + '{"step": 10, "spl')  # a kill mid-line
  metrics._truncate(str(path), 4)
  assert path.read_text() == "\n".join(lines[:2]) + "\n"


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(qat_run, tmp_path):
  wd = str(tmp_path / "w")
  shutil.copytree(qat_run, wd)  # checkpoints 8 and 16
  flags = [*QAT, "--config.checkpoint_every=8", "--config.eval_every=8", "--config.log_every=8"]
  for root, _, files in os.walk(os.path.join(wd, "checkpoints", "16", "state")):
    for f in files:
      if "ocdbt.process_0" in root:
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(10)
  r = run_cli(*TINY, f"--workdir={wd}", "--config.num_train_steps=24", *flags)
  assert r.returncode == 0, r.stderr
  assert re.search(r"warning: checkpoint .*/checkpoints/16 is unreadable .*resuming from step 8",
                   r.stdout), r.stdout
  assert _steps(wd) == [8, 16, 24]  # 16 retrained
  assert os.listdir(os.path.join(wd, "corrupt")) == ["checkpoints-16"]
