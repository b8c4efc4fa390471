import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, run_cli
from mpq import data, models
from mpq.experiment import train_and_evaluate
from mpq.train import compile_count, optim, state as st

TINY = ["train.py", "--config=configs/tiny.py"]


def _final_train_loss(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if r["split"] == "train"][-1]


def test_train_step_never_recompiles(tiny_config):
  d = data.load("fashion_mnist", num_train=512, num_test=100)
  m = models.build("cnn", 10, d.image_shape, width=0.25)
  tx = optim.build(tiny_config, 100)
  graphdef, state = st.init_state(m, tx)
  step = jax.jit(st.make_train_step(graphdef, tx), donate_argnums=(0,))
  batches = list(data.iterate(data.train_dataset(d, 32, 0, 6)))
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  after_first = compile_count()
  assert after_first > 0
  losses = []
  for b in batches[1:]:
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  assert compile_count() == after_first
  assert int(state.step) == 6 and np.all(np.isfinite(losses))


def test_tiny_run_learns_and_writes_outputs(tiny_config, tmp_path):
  wd = str(tmp_path / "w")
  r = train_and_evaluate(tiny_config, wd, progress=False)
  assert r["step"] == 64 and r["num_examples"] == 1000
  assert r["accuracy"] > 0.3  # chance is 0.1
  names = set(os.listdir(wd))
  assert {"checkpoints", "best", "metrics.jsonl", "config.json", "tb"} <= names
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tb")))
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["32", "64"]
  # re-running on a finished workdir resumes at the end and trains no further
  r2 = train_and_evaluate(tiny_config, wd, progress=False)
  assert r2["step"] == 64 and r2["accuracy"] == pytest.approx(r["accuracy"])
  out = run_cli("eval.py", f"--workdir={wd}", f"--json={tmp_path / 'e.json'}")
  assert out.returncode == 0, out.stderr
  e = json.load(open(tmp_path / "e.json"))
  assert e["mode"] == "float" and e["step"] == 64 and e["num_examples"] == 1000
  assert e["accuracy"] == pytest.approx(r["accuracy"])
  assert {"accuracy", "loss", "num_examples", "mode", "step", "config"} <= set(e)


def test_two_devices_match_one(tmp_path):
  outs = {}
  for n in (1, 2):
    wd = str(tmp_path / f"d{n}")
    r = run_cli(*TINY, f"--workdir={wd}", "--config.num_train_steps=16",
                env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
    assert r.returncode == 0, r.stderr
    outs[n] = _final_train_loss(wd)["loss"]
  assert outs[2] == pytest.approx(outs[1], rel=1e-4)
  r = run_cli("-c", "import jax; print(jax.device_count())",
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert r.stdout.strip() == "2"
