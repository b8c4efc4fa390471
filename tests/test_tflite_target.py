"""The tflite export target against LiteRT itself: for each kernel family, the exported .tflite run
by LiteRT gives exactly the outputs that mpq's executor computes when it emulates that family
(`mpq.export.tflite_target.emulate`): 0 mismatching int8 logits. Also the file's interface (uint8
image in, int8 logits out, dynamic batch) and the one-line errors of what it cannot express."""

import json
import os

import numpy as np
import pytest

from conftest import (TINY_CASES, calibrated_model, calibration_images, resnet_case_export,
                      run_cli, snapshot, tiny_case_model)
from mpq import data as data_lib, export
from mpq.export import tflite_builder as tb, tflite_target
from mpq.export.evaluate import executor_outputs
from mpq.export import exporter
from mpq.export.exporter import ExportError

NUM_IMAGES = 512

# conftest.TINY_CASES, plus w2a2_lsq with weights='exact' (int8 weights scaled by 2^k,
# `tflite_target.weight_layout`). Weights of 3-4 bits are INT4 tensors (CONV_2D, FULLY_CONNECTED),
# of 2 bits INT2 (FULLY_CONNECTED) or INT4 (CONV_2D); activations below 8 bits are int8 tensors
# whose grid top is int8's top (`Writer.storage_offset`).
CASES = {**{k: k for k in TINY_CASES}, "w2a2_lsq_exact": "w2a2_lsq"}


def _pixels(n=NUM_IMAGES):
  ds = data_lib.load("fashion_mnist", None, 1, n)
  return next(data_lib.eval_batches(ds, n))


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param) / "tfl"
  options = {"weights": "exact"} if request.param.endswith("_exact") else None
  model, _, shape = tiny_case_model(CASES[request.param])
  export.export(model, shape, str(out), target="tflite", calibration=calibration_images(),
                options=options)
  manifest, tensors = export.load(str(out))
  return request.param, out, model, manifest, tensors


@pytest.mark.parametrize("family", tflite_target.FAMILIES)
def test_litert_runs_the_export_as_mpq_emulates_it(exported, family):
  name, out, _, manifest, tensors = exported
  images = _pixels()["pixels"]
  got = tflite_target.run_litert(str(out), family, images)
  m, t = tflite_target.emulate(manifest, tensors, family)
  want = executor_outputs(m, t, images)
  assert got.dtype == np.int8 and got.shape == (NUM_IMAGES, 10)
  assert int(np.sum(got != want)) == 0, f"{name} {family}: {np.sum(got != want)} outputs differ"


def test_the_families_differ_so_the_emulation_matters(exported):
  """The families' rules give different int8 logits on these models (XNNPACK's float32 rounding
  where it takes an op, ruy's ties toward +inf): comparing with another family's emulation, or
  with mpq's own target, would fail."""
  name, out, _, manifest, tensors = exported
  images = _pixels()["pixels"]
  outs = {f: executor_outputs(*tflite_target.emulate(manifest, tensors, f), images)
          for f in tflite_target.FAMILIES}
  assert np.sum(outs["litert-ref"] != outs["litert-auto"]) + np.sum(
      outs["litert-ref"] != outs["litert-ruy"]) > 0, name


