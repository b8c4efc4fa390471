"""Integer export: packing, manifest validation, the integer-only core, a tiny export vs fake quant."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_equal_but_for_near_ties, calibrated_model as _calibrated_model, run_cli
from mpq import export, intexec
from mpq.export import ExportError


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12])
def test_pack_round_trip(bits):
  rs = np.random.RandomState(bits)
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  for shape in [(3, 3, 5, 7), (13,), (1,)]:
    v = rs.randint(lo, hi + 1, size=shape)
    v.ravel()[0], v.ravel()[-1] = lo, hi
    stored = export.pack(v, bits)
    if bits <= 4:  # packed: 4 (2-bit) or 2 (3-, 4-bit) values per byte
      per = 4 if bits <= 2 else 2
      assert stored.dtype == np.uint8 and stored.size == -(-v.size // per)
    np.testing.assert_array_equal(export.unpack(stored, bits, shape), v)


def test_pack_layout_is_documented_order():
  # 4-bit: element 0 in the low nibble; -1 is 0xF in two's complement
  np.testing.assert_array_equal(export.pack(np.asarray([1, -1, 7, -8]), 4), [0xF1, 0x87])
  # 2-bit: element i at bits 2i..2i+1
  np.testing.assert_array_equal(export.pack(np.asarray([1, -2, 0, -1]), 2), [0b11001001])


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
  from configs import tiny
  from mpq.experiment import train_and_evaluate
  base = tmp_path_factory.mktemp("exp")
  c = tiny.get_config()
  train_and_evaluate(c, str(base / "float"), progress=False)
  c.quant.enabled, c.quant.w_bits, c.quant.a_bits = True, 8, 8
  c.init_from, c.num_train_steps = str(base / "float"), 16
  train_and_evaluate(c, str(base / "qat"), progress=False)
  out = run_cli("eval.py", f"--workdir={base / 'qat'}", "--mode=int", f"--export={base / 'int'}",
                f"--json={base / 'int.json'}", "--compare")
  assert out.returncode == 0, out.stderr
  return base, out.stdout


def test_tiny_export_agrees_with_fake_quant(tiny_export):
  base, stdout = tiny_export
  r = json.load(open(base / "int.json"))
  assert r["mode"] == "int" and r["num_examples"] == 1000
  assert r["agreement_with_fake_quant"] == 1.0
  # Bit-exact except where the fake-quant model's float32 value lies within float32 error of a
  # rounding tie: the first layer whose input differs at all must differ only at such ties.
  rows = r["compare"]
  first = next((row for row in rows[:-1] if row["mismatch"] > 0), None)
  assert rows[0]["max_lsb"] == 0
  if first is not None:
    assert first["near_tie"] == 1.0, first
  assert all(row["mismatch"] < 1e-3 for row in rows[:-1]), rows
  fq = run_cli("eval.py", f"--workdir={base / 'qat'}", f"--json={base / 'fq.json'}")
  assert fq.returncode == 0, fq.stderr
  assert json.load(open(base / "fq.json"))["accuracy"] == r["accuracy"]
  assert "conv1" in stdout and "LSB" in stdout  # the layer-by-layer table
  # the exported dir alone evaluates to the same accuracy (no checkpoint involved)
  out = run_cli("eval.py", f"--model={base / 'int'}", "--mode=int", f"--json={base / 'm.json'}")
  assert out.returncode == 0, out.stderr
  assert json.load(open(base / "m.json"))["accuracy"] == pytest.approx(r["accuracy"])


def test_tflite_export_runs_in_litert_from_the_cli(tiny_export):
  """eval.py --export --target=tflite --runtime: LiteRT's outputs equal mpq's emulation (0
  mismatches); --save_outputs holds exactly the uint8 images fed to the file, its int8 outputs and
  the labels; emulating litert-ref on the mpq export is an error naming the target to use."""
  from mpq import data as data_lib
  from mpq.export import tflite_target
  base, _ = tiny_export
  out = run_cli("eval.py", f"--workdir={base / 'qat'}", f"--export={base / 'tfl'}",
                "--target=tflite", "--runtime=litert-ref", "--num_examples=300",
                f"--save_outputs={base / 'rt.npz'}", f"--json={base / 'rt.json'}")
  assert out.returncode == 0, out.stderr
  r = json.load(open(base / "rt.json"))
  assert (r["runtime"], r["num_examples"], r["mismatches"]) == ("litert-ref", 300, 0)
  z = np.load(base / "rt.npz")
  ds = data_lib.load("fashion_mnist", None, 1, 300)
  want = next(data_lib.eval_batches(ds, 300))
  assert z["images"].dtype == np.uint8 and z["outputs"].dtype == np.int8
  np.testing.assert_array_equal(z["images"], want["pixels"])
  np.testing.assert_array_equal(z["labels"], want["label"])
  np.testing.assert_array_equal(z["outputs"],
                                tflite_target.run_litert(str(base / "tfl"), "litert-ref",
                                                         want["pixels"]))
  assert r["accuracy"] == pytest.approx(np.mean(z["outputs"].argmax(-1) == z["labels"]))
  from mpq.export.evaluate import emulated  # the CLI's one-line error for a path the file lacks
  with pytest.raises(ExportError, match="--emulate=litert-ref does not fit .* --target=tflite"):
    emulated(*export.load(str(base / "int")), "litert-ref", str(base / "int"))


def _calibrated_export(tmp_path, model_name, model_kwargs, estimator, w_bits, a_bits, rules=()):
  """A calibrated (untrained) quantized model, its export, and both models' outputs on 256 test
  images: (manifest, integer logit accumulators, fake-quant logits / output scale)."""
  model, images, image_shape = _calibrated_model(model_name, model_kwargs, estimator, w_bits,
                                                 a_bits, rules)
  manifest = export.export(model, image_shape, str(tmp_path / "int"))
  m2, tensors = export.load(str(tmp_path / "int"))
  assert m2 == manifest
  _, core, quantize = intexec.build(manifest, tensors)
  acc = np.asarray(core(quantize(images)), np.int64)
  fq = np.asarray(model(jnp.asarray(images), train=False), np.float64)
  return manifest, acc, fq / np.asarray(manifest["ops"][-1]["scale"])


def test_compare_locates_a_wrong_multiplier_and_does_not_call_it_a_tie(tmp_path):
  """`compare` finds the first layer fed by a corrupted requantization multiplier, and reports that
  its differences are not float32 rounding ties (what `near_tie` must tell apart)."""
  from mpq.export.compare import compare
  model, images, image_shape = _calibrated_model("cnn", {"width": 0.25}, "lsq", 4, 4)
  manifest = export.export(model, image_shape, str(tmp_path / "int"))
  _, tensors = export.load(str(tmp_path / "int"))
  rows = compare(model, manifest, tensors, images)
  assert all(r["max_lsb"] == 0 for r in rows[:-1]), rows
  key = next(op["multiplier"] for op in manifest["ops"] if op["name"] == "conv2->conv3")
  tensors = dict(tensors, **{key: np.asarray(tensors[key]) + (np.asarray(tensors[key]) >> 6)})
  rows = {r["layer"]: r for r in compare(model, manifest, tensors, images)}
  assert rows["conv1"]["max_lsb"] == 0 and rows["conv2"]["max_lsb"] == 0
  assert rows["conv3"]["mismatch"] > 0.01 and rows["conv3"]["near_tie"] < 0.05, rows["conv3"]


@pytest.mark.parametrize("model_name,kw,estimator,w_bits,a_bits,rules", [
    ("cnn", {"width": 0.25}, "lsq", 2, 2, ()),
    ("cnn", {"width": 0.25}, "lsq", 3, 4,
     (("conv1", {"w_bits": 8, "a_bits": 8}), ("fc1", {"w_bits": 2, "a_bits": 5}))),
    ("cnn", {"width": 0.25}, "tqt", 4, 4, ()),  # power-of-two scales: exact ties everywhere
    ("cnn", {"width": 0.25}, "ste", 8, 8, ()),  # affine activations with zero points
    ("cnn", {"width": 0.25}, "dbits", 3, 3, ()),
    ("resnet20", {"width": 8}, "lsq", 4, 4, ()),  # residual additions, global average pooling
])
def test_integer_model_equals_fake_quant_bit_for_bit(tmp_path, model_name, kw, estimator, w_bits,
                                                      a_bits, rules):
  """Every integer logit accumulator equals the fake-quant model's logit in output LSBs, so top-1
  agrees on every image (the exporter chooses single-rounding multipliers and evaluation uses the
  int32 bias; see mpq.intexec.requant_multiplier) -- except downstream of a value that the
  fake-quant model, in float32, finds within float32 error of a rounding tie: then the first layer
  whose input differs must differ only at such near-ties (`compare`), and top-1 still agrees.
  (The cnn ste W8A8 case meets one such value at conv2's input, 1 of 200,704.)"""
  manifest, acc, lsb = _calibrated_export(tmp_path, model_name, kw, estimator, w_bits, a_bits, rules)
  if np.array_equal(np.round(lsb).astype(np.int64), acc):
    assert np.max(np.abs(lsb - acc)) < 1e-3 * max(1.0, np.max(np.abs(acc)))
  else:
    model, images, _ = _calibrated_model(model_name, kw, estimator, w_bits, a_bits, rules)
    assert_equal_but_for_near_ties(model, tmp_path / "int", images, np.round(lsb), acc)
  scale = np.asarray(manifest["ops"][-1]["scale"])  # per-class scales (per-channel weights)
  np.testing.assert_array_equal((lsb * scale).argmax(-1), (acc * scale).argmax(-1))
  if model_name == "resnet20":
    kinds = [op["op"] for op in manifest["ops"]]
    assert kinds.count("add") == 9 and kinds.count("sum_pool") == 1 and "shift" in kinds


def test_mobilenet_exports_agree_on_top1_and_run_in_litert_and_ort_as_emulated(tmp_path):
  """MobileNetV2 (width 0.35), random weight bits 2-8 per layer, 8-bit activations.
  mpq target: ReLU6 before global pooling is clamped on the accumulator at round(6 / scale),
  which can move a pooled value across a rounding boundary; top-1 still agrees on every image.
  tflite target: depthwise convs, ReLU6 as the grid's top at int8's top, residual ADDs without an
  activation, MEAN of the int8 tensor: 0 mismatching logits in litert-ref, litert-ruy and
  litert-auto (XNNPACK's depthwise convs, ADD and QUANTIZE int8 -> int8).
  onnx target: grouped QLinearConv, QLinearAdd, QLinearGlobalAveragePool: 0 mismatching logits in
  ONNX Runtime."""
  import random
  import ml_collections
  from configs import tiny
  from mpq import data as data_lib, models
  from mpq.export import tflite_target
  from mpq.export.evaluate import executor_outputs
  from mpq.quant import calibration, model as quant_model
  rnd = random.Random(1)
  c = tiny.get_config()
  c.model, c.model_kwargs = "mobilenet_v2", ml_collections.ConfigDict({"width": 0.35})
  c.quant.enabled, c.quant.w_bits, c.quant.a_bits = True, 8, 8
  fm = models.build("mobilenet_v2", 10, (28, 28, 1), width=0.35)
  c.quant.rules = tuple((p, {"w_bits": rnd.randint(2, 8)}) for p, l in
                        models.layer_table(fm).items() if l.kind in ("conv", "conv_bn", "dense"))
  ds = data_lib.load(c.dataset, None, 256, 256)
  model, _ = quant_model.build(c, ds.num_classes, ds.image_shape)
  x = next(data_lib.eval_batches(ds, 256, split="train"))["image"]
  calibration.calibrate(model, [x], act_method="percentile", weight_method="max")
  batch = next(data_lib.eval_batches(ds, 256))
  # the mpq target
  manifest = export.export(model, ds.image_shape, str(tmp_path / "int"))
  _, core, quantize = intexec.build(*export.load(str(tmp_path / "int")))
  acc = np.asarray(core(quantize(batch["image"])), np.float64)
  scale = np.asarray(manifest["ops"][-1]["scale"])
  lsb = np.asarray(model(jnp.asarray(batch["image"]), train=False), np.float64) / scale
  np.testing.assert_array_equal((lsb * scale).argmax(-1), (acc * scale).argmax(-1))
  assert np.mean(np.abs(lsb - acc)) < 1e-2 * np.mean(np.abs(acc))  # a few LSBs of thousands
  kinds = [op["op"] for op in manifest["ops"]]
  assert "add" in kinds and "clamp" in kinds and "sum_pool" in kinds
  # the tflite target
  export.export(model, ds.image_shape, str(tmp_path / "tfl"), target="tflite", calibration=x)
  manifest, tensors = export.load(str(tmp_path / "tfl"))
  kinds = [op["op"] for op in manifest["ops"]]
  assert "add" in kinds and "mean" in kinds and any(op.get("groups", 1) > 1
                                                     for op in manifest["ops"])
  for family in tflite_target.FAMILIES:
    got = tflite_target.run_litert(str(tmp_path / "tfl"), family, batch["pixels"])
    want = executor_outputs(*tflite_target.emulate(manifest, tensors, family), batch["pixels"])
    assert int(np.sum(got != want)) == 0, f"{family}: {np.sum(got != want)} outputs differ"
  # the onnx target
  from mpq.export import onnx_target
  export.export(model, ds.image_shape, str(tmp_path / "onnx"), target="onnx", calibration=x)
  manifest, tensors = export.load(str(tmp_path / "onnx"))
  kinds = [op["op"] for op in manifest["ops"]]
  assert "add_grid" in kinds and "mean" in kinds
  got = onnx_target.run_ort(str(tmp_path / "onnx"), "ort", onnx_target.file_input(batch["pixels"]))
  want = executor_outputs(manifest, tensors, batch["pixels"])
  assert int(np.sum(got != want)) == 0, f"ort: {np.sum(got != want)} outputs differ"


def test_integer_core_has_no_float_ops(tiny_export):
  base, _ = tiny_export
  manifest, tensors = export.load(str(base / "int"))
  _, core, _ = intexec.build(manifest, tensors)
  shape = manifest["input"]["shape"]
  jaxpr = jax.make_jaxpr(core)(jnp.zeros((2, *shape), jnp.int32))

  def dtypes(jx):
    for eqn in jx.eqns:
      for v in eqn.outvars:
        yield str(v.aval.dtype)
      for p in eqn.params.values():
        if hasattr(p, "jaxpr"):
          yield from dtypes(p.jaxpr)

  found = set(dtypes(jaxpr.jaxpr))
  assert found and not any(d.startswith(("float", "bfloat", "complex")) for d in found), found
  assert {"int32"} <= found


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(version=99), "version 99 is not 'mpq-int' version 1"),
    (lambda m: m["ops"][1].update(op="conv3d"), "field 'op' must be one of"),
    (lambda m: m["ops"][1].update(w_bits=1), "field 'w_bits' must be an integer from 2 to 16"),
    (lambda m: m["ops"][1].update(weight="nope"), "field 'weight' names no tensor"),
    (lambda m: next(o for o in m["ops"] if o["op"] == "requantize").update(clamp=[5, 1]),
     "field 'clamp' must be [lo, hi]"),
])
def test_manifest_validation_errors(tiny_export, tmp_path, edit, message):
  base, _ = tiny_export
  d = tmp_path / "m"
  shutil.copytree(base / "int", d)
  m = json.load(open(d / "manifest.json"))
  edit(m)
  json.dump(m, open(d / "manifest.json", "w"))
  with pytest.raises(ExportError, match=message.replace("[", r"\[").replace("(", r"\(")):
    export.load(str(d))
  out = run_cli("eval.py", f"--model={d}", "--mode=int")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def test_export_refuses_float_checkpoints(tmp_path):
  from configs import tiny
  from mpq.experiment import train_and_evaluate
  c = tiny.get_config()
  c.num_train_steps = 2
  train_and_evaluate(c, str(tmp_path / "f"), progress=False)
  out = run_cli("eval.py", f"--workdir={tmp_path / 'f'}", "--mode=int")
  assert out.returncode == 2 and "holds a float model" in out.stderr
