"""Evaluation of an exported integer model on a dataset's test split, optionally against the
fake-quant model it came from (top-1 agreement, logit differences in output LSBs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq import data as data_lib
from mpq.intexec import build


def evaluate_int(manifest: dict, tensors: dict, data, batch_size: int = 500, fq_model=None) -> dict:
  """Accuracy and loss of the integer model; with `fq_model` also the fake-quant model's accuracy,
  top-1 agreement and the largest logit difference in output LSBs."""
  run, _, _ = build(manifest, tensors)
  fq_call, fq_correct = None, 0
  if fq_model is not None:
    graphdef, state = nnx.split(fq_model)
    fq_call = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False))
  scale = np.asarray(manifest["ops"][-1]["scale"])
  n = correct = loss = agree = 0
  max_lsb = 0.0
  for batch in data_lib.eval_batches(data, batch_size):
    mask = np.asarray(batch["mask"]) > 0
    logits = np.asarray(run(batch["image"]), np.float64)[mask]
    labels = np.asarray(batch["label"])[mask]
    z = logits - logits.max(-1, keepdims=True)
    loss += float(np.sum(np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]))
    correct += int(np.sum(logits.argmax(-1) == labels))
    n += int(mask.sum())
    if fq_model is not None:
      fq = np.asarray(fq_call(state, jnp.asarray(batch["image"])), np.float64)[mask]
      agree += int(np.sum(fq.argmax(-1) == logits.argmax(-1)))
      fq_correct += int(np.sum(fq.argmax(-1) == labels))
      max_lsb = max(max_lsb, float(np.max(np.abs(fq - logits) / scale)))
  out = {"accuracy": correct / n, "loss": loss / n, "num_examples": n, "mode": "int"}
  if fq_model is not None:
    out["fake_quant_accuracy"] = fq_correct / n
    out["agreement_with_fake_quant"] = agree / n
    out["max_logit_lsb_diff"] = max_lsb
  return out
