"""The op-kind registry: one entry per op kind, owning everything about it.

An op kind (`OpKind`, registered in `KINDS` under the name layers record it by) defines
  cost(node)              params, kernel elements, MACs and shapes for allocation (layers only)
  lower(lw, node)         its lowering into the integer IR (`lw`: the exporter's `Lowering`)
and, for the ops that sit between an accumulator and the next quantizer ("transforms": ReLU,
ReLU6, pooling), how they lower there (`Transform`). An activation (`Activation`) also owns its
float function `apply`, which layers call. The integer IR ops an entry lowers to (`IROp`,
registered in `IR_OPS` by their manifest name) define
  validate(op, raw, tensors, need)   manifest checks of the op's fields (one-line errors)
  kernel(op, env, tensors)           its int32 kernel in the executor (pure jax.numpy)
An op kind's module registers both (`register`), so adding an op kind is one module plus its
tests; the exporter, the manifest loader, the executor and the cost model look entries up here.
"""

from __future__ import annotations

from typing import ClassVar

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


class IROp:
  name: ClassVar[str]

  def inputs(self, op) -> list[str]:
    return [op.get("input")]

  def validate(self, op, raw, tensors, need) -> None:
    pass

  def kernel(self, op, env, tensors):
    raise NotImplementedError


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
