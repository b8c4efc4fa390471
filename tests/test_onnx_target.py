"""The onnx export target against ONNX Runtime itself: the exported .onnx run by ORT (CPU provider,
ORT_ENABLE_ALL, what a new session does) gives exactly the outputs that mpq's executor computes
for the manifest written with it (kernel family `ort`): 0 mismatching uint8 logits, for the tiny
cnn at W8A8, W4A4, W2A2, W3A3 and mixed bits with every estimator, for resnet20 with random bits
2-8 on every layer and addition (signed activation grids below 8 bits: explicit Clips), and (in
test_export) MobileNetV2. Also the file's interface and the one-line errors."""

import json
import os

import numpy as np
import pytest

from conftest import (TINY_CASES, calibration_images, resnet_case_export, run_cli,
                      tiny_case_model)
from mpq import data as data_lib, export
from mpq.export import onnx_builder as ob, onnx_target
from mpq.export.evaluate import executor_outputs
from mpq.export.exporter import ExportError

NUM_IMAGES = 512


def _pixels(n=NUM_IMAGES):
  ds = data_lib.load("fashion_mnist", None, 1, n)
  return next(data_lib.eval_batches(ds, n))


@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def exported(request, tmp_path_factory):
  out = tmp_path_factory.mktemp(request.param) / "onnx"
  model, _, shape = tiny_case_model(request.param)
  export.export(model, shape, str(out), target="onnx", calibration=calibration_images())
  return request.param, out, model, *export.load(str(out))


def _run(out, images):
  return onnx_target.run_ort(str(out), "ort", onnx_target.file_input(images))


def test_ort_runs_the_export_as_mpq_emulates_it(exported):
  name, out, _, manifest, tensors = exported
  images = _pixels()["pixels"]
  got = _run(out, images)
  want = executor_outputs(*onnx_target.emulate(manifest, tensors, "ort"), images)
  assert got.dtype == np.uint8 and got.shape == (NUM_IMAGES, 10)
  assert want.dtype == np.uint8
  assert int(np.sum(got != want)) == 0, f"{name}: {np.sum(got != want)} outputs differ"
  assert len(np.unique(got)) > 20, name  # the logits use their grid, not a constant


def test_file_interface_and_what_ort_runs(exported):
  """uint8 NCHW image in (the first QLinearConv's zero point is the pixel grid's), uint8 logits
  out, the batch dynamic; ORT runs integer kernels only (no float Conv or Gemm), a Clip exactly
  where a grid is narrower than uint8; the metadata says how to feed and read the file."""
  import onnx
  name, out, _, manifest, _ = exported
  model = onnx.load(str(out / "model.onnx"))
  (inp,), (outp,) = model.graph.input, model.graph.output
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert inp.name == "input" and dims(inp) == ["n", 1, 28, 28]
  assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert outp.name == "logits" and dims(outp) == ["n", 10]
  assert outp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
  first = next(n for n in model.graph.node if n.op_type == "QLinearConv")
  assert first.input[0] == "input" and int(init[first.input[2]]) == 73
  kernels = ob.kernels((out / "model.onnx").read_bytes())
  assert not {"Conv", "Gemm", "MatMul"} & set(kernels), kernels
  narrow = [op for op in manifest["ops"] if op["op"] == "requantize"
            and tuple(np.add(op["clamp"], onnx_target.storage_offset(*op["clamp"]))) != (0, 255)]
  assert kernels.count("Clip") == len(narrow), (name, kernels)
  meta = {p.key: p.value for p in model.metadata_props}
  assert "onnxruntime" in meta["verified_with"] and "zero_point 73" in meta["input"]
  assert json.loads(meta["bits"])["conv1"] == {"w_bits": TINY_CASES[name][1] if name != "mixed"
                                               else 3, "a_bits": 8}
  assert manifest["target"] == "onnx" and manifest["family"] == "ort"
  assert sorted(os.listdir(out)) == ["manifest.json", "model.onnx", "weights.npz"]


def test_ort_rules_differ_from_litert_ref_on_the_same_model(exported, tmp_path):
  """The same model exported to tflite and run in LiteRT's reference kernels rounds differently:
  the top-1 of the two runtimes disagrees somewhere or their dequantized logits differ by more
  than the output grids' rounding (so matching ORT is not matching any integer model)."""
  from mpq.export import tflite_target
  name, out, model, manifest, _ = exported
  if name not in ("w2a2_lsq", "w3a3_ste"):
    return
  _, _, shape = tiny_case_model(name)
  export.export(model, shape, str(tmp_path / "tfl"), target="tflite",
                calibration=calibration_images())
  images = _pixels()["pixels"]
  last_o = manifest["ops"][-1]
  m_t, _ = export.load(str(tmp_path / "tfl"))
  last_t = m_t["ops"][-1]
  z_o = (_run(out, images).astype(np.float64) - last_o["zero_point"]) * last_o["scale"][0]
  z_t = (tflite_target.run_litert(str(tmp_path / "tfl"), "litert-ref", images).astype(
      np.float64) - last_t["zero_point"]) * last_t["scale"][0]
  grid = last_o["scale"][0] + last_t["scale"][0]
  assert np.max(np.abs(z_o - z_t)) > grid, name


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory):
  """resnet20 (width 8) with random bits 2-8 on every conv and both inputs of every addition
  (signed grids below 8 bits, which a .tflite cannot express, are Clips here), estimators lsq /
  tqt / ste: QLinearAdd, DequantizeLinear + QuantizeLinear where a block input feeds a conv and
  a shortcut on two grids, QLinearGlobalAveragePool."""
  out, _, manifest, tensors = resnet_case_export(
      tmp_path_factory.mktemp("resnet") / "onnx", "onnx",
      lambda rnd, _: {"w_bits": rnd.randint(2, 8), "a_bits": rnd.randint(2, 8),
                      "estimator": rnd.choice(["lsq", "tqt", "ste"])}, seed=0)
  return out, manifest, tensors


