import gzip
import os

import numpy as np
import pytest

from mpq import data
from mpq.data import fashion_mnist
from mpq.data.idx import read_idx, write_idx
from mpq.errors import DataError


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
  a = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
  p = tmp_path / f"x-idx3-ubyte{suffix}"
  write_idx(p, a)
  np.testing.assert_array_equal(read_idx(p, expect_shape=(7, 5, 3)), a)


def test_idx_header_bytes(tmp_path):
  p = tmp_path / "l"
  write_idx(p, np.arange(3, dtype=np.uint8))
  assert p.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 0, 1, 2])


def test_idx_truncated_names_file(tmp_path):
  p = tmp_path / "train-images-idx3-ubyte"
  write_idx(p, np.zeros((10, 4, 4), np.uint8))
  p.write_bytes(p.read_bytes()[:-5])
  with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
    read_idx(p)


def test_idx_truncated_gzip(tmp_path):
  p = tmp_path / "t.gz"
  write_idx(p, np.zeros((100, 28, 28), np.uint8))
  p.write_bytes(p.read_bytes()[:50])
  with pytest.raises(DataError, match="t.gz"):
    read_idx(p)


def test_idx_bad_magic_and_shape(tmp_path):
  p = tmp_path / "bad"
  p.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))
  with pytest.raises(DataError, match="not an unsigned-byte IDX"):
    read_idx(p)
  write_idx(p, np.zeros((3,), np.uint8))
  with pytest.raises(DataError, match=r"expected \(4,\)"):
    read_idx(p, expect_shape=(4,))


def test_real_fashion_mnist():
  x, y = fashion_mnist.load_split("train")
  assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8
  assert np.bincount(y).tolist() == [6000] * 10  # the dataset is balanced
  xt, yt = fashion_mnist.load_split("test")
  assert xt.shape == (10000, 28, 28, 1) and np.bincount(yt).tolist() == [1000] * 10
  assert abs(x.mean() / 255 - 0.2860) < 1e-3  # the published mean pixel value


def test_missing_dataset_dir(tmp_path):
  with pytest.raises(DataError, match=r"\(--config.data_dir\): it lacks train-images-idx3-ubyte.gz"):
    fashion_mnist.find_dir(str(tmp_path))
  with pytest.raises(DataError, match="no such directory"):
    fashion_mnist.find_dir(str(tmp_path / "none"))


def test_named_environment_directory_is_used_or_rejected(tmp_path, monkeypatch):
  monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
  installed = fashion_mnist.find_dir()
  monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))  # empty: rejected, not skipped
  with pytest.raises(DataError, match=r"\(\$MPQ_FASHION_MNIST_DIR\): it lacks"):
    fashion_mnist.find_dir()
  for img, lbl, _ in fashion_mnist.FILES.values():
    for f in (img, lbl):
      os.symlink(os.path.join(installed, f), tmp_path / f)
  assert fashion_mnist.find_dir() == str(tmp_path)


def _small(n=100):
  rng = np.random.default_rng(1)
  src = data.ArraySource(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
                         np.arange(n, dtype=np.int32))
  return data.Dataset("toy", src, src, 10, (8, 8, 1), (0.5,), (0.25,))


def test_train_order_epochs_and_resume():
  d = _small(100)
  ds = data.train_dataset(d, 10, seed=3, num_steps=30)
  batches = list(data.iterate(ds))
  assert len(batches) == 30
  labels = [b["label"] for b in batches]
  for e in range(3):  # each epoch sees every example exactly once
    assert sorted(np.concatenate(labels[10 * e:10 * e + 10]).tolist()) == list(range(100))
  assert not np.array_equal(np.concatenate(labels[:10]), np.concatenate(labels[10:20]))
  resumed = list(data.iterate(data.train_dataset(d, 10, seed=3, num_steps=30), start=17))
  for a, b in zip(batches[17:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  other = list(data.iterate(data.train_dataset(d, 10, seed=4, num_steps=3)))
  assert not np.array_equal(other[0]["label"], labels[0])
  # normalisation: (x/255 - mean) / std
  raw = d.train.images[batches[0]["label"]].astype(np.float32)
  np.testing.assert_allclose(batches[0]["image"], (raw / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)


def test_process_shards_are_disjoint():
  d = _small(100)
  seen = []
  for p in range(2):
    ds = data.train_dataset(d, 10, seed=0, num_steps=10, process_index=p, process_count=2)
    seen.append(set(np.concatenate([b["label"] for b in data.iterate(ds)]).tolist()))
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 100


def test_augment_crop_flip_deterministic():
  d = _small(40)
  a = list(data.iterate(data.train_dataset(d, 8, 0, 4, augment="crop_flip")))
  b = list(data.iterate(data.train_dataset(d, 8, 0, 4, augment="crop_flip"), start=2))
  np.testing.assert_array_equal(a[2]["image"], b[0]["image"])
  assert a[0]["image"].shape == (8, 8, 8, 1)


def test_eval_batches_cover_all_once():
  d = _small(23)
  batches = list(data.eval_batches(d, 10))
  assert len(batches) == 3 and all(b["image"].shape[0] == 10 for b in batches)
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  assert labels.tolist() == list(range(23))


def test_tfds_source_with_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24):
    d = data.load("tfds:cifar10")
    assert d.num_classes == 10 and d.image_shape == (32, 32, 3) and len(d.train) == 24
    ds = data.train_dataset(d, 8, seed=0, num_steps=3, augment="crop_flip")
    b = next(data.iterate(ds))
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["label"].max() < 10


def test_unknown_dataset():
  with pytest.raises(DataError, match="unknown dataset"):
    data.load("imagenet")
