"""The op-kind registry: one entry per op kind, owning everything about it.

An op kind (`OpKind`, registered in `KINDS` under the name layers record it by) defines
  cost(node)              params, kernel elements, MACs and shapes for allocation (layers only)
  lower(lw, node)         its lowering into the integer IR (`lw`: the exporter's `Lowering`)
and, for the ops that sit between an accumulator and the next quantizer ("transforms": ReLU,
ReLU6, pooling), how they lower there (`Transform`). An activation (`Activation`) also owns its
float function `apply`, which layers call. The integer IR ops an entry lowers to (`IROp`,
registered in `IR_OPS` by their manifest name) define
  validate(op, raw, tensors, need)   manifest checks of every field of the op (one-line errors
                                     through `need`; `IROp`'s field checks help)
  value_range(op, ranges, need)      the integer range of its output (for grids), after checking
                                     its inputs' ranges against what it declares about them
  kernel(op, env, tensors)           its int32 kernel in the executor (pure jax.numpy)
  tflite(op, w)                      its lowering into a .tflite graph (`w`: the tflite target's
                                     `mpq.export.tflite_target.Writer`); `tflite_op(op)` names the
                                     TFLite op it becomes (the target's rules are per TFLite op)
  onnx(op, w)                        its lowering into an ONNX graph (`w`: the onnx target's
                                     `mpq.export.onnx_target.Writer`)
  for_family(op, family)             the op as a runtime's kernel family computes it (`mean`,
                                     `requantize_grid`: one rule per family)
An op kind's module registers both (`register`), so adding an op kind is one module plus its
tests; the exporter, the manifest loader, the executor and the cost model look entries up here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from mpq.errors import UserError

KINDS: dict[str, "OpKind"] = {}
IR_OPS: dict[str, "IROp"] = {}


class UnknownOpError(UserError):
  """An op kind or IR op that no registry entry defines; the message names it."""


class OpKind:
  name: ClassVar[str]
  quantizable: ClassVar[bool] = False  # layers of this kind get quantizers (`quant.rules`)

  def cost(self, node) -> dict | None:
    return None

  def input_quantizers(self, layer) -> tuple:
    """The quantizers that put each input of a layer of this kind on its integer grid, in input
    order (none for kinds without quantizers)."""
    return ()

  def lower(self, lw, node) -> None:
    raise NotImplementedError


class Transform(OpKind):
  """An op between an accumulator and the next quantizer. `requires_accumulator`: it must run on
  the int32 accumulator (average pooling: the sum is linear, and every transform before it must
  run there too); otherwise it is applied on the requantized tensor (`after_requantize`) or folded
  into the requantization clamp (`clamp`)."""
  requires_accumulator: ClassVar[bool] = False

  def lower(self, lw, node) -> None:
    lw.transform(node)

  def on_accumulator(self, lw, acc, node):
    """Emits the IR ops that apply this op to accumulator `acc` (`Acc`); returns the new `Acc`."""
    raise NotImplementedError

  def clamp(self, lo: int, hi: int, zero_point: int, scale: float) -> tuple[int, int]:
    """Folds this op into the requantization clamp `[lo, hi]` of the output grid; default: none."""
    return lo, hi

  def after_requantize(self, lw, tensor: str, node) -> str:
    """Emits IR ops on the requantized tensor; returns its name (default: nothing to do)."""
    return tensor


class Activation(Transform):
  """A pointwise activation that layers apply (`Layer(..., activation=name)`)."""

  def apply(self, y):
    raise NotImplementedError


def _got(op, field) -> str:
  """` (got VALUE)` for an error message: the field's value, shortened, or ` (missing)`."""
  if field not in op:
    return " (missing)"
  text = repr(op[field])
  return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def _article(word: str) -> str:
  return f"{'an' if word[0] in 'aeio' else 'a'} {word}"


