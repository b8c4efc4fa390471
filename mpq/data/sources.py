"""Random-access data sources: in-memory arrays (IDX files) and TFDS array_record datasets.

A source has `len(source)` and `source.gather(indices) -> (images uint8 [B,H,W,C], labels int32 [B])`.
The dataset name in the config picks it: `fashion_mnist` reads the local IDX files; `tfds:NAME` (e.g.
`tfds:cifar10`, `tfds:mnist`, `tfds:imagenet2012`) reads a dataset already prepared by TFDS in
array_record format through `tfds.data_source` (reading needs no TensorFlow; preparing does).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from mpq.data import fashion_mnist
from mpq.errors import DataError

# Per-channel mean and std of the training images in [0, 1], for normalisation.
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class Source(Protocol):

  def __len__(self) -> int:
    ...

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray  # int32 [N]

  def __len__(self) -> int:
    return len(self.labels)

  def gather(self, indices):
    return self.images[indices], self.labels[indices]


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  source: object  # tfds ArrayRecordDataSource
  image_key: str = "image"
  label_key: str = "label"

  def __len__(self) -> int:
    return len(self.source)

  def gather(self, indices):
    records = [self.source[int(i)] for i in indices]
    images = np.stack([np.asarray(r[self.image_key], np.uint8) for r in records])
    labels = np.asarray([r[self.label_key] for r in records], np.int32)
    return images, labels


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Source
  test: Source
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  # (scale, zero point) of the pixel grid when images are normalised onto it (`input_norm`
  # 'pixel', see `pixel_grid`); None: per-channel mean/std ('channel')
  grid: tuple[float, int] | None = None


INPUT_NORMS = ("pixel", "channel")

# Class names by label, for the datasets that record them (exported files carry them).
CLASS_NAMES = {
    "fashion_mnist": fashion_mnist.CLASS_NAMES,
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}


def class_names(name: str) -> tuple[str, ...] | None:
  """The class names of dataset `name` (a config name), or None where they are not recorded."""
  return CLASS_NAMES.get(name[len("tfds:"):] if name.startswith("tfds:") else name)


def stats(name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel of dataset `name` (a config name: `fashion_mnist`, `tfds:cifar10`)
  for pixels in [0, 1]; (0.5, 0.25) per channel for a dataset without recorded statistics."""
  base = name[len("tfds:"):] if name.startswith("tfds:") else name
  return STATS.get(base, ((0.5,) * channels, (0.25,) * channels))


def pixel_grid(name: str, channels: int) -> tuple[float, int]:
  """(scale, zero point) of the pixel grid of dataset `name`: `z = round(255 mean)` and
  `s = float32(1 / (255 std))`, one of each for all channels (mean and std averaged over them), so
  that an exported model's first quantized tensor has one scale and zero point, as TFLite and ONNX
  Runtime need. Images normalised as `x = (p - z) * s` (`input_norm='pixel'`) lie exactly on this
  8-bit unsigned grid, `round(x / s) + z == p` for every uint8 pixel `p` (tested): the first
  layer's input quantizer is then this grid, fixed, and an export takes the uint8 image itself."""
  mean, std = stats(name, channels)
  z = int(np.floor(255.0 * float(np.mean(mean)) + 0.5))
  s = float(np.float32(1.0) / (np.float32(255.0) * np.float32(np.mean(std))))
  return s, z


def _subset(src: Source, n: int | None) -> Source:
  if not n or n >= len(src):
    return src
  if isinstance(src, ArraySource):
    return ArraySource(src.images[:n], src.labels[:n])
  return _Prefix(src, n)


@dataclasses.dataclass(frozen=True)
class _Prefix:
  source: Source
  n: int

  def __len__(self):
    return self.n

  def gather(self, indices):
    return self.source.gather(indices)


def load(name: str, data_dir: str | None = None, num_train: int | None = None,
         num_test: int | None = None, input_norm: str = "pixel") -> Dataset:
  """Loads a dataset by config name; `num_train`/`num_test` keep only the first examples.
  `input_norm`: 'pixel' normalises onto the pixel grid (`pixel_grid`), 'channel' with the
  per-channel mean and std (runs started before the pixel grid existed)."""
  if input_norm not in INPUT_NORMS:
    raise DataError(f"unknown input_norm {input_norm!r}; use one of {INPUT_NORMS}")
  if name == "fashion_mnist":
    train = ArraySource(*fashion_mnist.load_split("train", data_dir))
    test = ArraySource(*fashion_mnist.load_split("test", data_dir))
    num_classes, shape = fashion_mnist.NUM_CLASSES, fashion_mnist.IMAGE_SHAPE
  elif name.startswith("tfds:"):
    train, test, num_classes, shape = _load_tfds(name[len("tfds:"):], data_dir)
  else:
    raise DataError(f"unknown dataset {name!r}; use 'fashion_mnist' or 'tfds:NAME' "
                    "(a TFDS dataset prepared in array_record format, e.g. tfds:cifar10)")
  mean, std = stats(name, shape[-1])
  grid = pixel_grid(name, shape[-1]) if input_norm == "pixel" else None
  return Dataset(name, _subset(train, num_train), _subset(test, num_test), num_classes,
                 tuple(shape), mean, std, grid)


def _load_tfds(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  sources = {}
  for split in ("train", "test"):
    try:
      sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises many types for a missing or unprepared dataset.
      raise DataError(f"TFDS dataset {name!r} split {split!r} cannot be read from "
                      f"{data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); prepare it in array_record "
                      "format with `tfds build` or set --config.data_dir") from None
  info = sources["train"].dataset_info
  features = info.features
  num_classes = features["label"].num_classes
  shape = tuple(features["image"].shape)
  if None in shape:
    raise DataError(f"TFDS dataset {name!r} has images of variable shape {shape}; "
                    "mpq needs fixed-size images")
  return TfdsSource(sources["train"]), TfdsSource(sources["test"]), num_classes, shape