def test_file_interface_and_delegation(exported):
  """uint8 NHWC image in (the pixel grid: scale 1/(255 std), zero point round(255 mean)), int8
  logits out, the batch dynamic; XNNPACK (`litert-auto`) takes every op but the uint8 QUANTIZE."""
  _, out, _, manifest, _ = exported
  data = open(os.path.join(out, "model.tflite"), "rb").read()
  interp = tb.interpreter(data, "litert-ref")
  (inp,), (outp,) = interp.get_input_details(), interp.get_output_details()
  assert inp["dtype"] == np.uint8 and list(inp["shape_signature"]) == [-1, 28, 28, 1]
  scale, zero_point = data_lib.sources.pixel_grid("fashion_mnist", 1)
  assert inp["quantization"] == (pytest.approx(scale), zero_point) and zero_point == 73
  assert outp["dtype"] == np.int8 and list(outp["shape_signature"]) == [-1, 10]
  assert outp["quantization"][0] == pytest.approx(manifest["ops"][-1]["scale"][0])
  assert outp["quantization"][1] == manifest["ops"][-1]["zero_point"]
  taken, left = tb.delegated_ops(data, "litert-auto")
  weights = {op["name"]: op["w_bits"] for op in manifest["ops"] if "w_bits" in op}
  int4_convs = sum(1 for k, b in weights.items() if k.startswith("conv") and b <= 4)
  assert left == ["QUANTIZE"] + ["CONV_2D"] * int4_convs  # XNNPACK takes no INT4 conv
  assert taken.count("CONV_2D") == 3 - int4_convs
  assert manifest["target"] == "tflite"
  assert sorted(os.listdir(out)) == ["manifest.json", "model.tflite", "weights.npz"]
  meta = tflite_target.read_metadata(data)
  assert meta["verified_with"].startswith("ai-edge-litert ") and "NHWC" in meta["input"]
  assert "zero_point 73" in meta["input"] and set(json.loads(meta["bits"])) == {
      op["name"] for op in manifest["ops"] if "w_bits" in op}


def test_int8_logits_track_the_fake_quant_model(exported):
  """At 8-bit activations the int8 logits (litert-ref) differ from the fake-quant model only by
  the output grid's rounding and LiteRT's multipliers: top-1 agrees on at least 97% of the images
  (calibrated, untrained models, whose logits lie close together). Below 8 bits LiteRT's double
  rounding moves many values by an LSB (see the README), so no such bound holds there."""
  import jax.numpy as jnp
  name, _, model, manifest, tensors = exported
  if name != "w8a8_lsq":
    return
  batch = _pixels()
  q = executor_outputs(manifest, tensors, batch["pixels"]).astype(np.float64)
  last = manifest["ops"][-1]
  fq = np.asarray(model(jnp.asarray(batch["image"]), train=False), np.float64)
  lsb = np.abs(fq / last["scale"][0] + last["zero_point"] - q)
  assert np.mean(fq.argmax(-1) == q.argmax(-1)) >= 0.97, (name, lsb.max())


def test_float_twin_is_the_same_network_in_float(exported):
  """`to_float_tflite`: the latency reference of the deploy benchmark. A float32 file (normalised
  NHWC image in, float logits out, dynamic batch, no quantized tensor and no QUANTIZE/MAXIMUM), which
  XNNPACK takes whole; its logits are the network's with dequantized weights and float activations,
  so at W8A8 its top-1 agrees with the fake-quant model's on at least 97% of the images."""
  import jax.numpy as jnp
  name, _, model, manifest, tensors = exported
  if name != "w8a8_lsq":
    return
  twin = tflite_target.to_float_tflite(manifest, tensors)
  interp = tb.interpreter(twin, "litert-auto")
  (inp,), (outp,) = interp.get_input_details(), interp.get_output_details()
  assert inp["dtype"] == outp["dtype"] == np.float32
  assert list(inp["shape_signature"]) == [-1, 28, 28, 1] and list(outp["shape_signature"]) == [-1, 10]
  assert all(t["dtype"] in (np.float32, np.int32) for t in interp.get_tensor_details())
  taken, left = tb.delegated_ops(twin, "litert-auto")
  assert left == [] and "QUANTIZE" not in taken and "MAXIMUM" not in taken, (taken, left)
  batch = _pixels(256)
  interp.resize_tensor_input(inp["index"], [256, 28, 28, 1])
  interp.allocate_tensors()
  (got,) = tb.invoke(interp, [np.asarray(batch["image"], np.float32)])
  fq = np.asarray(model(jnp.asarray(batch["image"]), train=False))
  assert got.shape == fq.shape and np.all(np.isfinite(got))
  assert np.mean(got.argmax(-1) == fq.argmax(-1)) >= 0.97


