"""Optimizer and learning-rate schedule from the config (optax)."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def schedule(config, num_steps: int) -> optax.Schedule:
  """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `num_steps`."""
  warmup = min(config.warmup_steps, max(num_steps - 1, 0))
  if config.schedule == "constant":
    main = optax.constant_schedule(config.learning_rate)
  else:
    main = optax.cosine_decay_schedule(config.learning_rate, max(num_steps - warmup, 1))
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, config.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def _decay_mask(params):
  """Weight decay applies to kernels (arrays of rank >= 2), not to biases, BatchNorm scales or
  quantizer parameters (`QParam`: step sizes, thresholds, bits). The mask is a prefix tree with
  one bool per variable."""
  from mpq.quant.quantizer import QParam  # pylint: disable=g-import-not-at-top

  def decays(v):
    if isinstance(v, nnx.Variable):
      return not isinstance(v, QParam) and v.value.ndim >= 2
    return v.ndim >= 2

  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def build(config, num_steps: int) -> optax.GradientTransformation:
  """The optimizer; with `mixed.method=dbits` the continuous bitwidths get their own Adam."""
  main = _build_main(config, num_steps)
  if not (config.quant.enabled and config.mixed.enabled and config.mixed.method == "dbits"):
    return main

  def labels(params):
    def label(path, _):
      return "bits" if jax.tree_util.keystr(path).endswith("['bits'].value") else "main"
    return jax.tree_util.tree_map_with_path(label, params)

  return optax.multi_transform({"main": main, "bits": optax.adam(config.mixed.dbits_lr)}, labels)


def _build_main(config, num_steps: int) -> optax.GradientTransformation:
  lr = schedule(config, num_steps)
  chain = []
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  wd = config.weight_decay
  if config.optimizer == "adamw":
    chain.append(optax.adamw(lr, weight_decay=wd, mask=_decay_mask))
  else:
    if wd > 0:  # L2 regularisation: grad += wd * w
      chain.append(optax.add_decayed_weights(wd, mask=_decay_mask))
    if config.optimizer == "sgd":
      chain.append(optax.sgd(lr, momentum=config.momentum, nesterov=True))
    else:
      chain.append(optax.adam(lr))
  return optax.chain(*chain)
