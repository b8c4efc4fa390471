"""Storage of integer weights: signed integers of 2-16 bits, packed below 8 bits."""

from __future__ import annotations

import numpy as np


def _field(bits: int) -> int:
  return 2 if bits <= 2 else 4 if bits <= 4 else 8 if bits <= 8 else 16 if bits <= 16 else 32


def storage(bits: int, n: int) -> tuple[np.dtype, int]:
  """(dtype, element count) of what `pack` stores for `n` values of `bits` bits: uint8 with
  ceil(n / 4) (<= 2 bits) or ceil(n / 2) (3-4 bits) bytes, int8 (5-8 bits) or int16 (9-16 bits)
  with n elements; a loader checks a stored array against it before `unpack`."""
  f = _field(bits)
  if f >= 8:
    return np.dtype({8: np.int8, 16: np.int16, 32: np.int32}[f]), n
  return np.dtype(np.uint8), -(-n // (8 // f))


def pack(values: np.ndarray, bits: int) -> np.ndarray:
  """Signed integers of `bits` bits -> storage. Fields of 2 bits (bits <= 2) or 4 bits (3-4 bits)
  are packed into uint8, element i at byte i // (8 / field), bit offset (i % (8 / field)) * field,
  lowest bits first, two's complement within the field; 5-8 bits are int8, 9-16 bits int16."""
  v = np.asarray(values, np.int64).ravel()
  f = _field(bits)
  if f >= 8:
    return v.astype(storage(bits, len(v))[0])
  per = 8 // f
  pad = (-len(v)) % per
  u = (np.concatenate([v, np.zeros(pad, np.int64)]) & ((1 << f) - 1)).reshape(-1, per)
  return np.sum(u << (np.arange(per) * f), axis=1).astype(np.uint8)


def unpack(stored: np.ndarray, bits: int, shape) -> np.ndarray:
  """The inverse of `pack`: int32 array of `shape`."""
  n = int(np.prod(shape))
  f = _field(bits)
  if f >= 8:
    return np.asarray(stored, np.int32).reshape(shape)
  per = 8 // f
  u = (np.asarray(stored, np.int64)[:, None] >> (np.arange(per) * f)) & ((1 << f) - 1)
  u = u.ravel()[:n]
  return np.where(u >= (1 << (f - 1)), u - (1 << f), u).astype(np.int32).reshape(shape)
