"""The training state as a pytree, and the pure train and eval step functions.

The model is split once with `nnx.split` into a static `graphdef` and two `nnx.State`s: `params`
(`nnx.Param`, what the optimizer updates) and `rest` (every other variable: BatchNorm statistics and,
with quantization, quantizer statistics). A step merges them back inside `jax.jit`, so the Python
model is traced once and never re-traced per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mpq.losses import cross_entropy, dampening_weight, distillation_loss  # noqa: F401


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar
  params: nnx.State
  rest: nnx.State
  opt_state: Any
  extra: Any = ()  # training-method state, e.g. {"lagrange": λ} for mixed.method=dbits


def split_model(model: nnx.Module):
  """Returns (graphdef, params, rest)."""
  return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
  graphdef, params, rest = split_model(model)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


def make_train_step(graphdef, tx: optax.GradientTransformation, label_smoothing: float = 0.0,
                    damp_weight=None, teacher_graphdef=None, distill_weight: float = 0.0,
                    temperature: float = 1.0, budget=None):
  """`train_step(state, batch[, teacher]) -> (state, metrics)`; jit it (the loop does).

  `damp_weight(step)`, when given, weighs the quantizers' oscillation-dampening term in the loss.
  With `teacher_graphdef`, the step takes the teacher's `(params, rest)` as a third argument and the
  loss is `(1 - a) CE + a KD` with `a = distill_weight` and KD the `distillation_loss` of the
  teacher's eval-mode logits (knowledge distillation from a float model).
  `budget(model, extra, step) -> (penalty, new_extra, metrics)`, when given, adds a budget penalty
  computed from the model (e.g. the Lagrangian size term of `mpq.allocate.dbits`).
  Metrics: `loss` (the cross-entropy), `accuracy`, `grad_norm` and, for quantized models, per layer
  `clip/...` (and `osc/...`, `frozen/...`, `damp` where enabled).
  """
  from mpq.quant.quantizer import dampening_loss, quant_metrics  # pylint: disable=g-import-not-at-top

  def loss_fn(params, rest, batch, step, teacher, extra):
    model = nnx.merge(graphdef, params, rest, copy=True)
    extra_state = extra
    logits = model(batch["image"], train=True)
    loss = jnp.mean(cross_entropy(logits, batch["label"], label_smoothing))
    extra = quant_metrics(model)
    total = loss
    if teacher is not None:
      t_logits = nnx.merge(teacher_graphdef, *teacher)(batch["image"], train=False)
      extra["distill"] = jnp.mean(distillation_loss(logits, jax.lax.stop_gradient(t_logits),
                                                    temperature))
      total = (1 - distill_weight) * loss + distill_weight * extra["distill"]
    if damp_weight is not None:
      extra["damp"] = dampening_loss(model)
      total = total + damp_weight(step) * extra["damp"]
    new_extra = extra_state
    if budget is not None:
      penalty, new_extra, bm = budget(model, extra_state, step)
      total = total + penalty
      extra.update(bm)
    _, _, new_rest = split_model(model)
    return total, (loss, logits, new_rest, extra, new_extra)

  def train_step(state: TrainState, batch, teacher=None):
    (_, (loss, logits, rest, extra, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.rest, batch, state.step, teacher, state.extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.global_norm(grads),
        **extra,
    }
    return TrainState(state.step + 1, params, rest, opt_state, new_extra), metrics

  return train_step


def make_eval_step(graphdef):
  """`eval_step(params, rest, batch) -> sums` of loss, correct and count over unmasked examples."""

  def eval_step(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["image"], train=False)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"])
    correct = jnp.argmax(logits, -1) == batch["label"]
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  return eval_step
