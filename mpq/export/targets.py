"""The target registry: what a deployment target decides about an exported integer model.

A target (`Target`, registered in `TARGETS` by name) owns
  write(out_dir, manifest, tensors)   its file writer: writes `files` into `out_dir`, a fresh
                                      directory (`mpq.export.exporter.write` puts it in place)
  files                               the names of the files its writer produces; a directory
                                      holding an mpq manifest and only files some target writes
                                      is an earlier export, which a new export may replace
  multiplier(m, out_max)              how a real multiplier becomes (M0, shift) for its kernels
  requantizer(acc, s_out, out_max, out)
                                      the `requantize` op of accumulator `acc`
                                      (`mpq.export.exporter.Acc`) onto a grid of scale `s_out`
                                      (`out`: its "zero_point" and "clamp"): (rule name or None
                                      for the default, {field: tensor}); a ValueError says what
                                      the target cannot express
  rounding                            the rounding rule of each IR op (`mpq.rounding.RULES` names;
                                      `"*"` is the default), used where the lowering rounds
                                      (`Lowering.round`, e.g. a ReLU6 clamp bound)
  output_dtype                        "int8" / "uint8": the logits leave as that integer type on
                                      a calibrated grid (TFLite's FULLY_CONNECTED cannot output
                                      int32; ORT's uint8 QGemm outputs uint8); None: as float
  pixel_input                         the model takes the uint8 image (the first quantizer must
                                      be the pixel grid)
  emulations, emulate(m, t, name)     the kernel families whose arithmetic the executor emulates
                                      for its files: (manifest, tensors) rewritten for `name`
                                      (the first name: the manifest as exported)
  runtimes, run(dir, name, images)    the real runtimes that run its files: the file's output for
                                      `images` (what the file takes: `file_input(pixels)`, e.g.
                                      NCHW for onnx, or float)
  options, weight_layout(...)         its export options ({name: (values, default)}), and how a
                                      dense/conv layer's integer weights are laid out for it
                                      (weight grid, integer weights, integer bias, options) ->
                                      the same three, as the IR op holds them
  add_ir                              the IR op a residual addition lowers to (`add`: mpq's and
                                      TFLite's fixed-point form; `add_grid`: onto the output grid)
  storage_offset(lo, hi, zero_point)  what the file adds to the integers of a grid tensor whose
                                      values lie in [lo, hi] with that zero point (its storage
                                      type's range), or None where [lo, hi] does not fit it
Entries: mpq's own format, `mpq` (`mpq-int` manifest + weights.npz, half up everywhere:
requantization by rule `exact`, one rounding of the 64-bit product with TFLite's normalised
multiplier; manifests written before it name no rule and keep TFLite's double rounding with
`requant_multiplier`'s choice of form), whose rules the executor's kernels implement; and `tflite`
(`mpq.export.tflite_target`: a .tflite file plus the mpq manifest of the same integer model, with
LiteRT's multipliers and rules, which the executor then emulates). "Bit-exact with runtime X" is a
property of one entry and its tests against X.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from mpq.fixedpoint import quantize_multiplier, requant_multiplier


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  write: Callable[[str, dict, dict], None]
  files: tuple[str, ...]
  multiplier: Callable[[float, float], tuple[int, int]]
  rounding: dict
  requantizer: Callable
  output_dtype: str | None = None
  pixel_input: bool = False
  emulations: tuple[str, ...] = ()
  emulate: Callable | None = None
  runtimes: tuple[str, ...] = ()
  run: Callable | None = None
  options: dict = dataclasses.field(default_factory=dict)  # option -> (allowed values, default)
  # ADD's left shift of its inputs, given their widest grid's bits and the bits of the grid its
  # first consumer takes its output onto (None: unknown) (mpq: 31 - bits; TFLite: 20, or 15 for
  # its int16 ADD)
  add_shift: Callable = lambda bits, out_bits: 31 - bits
  # one int8 tensor per accumulator (a .tflite op has one output): a second consumer's grid is
  # requantized from the first (`requantize_grid`), and transforms run on requantized tensors
  # (average pooling as a mean of the grid integers), not on the int32 accumulator
  grid_transforms: bool = False
  weight_layout: Callable = lambda g_w, w_int, bias, options: (g_w, w_int, bias)
  add_ir: str = "add"
  storage_offset: Callable = lambda lo, hi, zero_point=0: 0
  # the array its file takes for uint8 NHWC images (onnx: NCHW)
  file_input: Callable = lambda pixels: pixels

  def check_options(self, options: dict) -> dict:
    """`options` completed with the defaults; a one-line error for an unknown option or value."""
    from mpq.errors import UserError  # pylint: disable=g-import-not-at-top
    for k, v in options.items():
      if k not in self.options:
        raise UserError(f"export target {self.name!r} has no option {k!r}"
                        + (f"; it has {', '.join(self.options)}" if self.options else ""))
      if v not in self.options[k][0]:
        raise UserError(f"export option {k}={v!r} of target {self.name!r} must be one of "
                        f"{', '.join(self.options[k][0])}")
    return {k: options.get(k, default) for k, (_, default) in self.options.items()}

  def rounding_of(self, op: str) -> str:
    return self.rounding.get(op, self.rounding["*"])


def write_mpq(out_dir: str, manifest: dict, tensors: dict) -> None:
  """`out_dir/weights.npz` and `out_dir/manifest.json`."""
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, "weights.npz"), **tensors)
  with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)


TARGETS: dict[str, Target] = {}


def register(target: Target) -> None:
  TARGETS[target.name] = target


def get(name: str) -> Target:
  if name not in TARGETS:
    from mpq.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError(f"unknown export target {name!r}; use one of {', '.join(sorted(TARGETS))}")
  return TARGETS[name]


def emulation_names() -> tuple[str, ...]:
  """Every kernel family some target's executor emulation reproduces, in registry order."""
  return tuple(n for t in TARGETS.values() for n in t.emulations)


def for_emulation(name: str) -> Target:
  """The target whose files kernel family `name` runs (e.g. `litert-ruy` -> tflite)."""
  for t in TARGETS.values():
    if name in t.emulations:
      return t
  from mpq.errors import UserError  # pylint: disable=g-import-not-at-top
  raise UserError(f"unknown kernel family {name!r}; use one of {', '.join(emulation_names())}")


def fixed_point(pairs, shape) -> dict:
  """{"multiplier", "shift"} int32 tensors of shape `shape` from (M0, shift) pairs."""
  return {"multiplier": np.asarray([p[0] for p in pairs], np.int32).reshape(shape),
          "shift": np.asarray([p[1] for p in pairs], np.int32).reshape(shape)}


def _mpq_requantizer(acc, s_out: float, out_max: float, out: dict):
  """mpq's rule `exact` (one rounding of the exact product, half up) with TFLite's normalised
  multiplier `quantize_multiplier(s_acc / s_out)` per channel: 31 significant bits, so the
  integer model rounds `acc s_acc / s_out` as the fake-quant model does except within about
  `2^-31` of a tie."""
  del out, out_max
  pairs = [quantize_multiplier(float(m)) for m in np.ravel(acc.scale / s_out)]
  return "exact", fixed_point(pairs, np.shape(acc.scale))


register(Target("mpq", write_mpq, ("manifest.json", "weights.npz"), requant_multiplier,
                {"*": "half_up"}, _mpq_requantizer, emulations=("mpq",),
                emulate=lambda manifest, tensors, name: (manifest, tensors)))

from mpq.export import onnx_target, tflite_target  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position
