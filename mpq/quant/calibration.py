"""Calibration: initial quantizer ranges from data, for QAT and for post-training quantization (PTQ).

Following Wu et al. 2020 (arXiv 2004.09602, NVIDIA's toolkit):
  activations (per tensor)  a histogram of |x| with 2048 bins whose range grows with the data
                            (the bin width is fixed by the first batch; larger values add bins), then
      max         amax = the largest |x| seen
      percentile  amax = the `percentile` point of the |x| distribution (e.g. 99.99)
      mse         amax among the bin centres minimising the count-weighted squared fake-quant error
      entropy     amax minimising KL(reference || quantized) over cuts i >= 128 bins (TensorRT):
                  reference = bins[:i] with the tail mass added to bin i-1; quantized = bins[:i]
                  merged into 2^(b-1) (signed) or 2^b (unsigned) levels, spread back over the
                  non-empty bins, empty bins smoothed to 1e-4 (as MXNet/TensorRT do)
  weights (per output channel)
      max         amax = max |w| per channel
      mse         amax = r * max |w|, r in [0.2, 1] (81 steps), minimising the per-channel squared error

  per-channel activations (`a_per_channel`): `max` or `percentile` of |x| per channel (the last
      axis), from the observed values themselves (the other methods are per-tensor histograms)

`calibrate(model, batches, ...)` runs the model eagerly in float (every quantizer observes its input
and passes it through unchanged), then sets every quantizer's range with `Quantizer.set_range`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq.errors import UserError
from mpq.quant import core
from mpq.quant import quantizer as qz

ACT_METHODS = ("max", "percentile", "mse", "entropy")
WEIGHT_METHODS = ("max", "mse")
NUM_BINS = 2048


class Histogram:
  """Histogram of |x| over [0, num_bins * width); grows by whole bins when larger values arrive."""

  def __init__(self, num_bins: int = NUM_BINS):
    self.num_bins, self.counts, self.width = num_bins, None, None
    self.min, self.max = np.inf, -np.inf

  def update(self, x) -> None:
    x = np.asarray(x, np.float64)
    self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
    a = np.abs(x).ravel()
    top = float(a.max()) if a.size else 0.0
    if self.counts is None:
      self.width = max(top, 1e-8) / self.num_bins
      self.counts = np.zeros(self.num_bins)
    need = int(np.ceil(top / self.width)) if top > 0 else 1
    if need > len(self.counts):
      self.counts = np.concatenate([self.counts, np.zeros(need - len(self.counts))])
    idx = np.minimum((a / self.width).astype(np.int64), len(self.counts) - 1)
    self.counts += np.bincount(idx, minlength=len(self.counts))

  @property
  def edges(self) -> np.ndarray:
    return np.arange(len(self.counts) + 1) * self.width

  @property
  def amax(self) -> float:
    return max(abs(self.min), abs(self.max))


def amax_percentile(h: Histogram, percentile: float) -> float:
  cdf = np.cumsum(h.counts) / h.counts.sum()
  i = int(np.searchsorted(cdf, percentile / 100.0))
  return float(h.edges[min(i + 1, len(h.counts))])


def _qmax(bits: int, signed: bool) -> float:
  return float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)


def amax_mse(h: Histogram, bits: int, signed: bool, start: int = 128) -> float:
  """The bin centre minimising sum_k counts_k (c_k - Q(c_k))^2 with Q at step amax / qmax."""
  centers = (h.edges[:-1] + h.edges[1:]) / 2
  qmax = _qmax(bits, signed)
  cands = centers[min(start, len(centers) - 1):]
  cands = cands[::max(1, len(cands) // 512)]
  s = cands[:, None] / qmax
  q = np.clip(core.round_half_up(centers[None, :] / s), 0, qmax) * s
  err = ((centers[None, :] - q) ** 2 * h.counts[None, :]).sum(axis=1)
  return float(cands[int(np.argmin(err))])


def _smooth(q: np.ndarray, eps: float = 1e-4):
  """Gives empty bins mass `eps`, taken proportionally from the others (as MXNet/TensorRT smooth,
  but proportional so no bin goes negative), so that a tail mass the candidate cannot represent
  costs a finite KL; None if `q` is all zero."""
  zero = q == 0
  if zero.all():
    return None
  eps = min(eps, 0.5 / max(int(zero.sum()), 1))
  return np.where(zero, eps, q * (1.0 - eps * zero.sum()))


def amax_entropy(h: Histogram, bits: int, signed: bool, start: int = 128) -> float:
  """TensorRT's KL-divergence calibration on the |x| histogram (see the module docstring)."""
  bins = h.counts
  nq = 2 ** (bits - 1) if signed else 2 ** bits
  start = max(start, nq)
  if start >= len(bins):
    return h.amax
  stride = max(1, (len(bins) - start) // 256)
  best, best_i = np.inf, len(bins)
  for i in range(start, len(bins) + 1, stride):
    ref = bins[:i].copy()
    ref[i - 1] += bins[i:].sum()
    nonzero = bins[:i] != 0
    chunks = np.array_split(np.arange(i), nq)
    cand = np.zeros(i)
    for c in chunks:
      nz = nonzero[c]
      if nz.any():
        cand[c[nz]] = bins[c].sum() / nz.sum()
    p = ref / ref.sum()
    q = _smooth(cand / max(cand.sum(), 1e-300))
    mask = p > 0
    kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask]))) if q is not None else np.inf
    if kl < best:
      best, best_i = kl, i
  return float(h.edges[best_i])


