"""`config.quant.target`: a run that targets one kernel family evaluates as that family computes
the model, so that its reported accuracy and loss are what the real runtime gives (checked here
against LiteRT and ONNX Runtime, not against mpq's own code)."""

import json
import os
import re

import pytest
from conftest import run_cli

from mpq import export
from mpq.errors import UserError
from mpq.export import targets
from mpq.export.evaluate import calibration_images, evaluate_runtime
from mpq.train.loop import load_model

# Mixed bits and estimators (tqt: power-of-two scales, exact ties in requantization; ste: affine
# activation grids with zero points), so that the families' roundings differ on some outputs.
RULES = (("conv1", {"w_bits": 3, "estimator": "ste"}),
         ("conv2", {"w_bits": 4, "a_bits": 4, "estimator": "tqt"}),
         ("fc1", {"w_bits": 6, "a_bits": 5, "estimator": "lsq"}),
         ("head", {"w_bits": 4, "a_bits": 3, "estimator": "lsq"}))


def _config(family):
  from configs import tiny
  c = tiny.get_config()
  c.quant.enabled, c.quant.target, c.quant.rules = True, family, RULES
  c.num_train_steps, c.eval_every, c.checkpoint_every = 24, 12, 12
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from mpq.experiment import train_and_evaluate
  wd = str(tmp_path_factory.mktemp("target") / "run")
  result = train_and_evaluate(_config("litert-ref"), wd, progress=False)
  return wd, result


def _runtime(wd, family, out):
  """The run's latest checkpoint exported for `family`'s target and run in that runtime."""
  model, _, data, _ = load_model(wd)
  export.export(model, data.image_shape, out, target=targets.for_emulation(family).name,
                calibration=calibration_images(data))
  manifest, tensors = export.load(out)
  return evaluate_runtime(out, manifest, tensors, data, family)


def test_training_evaluation_is_what_litert_computes(run, tmp_path):
  wd, result = run
  r = _runtime(wd, "litert-ref", str(tmp_path / "x"))
  assert r["mismatches"] == 0
  assert result["accuracy"] == r["accuracy"] and result["loss"] == r["loss"]
  assert result["target"] == "litert-ref" and result["num_examples"] == r["num_examples"] == 1000
  # every periodic evaluation took the same path
  with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
    tests = [m for m in map(json.loads, f) if m.get("split") == "test"]
  assert [m["step"] for m in tests] == [12, 24] and tests[-1]["accuracy"] == r["accuracy"]


@pytest.mark.parametrize("family", ["litert-auto", "ort"])
def test_a_resumed_run_may_retarget_its_evaluation(run, tmp_path, family):
  """quant.target may change on resume (evaluation only): the run, resumed at its end, evaluates
  as the new family computes it, which is what that runtime gives."""
  from mpq.experiment import train_and_evaluate
  wd, _ = run
  result = train_and_evaluate(_config(family), wd, progress=False)
  r = _runtime(wd, family, str(tmp_path / "x"))
  assert r["mismatches"] == 0
  assert (result["accuracy"], result["loss"], result["target"]) == (r["accuracy"], r["loss"],
                                                                     family)
  train_and_evaluate(_config("litert-ref"), wd, progress=False)  # as the other tests expect


def test_eval_py_evaluates_and_exports_for_the_target(run, tmp_path):
  wd, result = run
  out = run_cli("eval.py", f"--workdir={wd}", f"--json={tmp_path / 'r.json'}")
  assert out.returncode == 0, out.stderr
  with open(tmp_path / "r.json", encoding="utf-8") as f:
    r = json.load(f)
  assert (r["accuracy"], r["loss"], r["mode"], r["target"]) == (
      result["accuracy"], result["loss"], "int", "litert-ref")
  assert "as litert-ref computes it" in out.stdout and "fake_quant_accuracy" in r
  # --export without --target writes the family's format; its executor default is the family
  out = run_cli("eval.py", f"--workdir={wd}", f"--export={tmp_path / 'e'}", "--mode=int",
                f"--json={tmp_path / 'i.json'}")
  assert out.returncode == 0, out.stderr
  assert os.path.exists(tmp_path / "e" / "model.tflite")
  with open(tmp_path / "i.json", encoding="utf-8") as f:
    i = json.load(f)
  assert (i["emulate"], i["accuracy"]) == ("litert-ref", result["accuracy"])
  out = run_cli("eval.py", f"--model={tmp_path / 'e'}", "--runtime=litert-ref",
                f"--json={tmp_path / 'rt.json'}")
  assert out.returncode == 0, out.stderr
  with open(tmp_path / "rt.json", encoding="utf-8") as f:
    rt = json.load(f)
  assert rt["mismatches"] == 0 and rt["accuracy"] == result["accuracy"]


@pytest.mark.parametrize("change, message", [
    ({"quant.enabled": False}, "targets a quantized model: set config.quant.enabled=True"),
    ({"input_norm": "channel"}, "take the uint8 image: set config.input_norm='pixel'"),
    ({"quant.target": "tflite"}, "config.quant.target='tflite' is unknown; use one of '', 'mpq'"),
])
def test_bad_targets_are_one_line_errors(change, message):
  from mpq import config as config_lib
  c = _config("litert-ref")
  for path, v in change.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  with pytest.raises(UserError, match=re.escape(message)) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_a_model_the_family_cannot_express_fails_before_training(tmp_path):
  """Unsigned activations of 16 bits fit neither int8 nor int16 with zero point 0 (TFLite's 16x8
  mode): the run stops before its first write."""
  from mpq.experiment import train_and_evaluate
  c = _config("litert-ref")
  c.quant.rules = (("conv2", {"a_bits": 16}),)
  wd = tmp_path / "run"
  with pytest.raises(UserError, match=r"config.quant.target='litert-ref': layer 'conv1': its "
                     r"output grid \[0, 65535\] \(zero point 0\) fits neither int8 nor int16") as e:
    train_and_evaluate(c, str(wd), progress=False)
  assert "\n" not in str(e.value)
  assert not (wd / "config.json").exists() and not (wd / "checkpoints").exists()
