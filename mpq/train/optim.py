"""Optimizer and learning-rate schedule from the config (optax)."""

from __future__ import annotations

import jax
import optax


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
  """Weight decay applies to kernels (arrays of rank >= 2), not to biases or BatchNorm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build(config, num_steps: int) -> optax.GradientTransformation:
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
