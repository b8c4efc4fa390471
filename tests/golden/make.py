"""Writes the golden checkpoints and outputs that `tests/test_golden.py` compares against.

It was run once at 9cd5ac0, before the architecture change of issue 14, to pin today's numerics:

    .venv/bin/python tests/golden/make.py

It trains configs/tiny.py in float (64 steps; `float/`), then 24 QAT steps from that checkpoint
with a different estimator on every layer (`RULES`: ste, tqt, lsq, noise, dbits at 2-8 bits;
`qat/`), and writes for the first 64 test images the fake-quant logits, the float (bypassed) logits
and the integer executor's logits (`logits.npz`), and the quantizer parameters that a W4A4 PTQ
calibration (mse/mse) of the float checkpoint finds (`calibration.npz`). Re-running it replaces
the reference: do that only for an intended numerics change, and say so in the commit.
"""

import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

RULES = (("conv1", {"w_bits": 8, "a_bits": 8, "estimator": "ste"}),
         ("conv2", {"w_bits": 4, "a_bits": 6, "estimator": "tqt"}),
         ("conv3", {"w_bits": 3, "a_bits": 4, "estimator": "lsq"}),
         ("fc1", {"w_bits": 2, "a_bits": 5, "estimator": "noise"}),
         ("head", {"w_bits": 6, "a_bits": 8, "estimator": "dbits"}))
NUM_IMAGES = 64
PTQ = {"w_bits": 4, "a_bits": 4, "calib_act": "mse", "calib_weight": "mse", "estimator": "lsq"}


def main():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from configs import tiny
  from mpq import data as data_lib, export, intexec
  from mpq.experiment import train_and_evaluate
  from mpq.train import loop
  from mpq.train import checkpoint as ckpt_lib
  tmp = tempfile.mkdtemp(prefix="mpq_golden_")
  float_dir, qat_dir = os.path.join(tmp, "float"), os.path.join(tmp, "qat")
  train_and_evaluate(tiny.get_config(), float_dir, progress=False)
  c = tiny.get_config()
  c.quant.enabled, c.quant.rules, c.init_from = True, RULES, float_dir
  c.num_train_steps = c.eval_every = c.checkpoint_every = 24
  train_and_evaluate(c, qat_dir, progress=False)
  for name, src in (("float", float_dir), ("qat", qat_dir)):
    shutil.rmtree(os.path.join(HERE, name), ignore_errors=True)
    shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(HERE, name, "checkpoints"))
  # fake-quant, float (bypassed) and integer logits of the committed QAT checkpoint
  workdir = os.path.join(HERE, "qat")
  directory, meta, config, data = loop._checkpoint_config(workdir, None, "latest", None)
  x = np.asarray(next(iter(data_lib.eval_batches(data, NUM_IMAGES)))["image"])
  out = {}
  for mode, bypass in (("fake_quant", False), ("float", True)):
    graphdef, state, _, _ = loop._restored(workdir, config, data, directory, meta["step"], None,
                                           bypass=bypass)
    model = nnx.merge(graphdef, state.params, state.rest)
    out[mode] = np.asarray(model(jnp.asarray(x), train=False))
    if mode == "fake_quant":
      d = os.path.join(tmp, "int")
      export.export(model, data.image_shape, d)
      run, _, _ = intexec.build(*export.load(d))
      out["int"] = np.asarray(run(x))
  np.savez(os.path.join(HERE, "logits.npz"), images=x, **out)
  # PTQ calibration of the committed float checkpoint
  model, _, _, _ = loop.load_model(os.path.join(HERE, "float"), ptq=dict(PTQ))
  params = nnx.state(model, nnx.Param)
  cal = {k: np.asarray(v) for k, v in ckpt_lib.flatten(params).items() if ".wq." in k or ".aq" in k}
  np.savez(os.path.join(HERE, "calibration.npz"), **cal)
  shutil.rmtree(tmp)
  print({k: v.shape for k, v in out.items()}, sorted(cal))


if __name__ == "__main__":
  main()
