"""Loss terms of the training objective, as pure functions (a leaf module: it imports no mpq code).

  cross_entropy       softmax cross-entropy with optional label smoothing, per example
  distillation_loss   `T^2 KL(softmax(t / T) || softmax(s / T))`, per example (Hinton et al. 2015)
  dampening_weight    the oscillation-dampening weight, annealed from 0 with a half cosine
                      (Nagel et al. 2022); the dampening term itself is recorded by the weight
                      quantizers (`mpq.quant.oscillation`)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Softmax cross-entropy with (optional) label smoothing, per example:
  `-sum_k y_k log softmax(logits)_k` with `y = (1 - e) onehot + e / K`."""
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = onehot * (1 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits, onehot)


def distillation_loss(student_logits, teacher_logits, temperature: float):
  """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, per example (Hinton et al. 2015).

  The `T^2` keeps the gradient's scale independent of T: `d/ds = T (softmax(s / T) - softmax(t / T))`.
  """
  t = jax.nn.log_softmax(teacher_logits / temperature)
  s = jax.nn.log_softmax(student_logits / temperature)
  return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def dampening_weight(lambda_max: float, total_steps: int):
  """`lambda(t) = lambda_max * (1 - cos(pi * min(t / T, 1))) / 2`: the oscillation-dampening weight
  annealed from 0 at step 0 to `lambda_max` at step T (Nagel et al. 2022), constant after T."""
  def weight(step):
    t = jnp.minimum(jnp.asarray(step).astype(jnp.float32) / max(total_steps, 1), 1.0)
    return lambda_max * 0.5 * (1.0 - jnp.cos(jnp.pi * t))
  return weight
