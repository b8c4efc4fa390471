"""The peer row of the accuracy benchmark: google/qwix int8 QAT on the same model and recipe.

qwix (the `bench` extra: `pip install -e '.[bench]'`) intercepts `lax.conv_general_dilated` and
`dot_general` in the model's `__call__` through `qwix.quantize_model(model, qwix.QtProvider(rules),
*sample_inputs)`: int8 weights (per-channel absmax) and int8 activations (dynamic per-batch absmax),
straight-through gradients. The float mpq model is initialised from the same fp32 checkpoint and
trained with the same optimizer, schedule, data order and step count as the mpq QAT rows; BatchNorm
stays a separate float op (qwix does not fold it). Verified with qwix 0.1.8: int8 runs on XLA CPU,
int4 convolutions do not ("custom element sizes on non-sub-byte types").
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mpq import data as data_lib
from mpq.train import checkpoint as ckpt_lib
from mpq.train import loop, optim, parallel
from mpq.train.state import init_state, make_eval_step, make_train_step


def train_and_evaluate(config, workdir: str) -> dict:
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("error: the peer row needs google/qwix: .venv/bin/pip install -e '.[bench]'") \
        from None
  config = config.copy_and_resolve_references()
  config.quant.enabled = False
  data = loop.load_data(config)
  mesh = parallel.make_mesh()
  total, _ = loop.num_steps(config, len(data.train))
  model, _ = loop.build_model(config, data)
  tx = optim.build(config, total)
  _, state = init_state(model, tx)
  restored, _ = ckpt_lib.restore_subset(os.path.join(config.init_from, ckpt_lib.LATEST), None,
                                        {"params": state.params, "rest": state.rest})
  from flax import nnx  # pylint: disable=g-import-not-at-top
  nnx.update(model, restored["params"], restored["rest"])
  sample = jnp.zeros((2, *data.image_shape), jnp.float32)
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.QtProvider(rules), sample, False)
  graphdef, state = init_state(qmodel, tx)
  step_fn = jax.jit(make_train_step(graphdef, tx, config.label_smoothing), donate_argnums=(0,))
  ds = data_lib.train_dataset(data, config.batch_size, config.seed, total, config.augment)
  losses = []
  for batch in data_lib.iterate(ds, 0):
    state, m = step_fn(state, parallel.shard_batch(batch, mesh))
    losses.append(m["loss"])
  os.makedirs(workdir, exist_ok=True)
  losses = np.asarray(jax.device_get(losses))
  if not np.all(np.isfinite(losses)):
    raise RuntimeError("qwix peer: non-finite loss")
  eval_step = jax.jit(make_eval_step(graphdef))
  r = loop.evaluate(eval_step, state.params, state.rest, data, config.eval_batch_size, mesh)
  return {**r, "step": int(state.step), "qwix_version": getattr(qwix, "__version__", "?")}
