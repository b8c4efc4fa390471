"""Optimizer and learning-rate schedule from the config (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from mpq.quant import methods
from mpq.quant.methods import ParamGroup
from mpq.quant.variables import QParam


def schedule(config, num_steps: int, peak: float | None = None) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `num_steps`, peaking
  at `peak` (default `learning_rate`)."""
  peak = config.learning_rate if peak is None else peak
  warmup = min(config.warmup_steps, max(num_steps - 1, 0))
  if config.schedule == "constant":
    main = optax.constant_schedule(peak)
  else:
    main = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1))
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, peak, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def _decay_mask(params):
  """Weight decay applies to kernels (arrays of rank >= 2), not to biases, BatchNorm scales or
  quantizer parameters (`QParam`, e.g. per-channel step sizes of rank 4, which train with the
  model's optimizer under `quant.param_optimizer='model'`). The mask is a prefix tree with one bool
  per variable."""

  def decays(v):
    if isinstance(v, nnx.Variable):
      return not isinstance(v, QParam) and v.value.ndim >= 2
    return v.ndim >= 2

  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def labels(params, config=None):
  """The optimizer label of every parameter: `main` for model parameters, the estimator's group
  (`QParam` metadata `opt_group`, e.g. `lsq/step_size`) for quantizer parameters, or `main` where
  that group does not apply to `config` (`ParamGroup.when`) or where `quant.param_optimizer` is
  'model' (groups with their own `lr_field` keep it, as they always had)."""
  groups = methods.param_groups()
  model_opt = config is not None and config.quant.get("param_optimizer", "model") == "model"

  def label(v):
    if not isinstance(v, QParam):
      return "main"
    group = groups[v.opt_group]
    if config is not None and (not group.applies(config) or (model_opt and not group.lr_field)):
      return "main"
    return v.opt_group

  return jax.tree.map(label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_lr(config) -> float:
  """The peak learning rate of quantizer parameters: `quant.param_lr`, or with 0 the model's
  learning rate for adam/adamw (the quantizer parameters then train as Adam at the model's rate)
  and 1e-3 for sgd (an SGD rate is no Adam rate: at resnet20's 0.1, Adam would move a step size
  by 0.1 per step)."""
  lr = float(config.quant.get("param_lr", 0.0))
  if lr > 0:
    return lr
  return config.learning_rate if config.optimizer in ("adam", "adamw") else 1e-3


def _group_tx(config, num_steps: int, group: ParamGroup) -> optax.GradientTransformation:
  if group.lr_field:
    section, field = group.lr_field.split(".")
    lr = optax.constant_schedule(float(config[section][field]) * group.lr_scale)
  else:
    lr = schedule(config, num_steps, peak=param_lr(config) * group.lr_scale)
  if group.optimizer == "sgd":
    return optax.sgd(lr, momentum=config.momentum, nesterov=True)
  return optax.adam(lr)


def build(config, num_steps: int) -> optax.GradientTransformation:
  """The optimizer: the model's parameters by `config.optimizer`, each group of quantizer
  parameters by the optimizer its estimator declares (`mpq.quant.methods.ParamGroup`), applied by
  label through `optax.multi_transform`. Only the groups the parameters use get a transform (and
  optimizer state), so adding an estimator does not change existing checkpoints' layout.
  Gradient clipping (`grad_clip_norm`) sees every parameter except groups with their own constant
  rate (`lr_field`: dbits' bits under `mixed.method=dbits`)."""
  main = _build_main(config, num_steps)
  groups = methods.param_groups()
  label_fn = lambda tree: labels(tree, config)  # noqa: E731

  def make(tree) -> optax.GradientTransformation:
    present = sorted(set(jax.tree.leaves(label_fn(tree))) - {"main"})
    txs = {"main": main, **{n: _group_tx(config, num_steps, groups[n]) for n in present}}
    tx = optax.multi_transform(txs, label_fn)
    if config.grad_clip_norm > 0:
      own = {n for n in present if groups[n].lr_field}
      clipped = lambda t: jax.tree.map(lambda l: l not in own, label_fn(t))  # noqa: E731
      tx = optax.chain(optax.masked(optax.clip_by_global_norm(config.grad_clip_norm), clipped), tx)
    return tx

  return optax.GradientTransformation(lambda params: make(params).init(params),
                                      lambda updates, state, params=None:
                                      make(updates).update(updates, state, params))


def _build_main(config, num_steps: int) -> optax.GradientTransformation:
  lr = schedule(config, num_steps)
  wd = config.weight_decay
  if config.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=wd, mask=_decay_mask)
  chain = []
  if wd > 0:  # L2 regularisation: grad += wd * w
    chain.append(optax.add_decayed_weights(wd, mask=_decay_mask))
  if config.optimizer == "sgd":
    chain.append(optax.sgd(lr, momentum=config.momentum, nesterov=True))
  else:
    chain.append(optax.adam(lr))
  return optax.chain(*chain)
