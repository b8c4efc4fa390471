"""Evaluation of an exported integer model on a dataset's test split: in mpq's executor, emulating
a kernel family (`emulate`), or in a real runtime (`run_runtime`); optionally against the
fake-quant model it came from (top-1 agreement, logit differences in output LSBs).

Outputs are what the exported file produces: integer logits on the calibrated output grid for a
target with integer outputs (`Target.output_dtype`: int8 for tflite, uint8 for onnx), float32
logits otherwise (mpq). Top-1 is
`argmax` with ties to the lowest index, on the outputs themselves.
"""

from __future__ import annotations

import numpy as np

from mpq import data as data_lib
from mpq.errors import UserError
from mpq.export import targets as targets_lib
from mpq.export.exporter import ExportError, fake_quant_logits, lower, validate

CALIB_EXAMPLES = 1000  # training images that calibrate an integer output grid (eval.py's default)


def test_set(data, num_examples: int | None = None, batch_size: int = 500) -> dict:
  """{"image" (float32, normalised), "pixels" (uint8), "label"} of the first `num_examples` test
  images (all by default), in test-set order."""
  parts: dict[str, list] = {"image": [], "pixels": [], "label": []}
  n = 0
  for batch in data_lib.eval_batches(data, batch_size):
    mask = np.asarray(batch["mask"]) > 0
    for k in parts:
      parts[k].append(np.asarray(batch[k])[mask])
    n += int(mask.sum())
    if num_examples is not None and n >= num_examples:
      break
  out = {k: np.concatenate(v) for k, v in parts.items()}
  if num_examples is not None:
    if num_examples < 1:
      raise UserError(f"--num_examples={num_examples} must be at least 1")
    out = {k: v[:num_examples] for k, v in out.items()}
  return out


def calibration_images(data, num_examples: int = CALIB_EXAMPLES) -> np.ndarray:
  """The first `num_examples` training images (float32, normalised), unshuffled: the images that
  calibrate an exported model's integer output grid."""
  return np.asarray(next(data_lib.eval_batches(data, num_examples, split="train"))["image"])


def target_of(manifest: dict):
  return targets_lib.get(manifest.get("target", "mpq"))


def resolve(manifest: dict, model_dir: str | None, name: str, kind: str):
  """The target of an exported model, checking that it has emulation / runtime `name` (`kind`:
  "emulate" or "runtime"); one-line error otherwise."""
  t = target_of(manifest)
  names = t.emulations if kind == "emulate" else t.runtimes
  if name not in names:
    others = sorted(x.name for x in targets_lib.TARGETS.values()
                    if name in (x.emulations if kind == "emulate" else x.runtimes))
    where = model_dir or "the exported model"
    fits = f"{name!r} needs a model exported with --target={others[0]}" if others else \
        f"unknown {kind} {name!r}"
    raise ExportError(f"--{kind}={name} does not fit {where} (target {t.name!r}; it has "
                      f"{', '.join(names) or 'none'}): {fits}")
  return t


def default_emulation(manifest: dict) -> str | None:
  """The kernel family an exported model is evaluated as when none is named: the one its run
  targeted (`config.quant.target`, recorded as `source.quant_target`) where the file's target runs
  it, else None (as exported)."""
  family = manifest.get("source", {}).get("quant_target")
  return family if family in target_of(manifest).emulations else None


def emulated(manifest: dict, tensors: dict, emulate: str | None = None, model_dir=None):
  """(manifest, tensors) as the executor runs them for kernel family `emulate` (None:
  `default_emulation`, or as exported)."""
  emulate = emulate or default_emulation(manifest)
  if emulate is None:
    return manifest, tensors
  return resolve(manifest, model_dir, emulate, "emulate").emulate(manifest, tensors, emulate)


def executor_outputs(manifest: dict, tensors: dict, images, batch_size: int = 500) -> np.ndarray:
  """The outputs (see the module docstring) of the integer model in mpq's executor for `images`
  (float32 normalised, or the uint8 pixels for a model with the pixel grid)."""
  from mpq.intexec import build  # pylint: disable=g-import-not-at-top
  run, core, quantize = build(manifest, tensors)
  t = target_of(manifest)
  outs = []
  for i in range(0, len(images), batch_size):
    x = images[i:i + batch_size]
    outs.append(np.asarray(core(quantize(x))).astype(t.output_dtype) if t.output_dtype else
                np.asarray(run(x), np.float32))
  return np.concatenate(outs)


def logits(manifest: dict, outputs: np.ndarray) -> np.ndarray:
  """Float64 logits of `outputs` (int8 outputs dequantized: `(q - z) s`)."""
  last = manifest["ops"][-1]
  if np.issubdtype(outputs.dtype, np.floating):
    return np.asarray(outputs, np.float64)
  return (outputs.astype(np.float64) - last.get("zero_point", 0)) * np.asarray(last["scale"])


