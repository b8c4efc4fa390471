"""Batches for training and evaluation, built with grain's random-access `MapDataset`.

Training order: the process's shard of example indices (`process_index::process_count`), shuffled
with a different permutation every epoch (grain derives the epoch's seed from `seed + epoch`),
repeated, cut into batches of `batch_size // process_count` (remainder dropped, so every step has the
same shape). Because a `MapDataset` is random access, batch `k` is a pure function of (seed, k): a run
resumed at step k reads exactly the batches an uninterrupted run would, with no iterator state to save.
Augmentation draws from a generator seeded by (seed, batch index), so it is reproducible too.

Each batch is a dict: `image` float32 [B, H, W, C] normalised (`_Normalize`: onto the pixel grid,
or with the per-channel mean/std), `label` int32 [B]; evaluation batches add `mask` (1 for real
examples, 0 for the padding of the last batch) and `pixels`, the uint8 images themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import numpy as np

from mpq.data.sources import Dataset, Source
from mpq.errors import UserError

AUGMENTATIONS = ("none", "crop_flip", "crop", "flip")


@dataclasses.dataclass(frozen=True)
class _Gather:
  source: Source

  def __call__(self, indices):
    images, labels = self.source.gather(np.asarray(indices))
    return {"image": images, "label": labels}


@dataclasses.dataclass(frozen=True)
class _Augment:
  """Random crop with zero padding of `pad` pixels and (optionally) horizontal flip, per example."""
  pad: int
  flip: bool

  def __call__(self, batch, rng: np.random.Generator):
    images = batch["image"]
    b, h, w, _ = images.shape
    if self.pad == 0:
      out = images.copy()
      flip = rng.random(b) < 0.5
      out[flip] = out[flip, :, ::-1]
      return dict(batch, image=out)
    padded = np.pad(images, ((0, 0), (self.pad, self.pad), (self.pad, self.pad), (0, 0)))
    dy = rng.integers(0, 2 * self.pad + 1, size=b)
    dx = rng.integers(0, 2 * self.pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]  # [b, h]
    cols = dx[:, None] + np.arange(w)[None, :]  # [b, w]
    out = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if self.flip:
      flip = rng.random(b) < 0.5
      out[flip] = out[flip, :, ::-1]
    return dict(batch, image=out)


@dataclasses.dataclass(frozen=True)
class _Normalize:
  """uint8 pixels `p` -> float32 model inputs: `(p - z) * s` on the pixel grid (`data.grid` =
  (s, z), exact: `p - z` is an integer, one float32 rounding), else `(p - 255 mean) / (255 std)`
  per channel. `keep_pixels` also keeps the uint8 images as `pixels` (what an export takes)."""
  data: Dataset
  keep_pixels: bool = False

  def __call__(self, batch):
    p = batch["image"]
    if self.data.grid is not None:
      s, z = self.data.grid
      x = (p.astype(np.float32) - np.float32(z)) * np.float32(s)
    else:
      mean = np.asarray(self.data.mean, np.float32) * 255.0
      inv = 1.0 / (np.asarray(self.data.std, np.float32) * 255.0)
      x = (p.astype(np.float32) - mean) * inv
    out = dict(batch, image=x)
    if self.keep_pixels:
      out["pixels"] = p
    return out


def _augment(name: str) -> _Augment | None:
  if name not in AUGMENTATIONS:
    raise UserError(f"unknown augmentation {name!r}; use one of {AUGMENTATIONS}")
  if name == "none":
    return None
  return _Augment(pad=0 if name == "flip" else 4, flip=name in ("crop_flip", "flip"))


def train_dataset(data: Dataset, batch_size: int, seed: int, num_steps: int, augment: str = "none",
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """The training batches as a random-access dataset of length `num_steps` (batch k = step k)."""
  if batch_size % process_count:
    raise UserError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
  local_bs = batch_size // process_count
  ds = grain.MapDataset.range(len(data.train))[process_index::process_count]
  if len(ds) < local_bs:
    raise UserError(f"batch_size {batch_size} exceeds the {len(ds)} training examples "
                    "of this process; lower --config.batch_size")
  epochs = -(-num_steps * local_bs // len(ds)) + 1
  ds = ds.shuffle(seed=seed).repeat(epochs).batch(local_bs, drop_remainder=True)[:num_steps]
  ds = ds.map(_Gather(data.train))
  aug = _augment(augment)
  if aug is not None:
    ds = ds.random_map(aug, seed=seed + 1)
  return ds.map(_Normalize(data))


def iterate(ds: grain.MapDataset, start: int = 0, prefetch: int = 4, threads: int = 2) -> Iterator[dict]:
  """Iterates `ds` from index `start`, reading ahead on `threads` threads."""
  if start >= len(ds):
    return iter(())
  opts = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
  return iter(ds[start:].to_iter_dataset(opts))


def eval_batches(data: Dataset, batch_size: int, split: str = "test", process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """All examples of the split (this process's shard) once, in order; the last batch padded + masked."""
  src = data.test if split == "test" else data.train
  local_bs = batch_size // process_count
  idx = np.arange(len(src))[process_index::process_count]
  num_batches = -(-len(src) // batch_size)
  norm = _Normalize(data, keep_pixels=True)
  for i in range(num_batches):
    chunk = idx[i * local_bs:(i + 1) * local_bs]
    n = len(chunk)
    images, labels = src.gather(chunk) if n else (
        np.zeros((0, *data.image_shape), np.uint8), np.zeros((0,), np.int32))
    pad = local_bs - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, np.int32)])
    yield dict(norm({"image": images}), label=labels, mask=mask)