def act_amax(h: Histogram, method: str, bits: int, signed: bool, percentile: float = 99.99) -> float:
  if method == "max":
    return h.amax
  if method == "percentile":
    return amax_percentile(h, percentile)
  if method == "mse":
    return amax_mse(h, bits, signed)
  if method == "entropy":
    return amax_entropy(h, bits, signed)
  raise ValueError(f"unknown activation calibration {method!r}; use one of {ACT_METHODS}")


def weight_amax(w, method: str, bits) -> jnp.ndarray:
  """Per-output-channel (last axis) amax of a kernel."""
  w = jnp.asarray(w, jnp.float32)
  axes = tuple(range(w.ndim - 1))
  amax = jnp.max(jnp.abs(w), axis=axes)
  if method == "max":
    return amax
  if method != "mse":
    raise ValueError(f"unknown weight calibration {method!r}; use one of {WEIGHT_METHODS}")
  ratios = jnp.linspace(0.2, 1.0, 81)

  def err(r):
    q = core.fake_quant(w, core.symmetric_scale(r * amax, bits), 0.0, bits, True, narrow=True)
    return jnp.sum(jnp.square(q - w), axis=axes)

  errs = jnp.stack([err(r) for r in ratios])  # [ratios, channels]
  return ratios[jnp.argmin(errs, axis=0)] * amax


def channel_amax(x: np.ndarray, method: str, percentile: float, where: str) -> np.ndarray:
  """Per-channel amax of `x` shaped [values, channels]: max or percentile of |x| per channel."""
  a = np.abs(x)
  if method == "max":
    return a.max(axis=0)
  if method == "percentile":
    return np.percentile(a, percentile, axis=0)
  raise UserError(f"{where}: per-channel activation calibration supports max and percentile, not "
                  f"{method!r}; set --config.quant.calib_act=max or percentile")


def calibrate(model: nnx.Module, batches, act_method: str = "max", weight_method: str = "max",
              percentile: float = 99.99) -> dict[str, float]:
  """Sets every quantizer's range from `batches` (iterable of image arrays); returns the
  activation amax per quantizer (keyed `layer/path:role`) for logging."""
  if act_method not in ACT_METHODS:
    raise ValueError(f"unknown activation calibration {act_method!r}; use one of {ACT_METHODS}")
  hists: dict[int, Histogram] = {}
  channels: dict[int, list] = {}  # per-channel activation quantizers: their observed inputs
  weights: dict[int, object] = {}
  quantizers: dict[int, qz.Quantizer] = {}

  def observe(q, x):
    quantizers[id(q)] = q
    if q.role == "weight":
      weights[id(q)] = x
    elif q.shape:
      channels.setdefault(id(q), []).append(np.asarray(x, np.float32).reshape(-1, q.shape[-1]))
    else:
      hists.setdefault(id(q), Histogram()).update(x)

  with qz.hooks(model, observe=observe):
    for images in batches:
      model(jnp.asarray(images), train=False)
  report = {}
  for key, q in quantizers.items():
    bits = int(q.int_bits())
    if q.role == "weight":
      q.set_range(weight_amax(weights[key], weight_method, bits))
    elif key in channels:
      x = np.concatenate(channels[key])
      amax = channel_amax(x, act_method, percentile, f"{q.name}:{q.role}")
      q.set_range(amax, lo=np.maximum(x.min(axis=0), -amax))
      report[f"{q.name}:{q.role}"] = float(amax.max())
    else:
      h = hists[key]
      amax = act_amax(h, act_method, bits, q.signed, percentile)
      q.set_range(amax, lo=max(h.min, -amax))
      report[f"{q.name}:{q.role}"] = amax
  return report
