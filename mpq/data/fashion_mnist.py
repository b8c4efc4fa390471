"""Fashion-MNIST from its original IDX files (Xiao et al. 2017): 60k/10k 28x28 grey images, 10 classes.

Where the files are looked for: the `data_dir` argument, else `$MPQ_FASHION_MNIST_DIR` (a named
location is used or rejected with an error, never skipped), else the first of Debian's package
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`) and `~/.cache/mpq/fashion-mnist`
(where `python -m mpq.data.install` downloads them when the Debian package cannot be
installed). `make setup` runs that installer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request

import numpy as np

from mpq.data.idx import read_idx
from mpq.errors import DataError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "mpq", "fashion-mnist")
ENV_VAR = "MPQ_FASHION_MNIST_DIR"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")


def _has_files(d: str) -> bool:
  return all(os.path.isfile(os.path.join(d, f)) for img, lbl, _ in FILES.values() for f in (img, lbl))


def _missing(d: str) -> list[str]:
  return [f for img, lbl, _ in FILES.values() for f in (img, lbl)
          if not os.path.isfile(os.path.join(d, f))]


def find_dir(data_dir: str | None = None) -> str:
  """The directory that holds the four files, or a DataError. A location the user names (the
  `data_dir` argument, else `$MPQ_FASHION_MNIST_DIR`) is used or rejected, never skipped; without
  one, the first of Debian's directory and the download cache that holds them."""
  named = [(data_dir, "--config.data_dir")] if data_dir else (
      [(os.environ[ENV_VAR], f"${ENV_VAR}")] if os.environ.get(ENV_VAR) else [])
  for d, what in named:
    if not os.path.isdir(d):
      raise DataError(f"Fashion-MNIST not found in {d} ({what}): no such directory; point "
                      f"{what} at the directory with the four IDX .gz files, or unset it")
    missing = _missing(d)
    if missing:
      raise DataError(f"Fashion-MNIST not found in {d} ({what}): it lacks {', '.join(missing)}; "
                      f"point {what} at the directory with the four IDX .gz files, or unset it")
    return d
  for d in (DEBIAN_DIR, CACHE_DIR):
    if _has_files(d):
      return d
  raise DataError(f"Fashion-MNIST not found in {DEBIAN_DIR} or {CACHE_DIR}; run `make setup` "
                  "(installs Debian's dataset-fashion-mnist or downloads the files) or set "
                  "--config.data_dir")


def load_split(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split as (images uint8 [N, 28, 28, 1], labels int32 [N]), verified."""
  if split not in FILES:
    raise DataError(f"unknown Fashion-MNIST split {split!r}; use one of {sorted(FILES)}")
  d = find_dir(data_dir)
  img_file, lbl_file, n = FILES[split]
  images = read_idx(os.path.join(d, img_file), expect_shape=(n, 28, 28))
  labels = read_idx(os.path.join(d, lbl_file), expect_shape=(n,))
  if labels.max() >= NUM_CLASSES:
    raise DataError(f"{os.path.join(d, lbl_file)}: label {labels.max()} out of range 0..9")
  return images[..., None], labels.astype(np.int32)


def install(quiet: bool = False) -> str:
  """Makes the files available: Debian package when root with apt-get, else download. Idempotent."""
  try:
    d = find_dir()
    for split in FILES:  # verify what is there, so a corrupt file is reported at setup time
      load_split(split, d)
    return d
  except DataError:
    pass
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
  if shutil.which("apt-get") and os.geteuid() == 0:
    log("installing Debian package dataset-fashion-mnist ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    ok = subprocess.run(["apt-get", "update", "-qq"], env=env).returncode == 0
    ok = ok and subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], env=env,
                               stdout=subprocess.DEVNULL).returncode == 0
    if ok and _has_files(DEBIAN_DIR):
      return DEBIAN_DIR
    log("apt-get could not install dataset-fashion-mnist; downloading the original files instead")
  os.makedirs(CACHE_DIR, exist_ok=True)
  for img, lbl, _ in FILES.values():
    for name in (img, lbl):
      dest = os.path.join(CACHE_DIR, name)
      if os.path.isfile(dest):
        continue
      log(f"downloading {URL}{name}")
      try:
        with urllib.request.urlopen(URL + name, timeout=60) as r, open(dest + ".part", "wb") as f:
          shutil.copyfileobj(r, f)
      except OSError as e:
        raise DataError(f"cannot download {URL}{name} ({e}); install Debian's dataset-fashion-mnist "
                        f"or place the four IDX files in {CACHE_DIR}") from None
      os.replace(dest + ".part", dest)
  for split in FILES:
    load_split(split, CACHE_DIR)
  return CACHE_DIR