def test_resnet20_runs_in_ort_as_mpq_emulates_it(resnet_onnx):
  out, manifest, tensors = resnet_onnx
  kinds = [op["op"] for op in manifest["ops"]]
  assert kinds.count("add_grid") == 9 and "mean" in kinds and "requantize_grid" in kinds
  adds = [op for op in manifest["ops"] if op["op"] == "add_grid"]
  assert min(min(op["a_bits"]) for op in adds) < 8 and 128 in sum(
      (op["input_storage"] for op in adds), [])  # signed grids below 8 bits among the inputs
  images = _pixels()["pixels"]
  got = _run(out, images)
  want = executor_outputs(manifest, tensors, images)
  assert int(np.sum(got != want)) == 0, f"{np.sum(got != want)} outputs differ"
  kernels = ob.kernels((out / "model.onnx").read_bytes())
  assert kernels.count("com.microsoft.QLinearAdd") == 9, kernels


def test_add_grid_is_the_runtime_rule_not_the_documented_formula(resnet_onnx):
  """The executor's add_grid table (rule ort) is ORT's fused multiply-add order on the stored values; the
  documented formula `rint((s_a (a - z_a) + s_b (b - z_b)) / s_c) + z_c` differs from it on some
  input pairs of these additions (which ORT, above, does not)."""
  from mpq.ops.add import AddGridIR
  _, manifest, _ = resnet_onnx
  differ = 0
  for op in manifest["ops"]:
    if op["op"] != "add_grid":
      continue
    t = AddGridIR.table(op).astype(np.int64)
    (s_a, s_b), s_c = op["input_scales"], op["output_scale"]
    za, zb = (z + o for z, o in zip(op["input_zero_points"], op["input_storage"]))
    v = np.arange(256, dtype=np.float64)
    doc = np.rint((s_a * (v[:, None] - za) + s_b * (v[None, :] - zb)) / s_c)
    differ += int(np.sum(doc != t))
  assert differ > 0


def test_corrupt_or_missing_onnx_is_a_clear_error(exported, tmp_path):
  _, out, _, _, _ = exported
  bad = tmp_path / "bad"
  bad.mkdir()
  for f in ("manifest.json", "weights.npz"):
    (bad / f).write_bytes((out / f).read_bytes())
  with pytest.raises(ExportError, match="holds no model.onnx; export with --target=onnx"):
    _run(bad, _pixels(4)["pixels"])
  (bad / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:300])
  with pytest.raises(ExportError, match="is not a valid ONNX model"):
    _run(bad, _pixels(4)["pixels"])


def test_activations_over_8_bits_are_refused_naming_the_layer(tmp_path):
  """16-bit activations do not fit uint8: one line naming the layer; nothing is written."""
  import ml_collections
  from configs import tiny
  from mpq.quant import model as quant_model
  c = tiny.get_config()  # uncalibrated: the refusal comes before any number matters
  c.model, c.model_kwargs = "cnn", ml_collections.ConfigDict({"width": 0.25})
  c.quant.enabled, c.quant.w_bits, c.quant.a_bits = True, 8, 8
  c.quant.rules = (("conv2", {"a_bits": 16}),)
  model, _ = quant_model.build(c, 10, (28, 28, 1))
  out = tmp_path / "onnx"
  with pytest.raises(ExportError, match=r"layer 'conv1'.*does not fit uint8 storage.*at most 8"):
    export.export(model, (28, 28, 1), str(out), target="onnx", calibration=_pixels(64)["image"])
  assert not out.exists()


def test_onnx_export_runs_in_ort_from_the_cli(exported, tmp_path):
  """eval.py --model=OUT --runtime=ort: 0 mismatches; --save_outputs holds exactly the uint8 NCHW
  images fed to the file, its uint8 outputs and the labels; a LiteRT name is a one-line error."""
  name, out, _, _, _ = exported
  if name != "w4a4_tqt":
    return
  r = run_cli("eval.py", f"--model={out}", "--runtime=ort", "--num_examples=200",
              f"--save_outputs={tmp_path / 'o.npz'}", f"--json={tmp_path / 'o.json'}")
  assert r.returncode == 0, r.stderr
  res = json.load(open(tmp_path / "o.json"))
  assert (res["runtime"], res["num_examples"], res["mismatches"]) == ("ort", 200, 0)
  z = np.load(tmp_path / "o.npz")
  want = _pixels(200)
  assert z["images"].dtype == np.uint8 and z["outputs"].dtype == np.uint8
  np.testing.assert_array_equal(z["images"], want["pixels"].transpose(0, 3, 1, 2))
  np.testing.assert_array_equal(z["outputs"], _run(out, want["pixels"]))
  np.testing.assert_array_equal(z["labels"], want["label"])
  r = run_cli("eval.py", f"--model={out}", "--mode=int", "--emulate=litert-ref")
  assert r.returncode != 0
  assert "--emulate=litert-ref does not fit" in r.stderr and "--target=tflite" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr
