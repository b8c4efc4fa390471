"""The target registry: what a deployment target decides about an exported integer model.

A target (`Target`, registered in `TARGETS` by name) owns
  write(out_dir, manifest, tensors)   its file writer: writes `files` into `out_dir`, a fresh
                                      directory (`mpq.export.exporter.write` puts it in place)
  files                               the names of the files its writer produces; a directory
                                      holding an mpq manifest and only files some target writes
                                      is an earlier export, which a new export may replace
  multiplier(m, out_max)              how a real multiplier becomes (M0, shift) for its kernels
  rounding                            the rounding rule of each IR op (`mpq.rounding.RULES` names;
                                      `"*"` is the default), used where the lowering rounds
                                      (`Lowering.round`, e.g. a ReLU6 clamp bound)
Today's only entry is mpq's own format, `mpq` (`mpq-int` manifest + weights.npz, half up
everywhere, `requant_multiplier`: the more faithful of TFLite's normalised double-rounding form and
a single-rounding form); the executor's kernels implement its rules. A target whose kernels round
differently (issue 8: TFLite's families, ONNX Runtime) adds its entry here and the kernels that
emulate it, so that "bit-exact with runtime X" is a property of one entry and its tests against X.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from mpq.fixedpoint import requant_multiplier


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  write: Callable[[str, dict, dict], None]
  files: tuple[str, ...]
  multiplier: Callable[[float, float], tuple[int, int]]
  rounding: dict

  def rounding_of(self, op: str) -> str:
    return self.rounding.get(op, self.rounding["*"])


def _write_mpq(out_dir: str, manifest: dict, tensors: dict) -> None:
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


register(Target("mpq", _write_mpq, ("manifest.json", "weights.npz"), requant_multiplier,
              {"*": "half_up"}))