def test_exact_weights_make_litert_equal_the_fake_quant_model(exported):
  """At W2A2 LiteRT's double rounding (SRDHM, then a short rounding shift) moves 10-20% of the
  layer inputs by one LSB against the fake-quant model; with weights='exact' (2-bit weights
  stored int8 times 2^6) every layer input equals the fake-quant model's, and only the int8 logits'
  own rounding differs. Both exports run in LiteRT exactly as emulated (the test above)."""
  from mpq.export.compare import compare
  name, _, model, manifest, tensors = exported
  if not name.startswith("w2a2"):
    return
  images = _pixels(256)["image"]
  rows = compare(model, manifest, tensors, images)
  layers = {r["layer"]: r["mismatch"] for r in rows}
  if name.endswith("_exact"):
    assert all(v == 0 for k, v in layers.items() if k != "logits"), rows
    assert layers["logits"] < 0.01, rows
    ops = [op for op in manifest["ops"] if "w_bits" in op]
    assert all(op["w_bits"] == 8 and op["w_bits_trained"] == 2 and op["weight_shift"] >= 5
               for op in ops), ops
  else:
    assert max(layers["conv3"], layers["fc1"]) > 0.05, rows


def test_what_tflite_cannot_express_is_refused_with_one_line(tmp_path):
  """A 16-bit unsigned activation grid fits neither int8 nor int16 with zero point 0 (TFLite's
  16x8 mode): an export error naming the op; nothing is written; likewise weights over 8 bits.
  Grids of 2-8 bits all fit int8: a signed one below 8 bits is the kernel's output (fused NONE,
  its top at int8's top) and a MAXIMUM with its bottom; an unsigned one a fused RELU. An int16
  grid below 16 bits is clamped by the kernel's RELU or a MAXIMUM, and a MINIMUM with its top."""
  import ml_collections
  from configs import tiny
  from mpq.export.tflite_builder import TFLiteBuilder
  from mpq.quant import model as quant_model
  c = tiny.get_config()  # uncalibrated: the refusal comes before any number matters
  c.model, c.model_kwargs = "cnn", ml_collections.ConfigDict({"width": 0.25})
  c.quant.enabled, c.quant.w_bits, c.quant.a_bits = True, 8, 8
  c.quant.rules = (("conv2", {"a_bits": 16}),)
  shape = (28, 28, 1)
  model, _ = quant_model.build(c, 10, shape)
  out = tmp_path / "tfl"
  with pytest.raises(ExportError, match=r"layer 'conv1': its output grid \[0, 65535\] \(zero "
                     r"point 0\) fits neither int8 nor int16 storage \(TFLite's 16x8 mode"):
    export.export(model, shape, str(out), target="tflite", calibration=_pixels(64)["image"])
  assert not out.exists()
  c.quant.rules = (("conv2", {"w_bits": 12}),)
  model, _ = quant_model.build(c, 10, shape)
  with pytest.raises(ExportError, match=r"layer 'conv2': weights of 12 bits do not fit int8; the "
                     "tflite target takes at most 8-bit weights"):
    export.export(model, shape, str(out), target="tflite", calibration=_pixels(64)["image"])
  assert not out.exists()
  r = {"op": "requantize", "name": "a->b", "output": "t", "clamp": [-8, 7], "zero_point": 0,
       "bits": 4, "output_scale": 0.5}
  w = tflite_target.Writer(TFLiteBuilder(), {"ops": []}, {}, {"t": (1, 4)})
  raw, act = w.fused_output(r)
  assert act == "NONE" and w.offsets["t"] == 120 and w.pending["t"][2] == [("MAXIMUM", -8 + 120)]
  w.finish_output("t")
  assert not w.pending
  w = tflite_target.Writer(TFLiteBuilder(), {"ops": []}, {}, {"t": (1, 4)})
  assert w.fused_output(dict(r, clamp=[0, 7]))[1] == "RELU"  # a 3-bit grid after a ReLU
  assert w.offsets["t"] == 120 and not w.pending
  w = tflite_target.Writer(TFLiteBuilder(), {"ops": []}, {}, {"t": (1, 4)})
  r12 = dict(r, clamp=[-2048, 2047], bits=12)  # a signed 12-bit grid: int16, offset 0
  assert w.fused_output(r12, wide=True)[1] == "NONE" and w.dtypes["t"] == "int16"
  assert w.offsets["t"] == 0 and w.pending["t"][2] == [("MAXIMUM", -2048), ("MINIMUM", 2047)]
  w = tflite_target.Writer(TFLiteBuilder(), {"ops": []}, {}, {"t": (1, 4)})
  # a 16x8 kernel onto an unsigned 7-bit grid: int16 with a RELU, then QUANTIZE to int8 (whose
  # saturation at 127 is the grid's top); onto an unsigned 8-bit one the saturation at -128 is
  # the bottom too
  assert w.fused_output(dict(r, clamp=[0, 127], bits=7), wide=True)[1] == "RELU"
  assert w.dtypes["t"] == "int8" and w.pending["t"][2] == [("QUANTIZE", None)]
  w = tflite_target.Writer(TFLiteBuilder(), {"ops": []}, {}, {"t": (1, 4)})
  assert w.fused_output(dict(r, clamp=[0, 255], bits=8), wide=True)[1] == "NONE"
  assert w.offsets["t"] == -128 and w.pending["t"][2] == [("QUANTIZE", None)]
  acc = exporter.Acc("s/add", "t", np.asarray([2.0 ** -15]), 1e6,
                     {"op": "add", "a_bits": [8, 8], "input_scales": [0.1, 0.2], "left_shift": 20})
  with pytest.raises(ValueError, match=r"an addition lowered as TFLite's int8 ADD \(left shift "
                     r"20\) cannot output onto a 12-bit grid"):
    tflite_target.requantizer(acc, 0.01, 100, {"zero_point": 0, "clamp": [0, 4095], "bits": 12})
  acc = acc._replace(producer={"op": "add", "a_bits": [12, 12], "input_scales": [0.25, 0.5],
                               "left_shift": 15})
  with pytest.raises(ValueError, match="an int16 ADD whose input and output scales are all powers "
                     "of two takes LiteRT's shift-only path"):
    tflite_target.requantizer(acc, 0.125, 100, {"zero_point": 0, "clamp": [0, 4095], "bits": 12})


