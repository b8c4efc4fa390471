import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _share_jax_compilation_cache() -> None:
  """One persistent JAX compilation cache for the whole test run: this process, the xdist workers
  it starts and every CLI run (`run_cli`) inherit it through the environment, so a program that
  many tests compile alike (the tiny config's train step, an exported model's executor, eager ops
  of a given shape) is compiled once. Measured: exporting MobileNetV2 33 s cold, 11 s warm. A new
  empty directory per run (removed at exit), so no result depends on an earlier run.
  `mpq.train.compile_count` counts loads from this cache as compilations."""
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # set by the run that started this process
    return
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  path = tempfile.mkdtemp(prefix="mpq-test-jax-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


_share_jax_compilation_cache()


def run_cli(*args, env=None, timeout=300):
  """Runs `python <args>` in the repo root; returns CompletedProcess with text output."""
  e = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True,
                        timeout=timeout)


def snapshot(d):
  """Every file under `d` with its size, mtime and bytes (to show that a command wrote nothing)."""
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        out[p] = (st.st_size, st.st_mtime_ns, fh.read())
  return out


@pytest.fixture
def tiny_config():
  from configs import tiny
  return tiny.get_config()


# Tiny cnn (width 0.25) cases that every export target is tested on, against its runtime:
# name -> (estimator, w_bits, a_bits, rules).
TINY_CASES = {
    "w8a8_lsq": ("lsq", 8, 8, ()),
    "w4a4_tqt": ("tqt", 4, 4, ()),  # power-of-two scales: exact ties in every requantization
    "w2a2_lsq": ("lsq", 2, 2, ()),
    "w3a3_ste": ("ste", 3, 3, ()),  # affine activation grids with zero points
    "mixed": ("lsq", 8, 8, (("conv1", {"w_bits": 3, "estimator": "ste"}),
                            ("conv2", {"w_bits": 5, "a_bits": 7, "estimator": "tqt"}),
                            ("conv3", {"w_bits": 2, "a_bits": 3, "estimator": "lsq"}),
                            ("fc1", {"w_bits": 7, "a_bits": 5, "estimator": "noise"}),
                            ("head", {"w_bits": 4, "a_bits": 2, "estimator": "dbits"}))),
}
_TINY_MODELS: dict = {}


def tiny_case_model(case):
  """calibrated_model("cnn", width 0.25, *TINY_CASES[case]), built once per test session (the
  export tests of every target share it; exporting does not change a model)."""
  if case not in _TINY_MODELS:
    _TINY_MODELS[case] = calibrated_model("cnn", {"width": 0.25}, *TINY_CASES[case])
  return _TINY_MODELS[case]


def calibration_images(n=512):
  """The first `n` training images (float, normalised): what exports calibrate their output on."""
  from mpq import data as data_lib
  return next(data_lib.eval_batches(data_lib.load("fashion_mnist", None, n, 1), n,
                                    split="train"))["image"]


def calibrated_model(model_name, model_kwargs, estimator, w_bits, a_bits, rules=()):
  """A calibrated (untrained) quantized model of configs/tiny.py's settings, 256 test images
  (float, normalised) and the image shape."""
  import ml_collections
  from configs import tiny
  from mpq import data as data_lib
  from mpq.quant import calibration, model as quant_model
  c = tiny.get_config()
  c.model, c.model_kwargs = model_name, ml_collections.ConfigDict(model_kwargs)
  c.quant.enabled, c.quant.estimator, c.quant.w_bits, c.quant.a_bits = True, estimator, w_bits, a_bits
  c.quant.rules = rules
  ds = data_lib.load(c.dataset, None, 512, 256)
  model, _ = quant_model.build(c, ds.num_classes, ds.image_shape)
  images = next(data_lib.eval_batches(ds, 256))["image"]
  calibration.calibrate(model, [next(data_lib.eval_batches(ds, 256, split="train"))["image"]],
                        act_method="percentile", weight_method="mse")
  return model, images, ds.image_shape


def resnet_case_export(out, target, rule_of, seed, extra_rules=()):
  """Exports to `out` with `target` a calibrated (untrained) quantized resnet20 (width 8) of
  configs/tiny.py's settings whose every conv and addition takes the rule `rule_of(rnd, layer)`
  (`rnd`: `random.Random(seed)`, layers in `models.layer_table` order), then `extra_rules`;
  calibrated (percentile activations, max weights) and its output grid on the first 256 test
  images. Returns (out, model, manifest, tensors)."""
  import random
  import ml_collections
  from configs import tiny
  from mpq import data as data_lib, export, models
  from mpq.quant import calibration, model as quant_model
  rnd = random.Random(seed)
  fm = models.build("resnet20", 10, (28, 28, 1), width=8)
  c = tiny.get_config()
  c.model, c.model_kwargs = "resnet20", ml_collections.ConfigDict({"width": 8})
  c.quant.enabled = True
  c.quant.rules = tuple((p, rule_of(rnd, l)) for p, l in models.layer_table(fm).items()
                        if l.kind in ("conv_bn", "add")) + tuple(extra_rules)
  model, _ = quant_model.build(c, 10, (28, 28, 1))
  x = next(data_lib.eval_batches(data_lib.load("fashion_mnist", None, 1, 256), 256))["image"]
  calibration.calibrate(model, [x], act_method="percentile", weight_method="max")
  export.export(model, (28, 28, 1), str(out), target=target, calibration=x)
  return out, model, *export.load(str(out))


def assert_equal_but_for_near_ties(model, model_dir, images, got, want, max_images=0.01):
  """The integer executor's `got` equals the fake-quant model's `want` ([images, ...]) exactly,
  except in images downstream of a value that the fake-quant model, in float32, finds within
  float32 error of a rounding tie (the executor rounds the exact value): then the first layer
  whose input differs (`mpq.export.compare`) differs only at such near-ties, and at most
  `max_images` of the images differ at all."""
  from mpq import export
  from mpq.export.compare import compare
  differ = np.any(np.reshape(got != want, (len(got), -1)), axis=-1)
  if not differ.any():
    return
  rows = compare(model, *export.load(str(model_dir)), images)
  first = next((row for row in rows[:-1] if row["mismatch"] > 0), None)
  assert first is not None and first["near_tie"] == 1.0, rows
  assert differ.mean() <= max_images, (int(differ.sum()), rows)
