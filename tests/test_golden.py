"""Numerics guard for structural changes: committed checkpoints of the tiny CNN (written by
`tests/golden/make.py` at 9cd5ac0, before the architecture change of issue 14) must give the
committed outputs exactly.

  qat/     24 QAT steps with five estimators (ste, tqt, lsq, noise, dbits) at 2-8 bits: its
           fake-quant, float (bypassed quantizers) and integer-executor logits
  float/   the float checkpoint: the quantizer parameters a W4A4 PTQ calibration (mse) finds
"""

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
PTQ = {"w_bits": 4, "a_bits": 4, "calib_act": "mse", "calib_weight": "mse", "estimator": "lsq"}


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(os.path.join(HERE, "logits.npz")))


def _copy(name, tmp_path):
  """A writable copy of a golden workdir (orbax may touch the directory it reads)."""
  dst = tmp_path / name
  shutil.copytree(os.path.join(HERE, name), dst)
  return str(dst)


def _model(workdir, bypass=False):
  from mpq.train import loop
  directory, meta, config, data = loop._checkpoint_config(workdir, None, "latest", None)
  graphdef, state, _, _ = loop._restored(workdir, config, data, directory, meta["step"], None,
                                         bypass=bypass)
  return nnx.merge(graphdef, state.params, state.rest), data


@pytest.mark.parametrize("mode", ["fake_quant", "float"])
def test_golden_logits(golden, mode, tmp_path):
  model, _ = _model(_copy("qat", tmp_path), bypass=mode == "float")
  got = np.asarray(model(jnp.asarray(golden["images"]), train=False))
  np.testing.assert_array_equal(got, golden[mode])


def test_golden_integer_logits(golden, tmp_path):
  from mpq import export, intexec
  model, data = _model(_copy("qat", tmp_path))
  export.export(model, data.image_shape, str(tmp_path / "int"))
  run, _, _ = intexec.build(*export.load(str(tmp_path / "int")))
  np.testing.assert_array_equal(np.asarray(run(golden["images"])), golden["int"])
  np.testing.assert_array_equal(golden["int"], golden["fake_quant"])  # bit for bit


def test_golden_ptq_calibration(tmp_path):
  from mpq.train import checkpoint as ckpt_lib
  from mpq.train import loop
  model, _, _, _ = loop.load_model(_copy("float", tmp_path), ptq=dict(PTQ))
  got = {k: np.asarray(v) for k, v in ckpt_lib.flatten(nnx.state(model, nnx.Param)).items()
         if ".wq." in k or ".aq" in k}
  want = dict(np.load(os.path.join(HERE, "calibration.npz")))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_resuming_a_v1_checkpoint_is_a_one_line_error_naming_the_version(tmp_path):
  """Checkpoint layout v1 (before per-estimator optimizers) evaluates (the tests above) but cannot
  be resumed: the optimizer state differs. The error names the version and what to do."""
  from configs import tiny
  from mpq.errors import UserError
  from mpq.experiment import train_and_evaluate
  import sys
  sys.path.insert(0, HERE)
  from make import RULES
  c = tiny.get_config()
  c.quant.enabled, c.quant.rules = True, RULES
  c.num_train_steps = c.eval_every = c.checkpoint_every = 32
  workdir = _copy("qat", tmp_path)
  with pytest.raises(UserError) as e:
    train_and_evaluate(c, workdir, progress=False)
  text = str(e.value)
  assert "\n" not in text and "layout v1" in text and "init_from" in text, text