def test_a_model_without_the_pixel_grid_is_refused(tmp_path):
  from configs import tiny
  from mpq.quant import calibration, model as quant_model
  c = tiny.get_config()
  c.quant.enabled, c.input_norm = True, "channel"
  ds = data_lib.load(c.dataset, None, 256, 1, "channel")
  model, _ = quant_model.build(c, ds.num_classes, ds.image_shape)
  x = next(data_lib.eval_batches(ds, 256, split="train"))["image"]
  calibration.calibrate(model, [x], act_method="max", weight_method="max")
  with pytest.raises(ExportError, match=r"conv1: export target 'tflite' takes the uint8 image.*"
                     r"input_norm=pixel"):
    export.export(model, ds.image_shape, str(tmp_path / "tfl"), target="tflite", calibration=x)
  assert not (tmp_path / "tfl").exists()


def test_corrupt_or_missing_tflite_is_a_clear_error(exported, tmp_path):
  _, out, _, _, _ = exported
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in ("manifest.json", "weights.npz"):
    (bad / f).write_bytes((out / f).read_bytes())
  with pytest.raises(ExportError, match="holds no model.tflite"):
    tflite_target.run_litert(str(bad), "litert-ref", _pixels(4)["pixels"])
  (bad / "model.tflite").write_bytes((out / "model.tflite").read_bytes()[:300])
  with pytest.raises(ExportError, match="is not a valid .tflite model"):
    tflite_target.run_litert(str(bad), "litert-ref", _pixels(4)["pixels"])