class IROp:
  """An integer IR op (see the module docstring). `validate(op, raw, tensors, need)` checks every
  field of a manifest op: `raw` is weights.npz by name, `tensors` receives the arrays the kernel
  uses (unpacked), and `need(op, field, ok, what)` raises the one-line error
  "op NAME (KIND): field FIELD WHAT" unless `ok`. The static field checks below go through `need`
  and return the checked value. `input_field` names the field that lists the op's inputs."""
  name: ClassVar[str]
  input_field: ClassVar[str] = "input"
  # For every non-decreasing elementwise f: op(f(x)) == f(op(x)) (max pooling); the executor then
  # runs such an op before a `monotone` one that feeds only it, on fewer values.
  commutes_with_monotone: ClassVar[bool] = False

  def monotone(self, op, tensors) -> bool:
    """Whether this op (with these tensors) is a non-decreasing elementwise function of its input."""
    return False

  def inputs(self, op) -> list[str]:
    return [op.get("input")]

  def validate(self, op, raw, tensors, need) -> None:
    pass

  def value_range(self, op, ranges, need) -> tuple[int, int] | None:
    """Checks what the op declares about its inputs' integer grids against `ranges` (tensor name
    -> (lo, hi), the range each earlier grid tensor can take) and returns its output's range, or
    None where the output is no grid (an accumulator) or its range is unknown."""
    return None

  def kernel(self, op, env, tensors):
    raise NotImplementedError

  def tflite_op(self, op) -> str | None:
    """The TFLite builtin op this IR op becomes, or None."""
    return None

  def tflite_op_16x8(self, op) -> str | None:
    """The TFLite builtin op this IR op becomes in 16x8 mode (int16 activations); default: the
    same as `tflite_op`."""
    return self.tflite_op(op)

  def for_family(self, op, family: str) -> dict:
    """The op as kernel family `family` (e.g. `litert-ruy`) computes it, for an op whose kernel
    depends on the family (`mean`, `requantize_grid`); a ValueError where it is not known."""
    return op

  def tflite(self, op, w) -> None:
    """Emits this op into the .tflite graph through `w` (`mpq.export.tflite_target.Writer`)."""
    w.fail(op, "the tflite target has no lowering for this IR op yet; export with --target=mpq")

  def onnx_requantizer(self, op, s_out: float, out: dict) -> tuple[str, dict]:
    """How ONNX Runtime requantizes this op's int32 output onto a grid of scale `s_out` (`out`: its
    "zero_point", "clamp" and uint8 "storage" offset): (requantize rule, {field: tensor}); a
    ValueError where no ONNX op computes it."""
    raise ValueError(f"the onnx target has no lowering for the output of {op['op']!r}; export "
                     "with --target=mpq")

  def onnx(self, op, w) -> None:
    """Emits this op into the ONNX graph through `w` (`mpq.export.onnx_target.Writer`)."""
    w.fail(op, "the onnx target has no lowering for this IR op yet; export with --target=mpq")

  # -- field checks for `validate`
  got = staticmethod(_got)  # " (got VALUE)" / " (missing)" for a message about `op[field]`
  article = staticmethod(_article)  # "an int8", "a uint8"

  @staticmethod
  def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)

  @staticmethod
  def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)

  @staticmethod
  def bits_range(bits: int) -> tuple[int, int]:
    """The integers a grid of `bits` bits can hold, signed or unsigned: [-2^(b-1), 2^b - 1]."""
    return -(2 ** (bits - 1)), 2 ** bits - 1

  @staticmethod
  def integer(op, field, need, lo=None, hi=None) -> int:
    v = op.get(field)
    bounds = (f" from {lo} to {hi}" if lo is not None and hi is not None else
              f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")
    need(op, field, IROp.is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
         f"must be an integer{bounds}{_got(op, field)}")
    return v

  @staticmethod
  def integers(op, field, need, n: int, lo=None, hi=None) -> list[int]:
    """A list of `n` integers in [lo, hi]."""
    v = op.get(field)
    ok = isinstance(v, list) and len(v) == n and all(
        IROp.is_int(x) and (lo is None or x >= lo) and (hi is None or x <= hi) for x in v)
    bounds = f" from {lo} to {hi}" if lo is not None and hi is not None else ""
    need(op, field, ok, f"must be a list of {n} integers{bounds}{_got(op, field)}")
    return v

  @staticmethod
  def bits(op, field, need) -> int:
    return IROp.integer(op, field, need, 2, 16)

  @staticmethod
  def positive(v) -> bool:
    return IROp.is_number(v) and math.isfinite(v) and v > 0

  @staticmethod
  def scale(op, field, need) -> float:
    need(op, field, IROp.positive(op.get(field)), f"must be a finite number > 0{_got(op, field)}")
    return op[field]

  @staticmethod
  def scales(op, field, need, sizes=None) -> list:
    """A non-empty list of finite numbers > 0, of one of the lengths `sizes` if given."""
    v = op.get(field)
    bad = (next((x for x in v if not IROp.positive(x)), None) if isinstance(v, list) else None)
    need(op, field, isinstance(v, list) and v and all(IROp.positive(x) for x in v),
         "must be a non-empty list of finite numbers > 0"
         + (f" (holds {bad!r})" if bad is not None else _got(op, field)))
    if sizes:
      need(op, field, len(v) in sizes, f"must have {' or '.join(str(n) for n in sizes)} entries, "
           f"not {len(v)}")
    return v

  @staticmethod
  def grid_range(op, field, bits: int, need, strict: bool = True) -> tuple[int, int]:
    """A `[lo, hi]` field of integers on a grid of `bits` bits (within `bits_range`, at most
    2^bits values); `strict`: lo < hi, else lo <= hi."""
    v = op.get(field)
    lo_b, hi_b = IROp.bits_range(bits)
    ok = (isinstance(v, list) and len(v) == 2 and all(IROp.is_int(x) for x in v)
          and (v[0] < v[1] if strict else v[0] <= v[1]) and v[0] >= lo_b and v[1] <= hi_b
          and v[1] - v[0] <= 2 ** bits - 1)
    need(op, field, ok, f"must be [lo, hi] integers with lo {'<' if strict else '<='} hi on a "
         f"{bits}-bit grid (within [{lo_b}, {hi_b}], at most {2 ** bits} values){_got(op, field)}")
    return v[0], v[1]

  @staticmethod
  def tensor(op, field, raw, need, dtype=None, shape=None, ndim=None, what=None) -> np.ndarray:
    """The array of weights.npz that field `field` names, of `dtype`, `shape` and `ndim` where
    given (`what` describes the expectation in the error)."""
    name = op.get(field)
    need(op, field, isinstance(name, str) and name in raw,
         f"names no tensor in weights.npz{_got(op, field)}")
    a = raw[name]
    ok = ((dtype is None or a.dtype == np.dtype(dtype))
          and (shape is None or a.shape == tuple(shape)) and (ndim is None or a.ndim == ndim))
    if what is None:
      what = " ".join(filter(None, (
          _article(np.dtype(dtype).name) if dtype is not None else "a", "tensor",
          f"of shape {tuple(shape)}" if shape is not None else
          f"of {ndim} dimension{'s' if ndim != 1 else ''}" if ndim is not None else "")))
    held = a.dtype.name if a.dtype.isnative else a.dtype.str
    need(op, field, ok, f"must name {what}; weights.npz holds {name!r} as {held} of shape "
         f"{a.shape}")
    return a


def register(*entries) -> None:
  for e in entries:
    table = IR_OPS if isinstance(e, IROp) else KINDS
    if e.name in table and type(table[e.name]) is not type(e):
      raise ValueError(f"op {e.name!r} is registered twice ({type(table[e.name]).__name__}, "
                       f"{type(e).__name__})")
    table[e.name] = e


def kind(name: str, where: str = "") -> OpKind:
  if name not in KINDS:
    raise UnknownOpError(f"{where}op kind {name!r} is not registered (registered: "
                         f"{', '.join(sorted(KINDS))}); add it to mpq.ops")
  return KINDS[name]


def activation(name: str) -> Activation:
  entry = kind(name)
  if not isinstance(entry, Activation):
    raise UnknownOpError(f"op kind {name!r} is not an activation; activations: "
                         f"{', '.join(sorted(k for k, v in KINDS.items() if isinstance(v, Activation)))}")
  return entry


def quantizable() -> tuple[str, ...]:
  """The op kinds whose layers have quantizers (rules and allocation apply to them)."""
  return tuple(sorted(k for k, v in KINDS.items() if v.quantizable))


def ir_op(name: str) -> IROp:
  if name not in IR_OPS:
    raise UnknownOpError(f"IR op {name!r} is not registered (registered: "
                         f"{', '.join(sorted(IR_OPS))})")
  return IR_OPS[name]
