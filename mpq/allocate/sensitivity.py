"""Per-layer sensitivities for the ILP: Hessian-aware (HAWQ-V2/V3) and measured.

Hessian-aware (Dong et al. 2020, HAWQ-V2; Yao et al. 2021, HAWQ-V3):

    Omega_i(b) = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2

with `H_i` the block of the loss Hessian for layer i's kernel (n_i elements) and Q_b per-channel
symmetric quantization (MSE-calibrated). The trace comes from Hutchinson's estimator:
`Tr(H_i) = E[v_i^T (H v)_i]` for Rademacher `v` over all parameters (cross-layer terms vanish in
expectation), `H v` by forward-over-reverse differentiation (`jvp` of `grad`). Probes are drawn until
every layer's standard error is below `rel_tol` of its mean (or `max_probes`).

Measured: `S[i, c]` = the loss on calibration batches when only layer i is quantized at choice c
(everything else at 16 bits) minus the loss with everything at 16 bits. All L x C configurations run
in one compiled function: bits (and the per-choice weight ranges) are traced inputs, mapped with
`lax.map`, so there is one compilation, not one per configuration.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq.quant import calibration as calib
from mpq.quant import core
from mpq.quant.quantizer import hooks, quantizers


# -------------------------------------------------------------------------------------- Hutchinson
def hutchinson_traces(loss_fn: Callable, params, groups: Sequence[Callable[[str], bool]], key,
                      rel_tol: float = 0.05, min_probes: int = 8, max_probes: int = 200,
                      chunk: int = 4) -> dict:
  """Per-group Hessian traces of `loss_fn(params)` by Hutchinson's estimator.

  Args:
    loss_fn: params -> scalar loss (closing over its data).
    params: a pytree.
    groups: predicates on a leaf's key path string (`jax.tree_util.keystr`); group j's trace sums
      the diagonal blocks of the leaves it selects.
    key: PRNG key; rel_tol/min_probes/max_probes: the stopping rule; chunk: probes between checks.
  Returns:
    {"trace": [G], "stderr": [G], "probes": int}
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(p) for p, _ in leaves]
  member = np.asarray([[g(n) for n in names] for g in groups], np.float32)  # [G, leaves]
  if (member.sum(axis=1) == 0).any():
    empty = [i for i, m in enumerate(member.sum(axis=1)) if m == 0]
    raise ValueError(f"groups {empty} select no parameter; parameter paths: {names[:8]}...")
  grad_fn = jax.grad(loss_fn)

  # One compiled probe called from Python: the same probes under `lax.map` (an XLA while loop)
  # ran 20x slower on XLA CPU (53 s against 2.5 s for 4 probes of the cnn on 256 examples).
  @jax.jit
  def probe(params, k):
    ks = jax.random.split(k, len(leaves))
    v = [jax.random.rademacher(kk, jnp.shape(x), jnp.float32) for kk, (_, x) in zip(ks, leaves)]
    v_tree = jax.tree_util.tree_unflatten(treedef, v)
    _, hv = jax.jvp(grad_fn, (params,), (v_tree,))
    per_leaf = jnp.stack([jnp.sum(a * b) for a, b in zip(v, jax.tree_util.tree_leaves(hv))])
    return jnp.asarray(member) @ per_leaf

  samples = []
  while True:
    key, sub = jax.random.split(key)
    samples.append(np.stack([np.asarray(probe(params, k)) for k in jax.random.split(sub, chunk)]))
    x = np.concatenate(samples)
    n = len(x)
    mean = x.mean(axis=0)
    se = x.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full_like(mean, np.inf)
    if n >= max_probes or (n >= min_probes and np.all(se <= rel_tol * np.abs(mean))):
      return {"trace": mean, "stderr": se, "probes": n}


def quantization_perturbation(kernel, bits: int) -> float:
  """`||Q_b(W) - W||^2` with per-output-channel symmetric quantization, MSE-calibrated."""
  w = jnp.asarray(kernel, jnp.float32)
  amax = calib.weight_amax(w, "mse", bits)
  s = core.symmetric_scale(amax, bits)
  return float(jnp.sum(jnp.square(core.fake_quant(w, s, 0.0, bits, True, narrow=True) - w)))


def hessian_sensitivity(traces: np.ndarray, kernels: Sequence, choices: Sequence[tuple[int, int]]
                        ) -> np.ndarray:
  """[layers, choices] `Omega_i(w_bits) = Tr(H_i) / n_i * ||Q_w(W_i) - W_i||^2`."""
  out = np.zeros((len(kernels), len(choices)))
  cache: dict = {}
  for i, k in enumerate(kernels):
    n = int(np.prod(np.shape(k)))
    for j, (wb, _) in enumerate(choices):
      if (i, wb) not in cache:
        cache[(i, wb)] = quantization_perturbation(k, wb)
      out[i, j] = float(traces[i]) / n * cache[(i, wb)]
  return out