def test_pixel_grid_holds_every_pixel_exactly():
  """For every dataset with recorded statistics (and the default ones), normalised pixels
  `(p - z) s` quantize back to `p` exactly, and the pixel quantizer passes them unchanged."""
  import jax.numpy as jnp
  from mpq.quant.quantizer import Quantizer
  p = np.arange(256, dtype=np.uint8)
  for name in [*data_lib.sources.STATS, "tfds:unknown"]:
    for c in (1, 3):
      s, z = data_lib.sources.pixel_grid(name, c)
      x = (p.astype(np.float32) - np.float32(z)) * np.float32(s)
      np.testing.assert_array_equal(np.floor(x / np.float32(s) + np.float32(0.5)) + z, p)
      q = Quantizer("conv1", "act", "pixel", 4.0, grid=(s, z))  # bits: its own
      np.testing.assert_array_equal(np.asarray(q(jnp.asarray(x))), x)
      g = q.integer_grid()
      assert (float(g["scale"]), int(g["zero_point"]), int(g["bits"]), g["signed"]) == (
          pytest.approx(s), z, 8, False)


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory):
  """resnet20 (width 8) with random bits 2-8 per conv and addition input, an 8-bit head: residual
  ADDs, a block input feeding a conv and a shortcut (QUANTIZE int8 -> int8 onto the second grid),
  global average pooling as MEAN of the int8 tensor; the additions' inputs are signed grids, below
  8 bits clamped at their bottom by a MAXIMUM."""
  return resnet_case_export(
      tmp_path_factory.mktemp("resnet") / "tfl", "tflite",
      lambda rnd, _: {"w_bits": rnd.randint(2, 8), "a_bits": rnd.randint(2, 8),
                      "estimator": rnd.choice(["lsq", "tqt", "ste"])}, seed=0)


@pytest.mark.parametrize("family", tflite_target.FAMILIES)
def test_resnet20_runs_in_litert_as_mpq_emulates_it(resnet_export, family):
  out, _, manifest, tensors = resnet_export
  kinds = [op["op"] for op in manifest["ops"]]
  assert kinds.count("add") == 9 and "mean" in kinds and "requantize_grid" in kinds
  assert min(min(op["a_bits"]) for op in manifest["ops"] if op["op"] == "add") < 8
  taken, left = tb.delegated_ops((out / "model.tflite").read_bytes(), family)
  assert "MAXIMUM" in left, left  # a signed grid below 8 bits
  if family == "litert-auto":  # XNNPACK's own ADD and QUANTIZE int8 -> int8 kernels run
    assert taken.count("ADD") == 9 and "QUANTIZE" in taken, taken
  images = _pixels()["pixels"]
  got = tflite_target.run_litert(str(out), family, images)
  want = executor_outputs(*tflite_target.emulate(manifest, tensors, family), images)
  assert int(np.sum(got != want)) == 0, f"{family}: {np.sum(got != want)} outputs differ"




def test_resnet20_float_twin_is_written_and_runs_whole_in_xnnpack(resnet_export):
  """The float twin of a model with residual ADDs, QUANTIZE int8 -> int8 and MEAN (the deploy
  benchmark's resnet20 rows): the writer skips the int8 storage checks of MEAN and ADD (a float
  tensor stores no integers), drops the QUANTIZE and MAXIMUM ops, and XNNPACK takes every op."""
  _, _, manifest, tensors = resnet_export
  twin = tflite_target.to_float_tflite(manifest, tensors)
  taken, left = tb.delegated_ops(twin, "litert-auto")
  assert left == [], left
  assert taken.count("ADD") == 9 and "MEAN" in taken, taken
  assert "QUANTIZE" not in taken and "MAXIMUM" not in taken, taken
  interp = tb.interpreter(twin, "litert-auto")
  assert all(t["dtype"] in (np.float32, np.int32) for t in interp.get_tensor_details())
  images = np.asarray(_pixels(64)["image"], np.float32)
  interp.resize_tensor_input(interp.get_input_details()[0]["index"], list(images.shape))
  interp.allocate_tensors()
  (got,) = tb.invoke(interp, [images])
  assert got.shape == (64, 10) and np.all(np.isfinite(got))


# TFLite's 16x8 mode (activations of 9-16 bits as int16 with zero point 0, int8 weights, int64
# bias): a 12-bit cnn, and one whose layers mix 8, 9, 12 and 15-bit inputs and outputs (exact
# int8 <-> int16 QUANTIZEs around 16x8 kernels; INT4 weights where a conv stays int8).
WIDE_CASES = {
    "a12": ("lsq", 8, 12, ()),
    "mixed16": ("lsq", 8, 8, (("conv2", {"a_bits": 15}), ("conv3", {"w_bits": 4}),
                              ("fc1", {"a_bits": 12}), ("head", {"a_bits": 9}))),
}


