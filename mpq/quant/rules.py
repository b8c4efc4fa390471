"""Per-layer quantization settings from ordered regex rules over layer paths.

`config.quant.rules` is a sequence of `(pattern, overrides)` pairs, e.g.

    [('conv1|head', dict(w_bits=8, a_bits=8)), ('stage1/.*', dict(w_bits=2))]

For each quantizable layer (an op kind with `quantizable`: dense, conv, conv_bn, add) the first
rule whose pattern matches the whole path (`re.fullmatch`) supplies its overrides; keys it does not set, and layers no rule matches, take the
defaults `quant.w_bits`, `quant.a_bits`, `quant.estimator`. Rules are resolved once against the
model's layer paths; a rule that matches no layer (or only layers that earlier rules already took)
is an error that lists the paths: it is almost always a typo.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from mpq.errors import UserError
from mpq.ops import registry as op_registry
from mpq.quant.core import MAX_BITS, MIN_BITS
from mpq.quant.layers import LayerQuant
from mpq.quant.quantizer import ESTIMATORS

KEYS = ("w_bits", "a_bits", "estimator", "a_per_channel")


def check_values(where: str, values: Mapping) -> None:
  """Raises UserError unless `values` holds only valid rule keys (w_bits, a_bits, estimator)."""
  for k, v in values.items():
    if k not in KEYS:
      raise UserError(f"{where}: unknown key {k!r}; rules may set {KEYS}")
    if k.endswith("_bits") and not (isinstance(v, (int, float)) and MIN_BITS <= v <= MAX_BITS
                                    and float(v).is_integer()):
      raise UserError(f"{where}: {k}={v!r} must be an integer from {MIN_BITS} to {MAX_BITS}")
    if k == "a_per_channel" and not isinstance(v, bool):
      raise UserError(f"{where}: a_per_channel={v!r} must be True or False")
    if k == "estimator" and v not in ESTIMATORS:
      raise UserError(f"{where}: estimator={v!r} is unknown; use one of {ESTIMATORS}")


def resolve(layer_kinds: Mapping[str, str], rules: Iterable, defaults: Mapping) -> dict[str, LayerQuant]:
  """`{path: LayerQuant}` for every quantizable layer in `layer_kinds` (`{path: kind}`)."""
  check_values("quant defaults", defaults)
  kinds = op_registry.quantizable()
  paths = [p for p, kind in layer_kinds.items() if kind in kinds]
  compiled = []
  for i, rule in enumerate(rules or ()):
    where = f"quant.rules[{i}]"
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            and isinstance(rule[1], Mapping)):
      raise UserError(f"{where}={rule!r} must be a pair (regex, dict(w_bits=..., a_bits=..., "
                      "estimator=...))")
    try:
      pattern = re.compile(rule[0])
    except re.error as e:
      raise UserError(f"{where}: bad regex {rule[0]!r} ({e})") from None
    check_values(where, rule[1])
    compiled.append((pattern, dict(rule[1])))
  table, used = {}, [False] * len(compiled)
  for path in paths:
    values = dict(defaults)
    for i, (pattern, overrides) in enumerate(compiled):
      if pattern.fullmatch(path):
        values.update(overrides)
        used[i] = True
        break
    table[path] = LayerQuant(float(values["w_bits"]), float(values["a_bits"]), values["estimator"],
                             bool(values.get("a_per_channel", False)))
  for i, u in enumerate(used):
    if u:
      continue
    pattern = compiled[i][0]
    hits = [p for p in paths if pattern.fullmatch(p)]
    if hits:
      raise UserError(f"quant.rules[{i}] pattern {pattern.pattern!r} never applies: earlier rules "
                      f"already match {', '.join(hits)}; reorder or remove it")
    raise UserError(f"quant.rules[{i}] pattern {pattern.pattern!r} matches no layer; "
                    f"layer paths: {', '.join(paths)}")
  return table