# ---------------------------------------------------------------------------------------- measured
def _quantizers(model) -> list[tuple[str, object]]:
  """The quantizers whose bits a configuration sets (a fixed grid, the pixel grid of the input,
  keeps its own)."""
  return [(f"{layer}/{q.role}", q) for layer, q in quantizers(model) if not q.method.fixed_bits]


def measured_sensitivity(model: nnx.Module, layers: Sequence[str], choices: Sequence[tuple[int, int]],
                         images, labels, batch_size: int = 256,
                         batched: bool = True) -> tuple[np.ndarray, float]:
  """[layers, choices] loss increases, and the all-16-bit reference loss.

  `model` is a quantized model whose quantizers all use the `dbits` estimator (`amax` and `bits`
  are plain arrays), initialised and calibrated. Weight ranges are re-calibrated (per channel, MSE)
  for every candidate bitwidth; activation ranges keep their calibration. `layers`: the layer paths
  to score; `images`/`labels`: the calibration set (a multiple of `batch_size` is used).
  `batched`: map over all configurations inside one compiled function (`lax.map`); else call one
  compiled configuration from Python per configuration. Either way bits are traced inputs, so
  there is one compilation, not one per configuration (benchmarks/speed.py times both).
  """
  from mpq.losses import cross_entropy  # pylint: disable=g-import-not-at-top

  qs = _quantizers(model)
  bad = [p for p, q in qs if not q.method.learns_bits]
  if bad:
    raise ValueError(f"measured sensitivity needs dbits quantizers everywhere; not: {bad[:3]}")
  owner = [p.rsplit("/", 1)[0] for p, _ in qs]
  missing = [l for l in layers if l not in owner]
  if missing:
    raise ValueError(f"layers {missing} have no quantizer")
  seen = {}
  with hooks(model, observe=lambda q, x: seen.__setitem__(id(q), np.asarray(x))):
    model(jnp.asarray(images[:1]), train=False)
  w_idx = [i for i, (_, q) in enumerate(qs) if q.role == "weight"]
  wbits = sorted({c[0] for c in choices} | {16})
  amax = {(i, b): np.asarray(calib.weight_amax(seen[id(qs[i][1])], "mse", b)).reshape(qs[i][1].shape)
          for i in w_idx for b in wbits}

  def config(layer=None, choice=None):
    bits = np.full(len(qs), 16.0, np.float32)
    if layer is not None:
      for i, (_, q) in enumerate(qs):
        if owner[i] == layer:
          bits[i] = choice[0] if q.role == "weight" else choice[1]
    return bits, [amax[(i, int(bits[i]))] for i in w_idx]

  cfgs = [config()] + [config(l, c) for l in layers for c in choices]
  bits_all = jnp.asarray(np.stack([b for b, _ in cfgs]))
  amax_all = [jnp.asarray(np.stack([a[k] for _, a in cfgs])) for k in range(len(w_idx))]
  bs = min(batch_size, len(images))
  n = (len(images) // bs) * bs
  xs = jnp.asarray(images[:n]).reshape(-1, bs, *np.shape(images)[1:])
  ys = jnp.asarray(labels[:n]).reshape(-1, bs)
  graphdef, state = nnx.split(model)

  def one(state, cfg):
    bits, amaxes = cfg
    m = nnx.merge(graphdef, state, copy=True)
    mq = [q for _, q in _quantizers(m)]
    for i, q in enumerate(mq):
      q.bits.value = bits[i]
    for k, i in enumerate(w_idx):
      mq[i].amax.value = amaxes[k]
    return jnp.mean(jax.lax.map(
        lambda xy: jnp.mean(cross_entropy(m(xy[0], train=False), xy[1])), (xs, ys)))

  if batched:  # all configurations inside one compiled loop
    run = jax.jit(lambda state, cfgs: jax.lax.map(lambda c: one(state, c), cfgs))
    losses = np.asarray(run(state, (bits_all, amax_all)))
  else:  # one compiled configuration, called per configuration (bits are data: no recompiles)
    run = jax.jit(one)
    losses = np.asarray([run(state, (bits_all[j], [a[j] for a in amax_all]))
                         for j in range(len(cfgs))])
  return losses[1:].reshape(len(layers), len(choices)) - losses[0], float(losses[0])
