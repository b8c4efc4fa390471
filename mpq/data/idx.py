"""Reader for the IDX format of (Fashion-)MNIST, with strict verification.

An IDX file is: 2 zero bytes, a type code byte (0x08 = unsigned byte), a byte with the number of
dimensions d, then d big-endian uint32 sizes, then the data in row-major order. The files may be
gzip-compressed (`.gz`). Every check that fails raises `DataError` naming the file, so a truncated
download or a wrong file is never read as a smaller dataset.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from mpq.errors import DataError

_UBYTE = 0x08


def read_idx(path: str | os.PathLike, expect_shape: tuple[int, ...] | None = None) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (optionally gzip-compressed) into a uint8 array.

  Args:
    path: the file; read as gzip when its name ends in `.gz`.
    expect_shape: when given, the header's dimensions must equal it.

  Raises:
    DataError: the file is missing, is not valid gzip, has a bad header, holds fewer or more bytes
      than its header announces, or does not have `expect_shape`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found; run `make setup` to install the dataset")
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: cannot be decompressed ({e}); the file is corrupt or truncated, "
                    "delete it and run `make setup` again") from None
  if len(raw) < 4:
    raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
  zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
  if zero != 0 or dtype_code != _UBYTE or not 1 <= ndim <= 4:
    raise DataError(f"{path}: not an unsigned-byte IDX file (magic bytes {raw[:4].hex()}, "
                    "expected 0000 08 0d with d in 1..4)")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated in the IDX header")
  shape = struct.unpack(f">{ndim}I", raw[4:header])
  size = int(np.prod(shape, dtype=np.int64))
  if len(raw) - header != size:
    raise DataError(f"{path}: header announces shape {tuple(shape)} = {size} bytes of data but the "
                    f"file holds {len(raw) - header}; the file is truncated or wrong, delete it and "
                    "run `make setup` again")
  if expect_shape is not None and tuple(shape) != tuple(expect_shape):
    raise DataError(f"{path}: shape {tuple(shape)}, expected {tuple(expect_shape)}")
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzip-compressed when `path` ends in `.gz`)."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  data = struct.pack(">HBB", 0, _UBYTE, array.ndim)
  data += struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
  opener = gzip.open if os.fspath(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)