def scores(manifest: dict, outputs: np.ndarray, labels: np.ndarray) -> dict:
  """Accuracy and cross-entropy loss of `outputs`."""
  z = logits(manifest, outputs)
  z = z - z.max(-1, keepdims=True)
  loss = np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]
  return {"accuracy": float(np.mean(outputs.argmax(-1) == labels)), "loss": float(loss.mean()),
          "num_examples": int(len(labels))}


def evaluate_int(manifest: dict, tensors: dict, data, batch_size: int = 500, fq_model=None,
                 num_examples: int | None = None, emulate: str | None = None,
                 model_dir: str | None = None, keep_outputs: bool = False) -> dict:
  """Accuracy and loss of the integer model in mpq's executor (emulating kernel family `emulate`,
  default: as exported); with `fq_model` also the fake-quant model's accuracy, top-1 agreement and
  the largest logit difference in output LSBs (the output grid's, or the last accumulator's).
  `keep_outputs`: the result also holds `images` (what the exported file takes), `outputs` and
  `labels` (NumPy arrays)."""
  m, t = emulated(manifest, tensors, emulate, model_dir)
  ts = test_set(data, num_examples, batch_size)
  images = ts["pixels"] if manifest["input"].get("pixels") else ts["image"]
  outputs = executor_outputs(m, t, images, batch_size)
  out = dict(scores(manifest, outputs, ts["label"]), mode="int",
             emulate=(emulate or default_emulation(manifest) or manifest.get("family")
                      or target_of(manifest).emulations[0]))
  if fq_model is not None:
    fq = fake_quant_logits(fq_model, ts["image"], batch_size)
    lsb = np.asarray(manifest["ops"][-1]["scale"])
    out["fake_quant_accuracy"] = float(np.mean(fq.argmax(-1) == ts["label"]))
    out["agreement_with_fake_quant"] = float(np.mean(fq.argmax(-1) == outputs.argmax(-1)))
    out["max_logit_lsb_diff"] = float(np.max(np.abs(fq - logits(manifest, outputs)) / lsb))
  if keep_outputs:
    out.update(images=target_of(manifest).file_input(images), outputs=outputs, labels=ts["label"])
  return out


def lower_for(model, image_shape, family: str, calibration, meta: dict | None = None
              ) -> tuple[dict, dict]:
  """(manifest, tensors) of `model` lowered for the target whose files kernel family `family`
  runs, as the executor runs them for that family (`config.quant.target`): the export as written,
  then the family's emulation. `calibration`: float model inputs for an integer output grid."""
  t = targets_lib.for_emulation(family)
  manifest, stored = lower(model, image_shape, t.name,
                           calibration if t.output_dtype else None, None, meta)
  return t.emulate(manifest, validate(manifest, stored), family)


def evaluate_as(model, image_shape, family: str, test: dict, calibration,
                batch_size: int = 500) -> dict:
  """The accuracy and loss of `model` as kernel family `family` computes it (`lower_for`, then
  mpq's executor) on `test` (`test_set`'s dict); the result's `target` names the family."""
  m, t = lower_for(model, image_shape, family, calibration)
  images = test["pixels"] if m["input"].get("pixels") else test["image"]
  outputs = executor_outputs(m, t, images, batch_size)
  return dict(scores(m, outputs, test["label"]), target=family)


def evaluate_runtime(model_dir: str, manifest: dict, tensors: dict, data, runtime: str,
                     num_examples: int | None = None, batch_size: int = 500,
                     keep_outputs: bool = False) -> dict:
  """Runs the exported file in `runtime` (e.g. `litert-ref`) on the test images and compares with
  mpq's emulation of that runtime path: accuracy, top-1 agreement with the emulation, the number
  of differing output values (`mismatches`) and examples (`mismatched_examples`)."""
  t = resolve(manifest, model_dir, runtime, "runtime")
  ts = test_set(data, num_examples, batch_size)
  images = ts["pixels"] if manifest["input"].get("pixels") else ts["image"]
  fed = t.file_input(images)
  got = t.run(model_dir, runtime, fed)
  m, tt = t.emulate(manifest, tensors, runtime)
  want = executor_outputs(m, tt, images, batch_size)
  if got.shape != want.shape or got.dtype != want.dtype:
    raise ExportError(f"{model_dir}: {runtime} produced {got.dtype}{list(got.shape)}, mpq's "
                      f"emulation {want.dtype}{list(want.shape)}; re-export the model")
  differ = got != want
  out = dict(scores(manifest, got, ts["label"]), mode="runtime", runtime=runtime,
             agreement_with_emulation=float(np.mean(got.argmax(-1) == want.argmax(-1))),
             mismatches=int(differ.sum()), mismatched_examples=int(differ.any(-1).sum()),
             emulation_accuracy=float(np.mean(want.argmax(-1) == ts["label"])))
  if keep_outputs:
    out.update(images=fed, outputs=got, labels=ts["label"])
  return out