@pytest.fixture(scope="module", params=sorted(WIDE_CASES))
def wide_export(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param) / "tfl"
  model, _, shape = calibrated_model("cnn", {"width": 0.25}, *WIDE_CASES[request.param])
  export.export(model, shape, str(out), target="tflite", calibration=calibration_images())
  return out, *export.load(str(out))


@pytest.mark.parametrize("family", tflite_target.FAMILIES)
def test_16x8_exports_run_in_litert_as_mpq_emulates_them(wide_export, family):
  """Every family runs its builtin 16x8 kernels (XNNPACK takes none), whose rules the manifest
  records (`tflite_target.REQUANT_RULES`): 0 mismatching int8 logits."""
  out, manifest, tensors = wide_export
  data = (out / "model.tflite").read_bytes()
  interp = tb.interpreter(data, "litert-ref")
  dtypes = {t["name"]: t["dtype"] for t in interp.get_tensor_details()}
  assert np.int16 in dtypes.values() and np.int64 in dtypes.values()  # int16 tensors, int64 bias
  taken, _ = tb.delegated_ops(data, "litert-auto")
  assert not {"CONV_2D", "FULLY_CONNECTED"} & set(taken), taken
  assert any(op.get("rule") == "exact" for op in manifest["ops"])
  if out.parent.name.startswith("a12"):  # every dense layer is a 1x1 CONV_2D in 16x8 mode
    assert "FULLY_CONNECTED" not in tb.delegated_ops(data, "litert-ref")[1], "FULLY_CONNECTED"
  images = _pixels()["pixels"]
  got = tflite_target.run_litert(str(out), family, images)
  want = executor_outputs(*tflite_target.emulate(manifest, tensors, family), images)
  assert got.dtype == np.int8
  assert int(np.sum(got != want)) == 0, f"{family}: {np.sum(got != want)} outputs differ"


@pytest.fixture(scope="module")
def resnet16_export(tmp_path_factory):
  """resnet20 (width 8) with 8, 10 or 14-bit residual additions (int16 ADDs, also of 8-bit inputs
  whose first consumer takes a wider grid), convs at 6-14-bit inputs with 4 or 8-bit weights, a
  12-bit head (int16 MEAN, FULLY_CONNECTED 16x8)."""
  out, _, manifest, tensors = resnet_case_export(
      tmp_path_factory.mktemp("resnet16") / "tfl", "tflite",
      lambda rnd, layer: {"w_bits": rnd.choice([4, 8]), "estimator": rnd.choice(["lsq", "ste"]),
                          "a_bits": rnd.choice([8, 10, 14] if layer.kind == "add" else
                                               [6, 8, 10, 12, 14])},
      seed=1, extra_rules=(("head", {"a_bits": 12}),))
  return out, manifest, tensors


@pytest.mark.parametrize("family", tflite_target.FAMILIES)
def test_resnet20_16x8_runs_in_litert_as_mpq_emulates_it(resnet16_export, family):
  """int16 ADDs (the optimized kernel's vector rule under litert-ruy / litert-auto; an ADD of
  8-bit inputs whose first consumer is wider is int16 too, its inputs converted), int16 MEAN,
  QUANTIZE between int16 grids and between int8 and int16, 16x8 convs: 0 mismatches."""
  out, manifest, tensors = resnet16_export
  adds = [op for op in manifest["ops"] if op["op"] == "add"]
  assert len(adds) == 9 and all(op["left_shift"] == 15 for op in adds if max(op["a_bits"]) > 8)
  assert any(max(op["a_bits"]) == 8 and op["left_shift"] == 15 for op in adds)
  assert [op["bits"] for op in manifest["ops"] if op["op"] == "mean"] == [12]
  images = _pixels()["pixels"]
  got = tflite_target.run_litert(str(out), family, images)
  emulated = tflite_target.emulate(manifest, tensors, family)
  if family != "litert-ref":
    assert {op.get("rule") for op in emulated[0]["ops"]
            if op["op"] == "add" and op["left_shift"] == 15} == {"vector16"}
  want = executor_outputs(*emulated, images)
  assert int(np.sum(got != want)) == 0, f"{family}: {np.sum(got != want)} outputs differ"
