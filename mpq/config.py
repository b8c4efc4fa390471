"""The base config every file in `configs/` starts from: its fields, defaults and checks.

Every field is declared once, in `FIELDS` below: its path, its default, a line of documentation and
the values it allows. `base_config()` builds the `ml_collections.ConfigDict` from that table,
`validate()` checks a config against it (plus the few checks that involve several fields), and
`describe()` -- or `python -m mpq.config` -- prints the fields with their defaults, documentation
and allowed values. Override any field on the command line as `--config.FIELD=VALUE`, e.g.
`--config.quant.w_bits=4`.

The names of registries (models, augmentations, calibration methods, noise generators, estimators)
are fetched when a config is validated, not when this module is imported: `mpq.quant` must never
import `mpq.config`, and importing this module stays cheap for the config files.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import textwrap
from typing import Any, Callable, ClassVar, Iterable, Union

import ml_collections

from mpq.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")
MIXED_METHODS = ("ilp", "dbits")
SENSITIVITIES = ("hessian", "measured")
SOLVERS = ("ilp", "greedy")


# ------------------------------------------------------------------------------------------ checks
def _fmt(value) -> str:
  """A value as `config.PATH=<this>` shows it: repr, lists as tuples, numpy scalars as Python."""
  if isinstance(value, list):
    value = tuple(value)
  if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)) \
      and hasattr(value, "item"):
    value = value.item()
  return repr(value)


def _msg(path: str, value, complaint: str) -> str:
  return f"config.{path}={_fmt(value)} {complaint}"


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _choices(names) -> str:
  names = [repr(n) for n in names]
  if len(names) <= 2:
    return " or ".join(names)
  return "one of " + ", ".join(names)


class Check:
  """What a field allows. `check(path, value)` is None when `value` is allowed, else the one-line
  message (`config.PATH=VALUE must be ...`); `allowed()` says what is allowed, for `describe()`."""

  def __call__(self, path: str, value) -> str | None:
    raise NotImplementedError

  def allowed(self) -> str:
    """What is allowed, for describe() ('' when the documentation already says it)."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Range(Check):
  """A number (an integer with `integer`) between `lo` and `hi` (None: unbounded), or one of
  `also` (e.g. 0 for "off")."""
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  integer: bool = False
  also: tuple = ()

  def inside(self, v) -> bool:
    ok = True
    if self.lo is not None:
      ok = v > self.lo if self.lo_open else v >= self.lo
    if self.hi is not None:
      ok = ok and (v < self.hi if self.hi_open else v <= self.hi)
    return bool(ok)  # False for NaN

  def _prefix(self) -> str:
    return "".join(f"{_fmt(a)} or " for a in self.also)

  def _bounds(self) -> str:
    lo, hi = self.lo, self.hi
    if lo is not None and hi is not None:
      if self.integer and not self.lo_open and not self.hi_open:
        return f"an integer from {lo} to {hi}"
      return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
    if lo is not None:
      if lo == 0 and self.lo_open:
        return "positive"
      return f"{'>' if self.lo_open else '>='} {lo}"
    if hi is not None:
      return f"{'<' if self.hi_open else '<='} {hi}"
    return "any number"

  def allowed(self) -> str:
    b = self._bounds()
    if b.startswith("an integer"):
      kind = b
    elif b == "positive":
      kind = "a positive integer" if self.integer else "a positive number"
    elif b == "any number":
      kind = "an integer" if self.integer else "a number"
    else:
      kind = f"{'an integer' if self.integer else 'a number'} {b}"
    return self._prefix() + kind

  def __call__(self, path, value):
    if not _is_number(value) or (self.integer and not _is_int(value)):
      return _msg(path, value, f"must be {self.allowed()}")
    if value in self.also:
      return None
    if not math.isfinite(value):  # inf passes an open upper bound
      return _msg(path, value, f"must be finite ({self._prefix()}{self._bounds()})")
    if self.inside(value):
      return None
    return _msg(path, value, f"must be {self._prefix()}{self._bounds()}")


@dataclasses.dataclass(frozen=True)
class OneOf(Check):
  """One of a fixed set of names; `names` is a tuple, or a callable that fetches them (a registry,
  imported only when a config is checked)."""
  names: Union[tuple, Callable[[], Iterable[str]]]

  def resolve(self) -> tuple:
    names = self.names() if callable(self.names) else self.names
    return tuple(sorted(names)) if isinstance(names, dict) else tuple(names)

  def allowed(self) -> str:
    return _choices(self.resolve())

  def __call__(self, path, value):
    names = self.resolve()
    if isinstance(value, str) and value in names:
      return None
    return _msg(path, value, f"is unknown; use {_choices(names)}")


@dataclasses.dataclass(frozen=True)
class TypeCheck(Check):
  """A value of one of `types`, else `config.PATH=VALUE <complaint>`; allowed() is obvious."""
  types: ClassVar[tuple] = ()
  complaint: ClassVar[str] = ""

  def allowed(self):
    return ""

  def __call__(self, path, value):
    return None if isinstance(value, self.types) else _msg(path, value, self.complaint)


class Boolean(TypeCheck):
  types, complaint = (bool,), "must be True or False"


class String(TypeCheck):
  types, complaint = (str,), "must be a string"


class Kwargs(TypeCheck):
  types, complaint = (dict, ml_collections.ConfigDict), "must be a dict of keyword arguments"


@dataclasses.dataclass(frozen=True)
class Pairs(Check):
  """A tuple (or list) of pairs whose first element is a string, as `what` shows, e.g.
  '(regex, bits)'; empty is allowed."""
  what: str

  def allowed(self):
    return f"a tuple of {self.what} pairs"

  def __call__(self, path, value):
    if not isinstance(value, (tuple, list)):
      return _msg(path, value, f"must be a tuple of {self.what} pairs")
    for i, pair in enumerate(value):
      if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
        return _msg(f"{path}[{i}]", pair, f"must be a pair {self.what}")
    return None


@dataclasses.dataclass(frozen=True)
class Bitwidths(Check):
  """A non-empty tuple of integer bitwidths from `lo` to `hi`."""
  lo: int = 2
  hi: int = 16

  def allowed(self):
    return f"bitwidths from {self.lo} to {self.hi}"

  def __call__(self, path, value):
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
        _is_number(b) and float(b).is_integer() and self.lo <= b <= self.hi for b in value)
    return None if ok else _msg(path, value, f"must be {self.allowed()}")


@dataclasses.dataclass(frozen=True)
class RuleValue(Check):
  """A default of the per-layer quantization rules (w_bits, a_bits or estimator), checked by
  `mpq.quant.rules.check_values`, which also checks every entry of `quant.rules`."""
  key: str

  def allowed(self):
    return ""  # the field's doc names them; mpq.quant.rules checks

  def __call__(self, path, value):
    from mpq.quant import rules  # pylint: disable=g-import-not-at-top
    where = f"config.{path}"
    try:
      rules.check_values(where, {self.key: value})
    except UserError as e:
      text = " ".join(str(e).split())
      head = f"{where}: {self.key}={value!r} "
      complaint = text[len(head):] if text.startswith(head) else f"is not allowed: {text}"
      return _msg(path, value, complaint)
    return None


def positive(integer: bool = False) -> Range:
  return Range(lo=0, lo_open=True, integer=integer)


def at_least(x, integer: bool = False) -> Range:
  return Range(lo=x, integer=integer)


def in_range(lo, hi, lo_open: bool = False, hi_open: bool = False, integer: bool = False,
             also: tuple = ()) -> Range:
  return Range(lo, hi, lo_open, hi_open, integer, also)


def bits(also: tuple = ()) -> Range:
  """A bitwidth, as the quantizer takes (`mpq.quant.core.MIN_BITS`..`MAX_BITS`; validate also asks
  `mpq.quant.rules.check_values`, so the two cannot drift apart unnoticed)."""
  return in_range(2, 16, integer=True, also=also)


def one_of(names) -> OneOf:
  return OneOf(names)


# Registries, fetched when a config is checked (function-level imports: importing mpq.config stays
# cheap, and mpq.quant never imports it).
def _augmentations():
  from mpq.data import AUGMENTATIONS  # pylint: disable=g-import-not-at-top
  return AUGMENTATIONS


def _models():
  from mpq.models import MODELS  # pylint: disable=g-import-not-at-top
  return sorted(MODELS)


def _families():
  from mpq.export.targets import emulation_names  # pylint: disable=g-import-not-at-top
  return ("",) + emulation_names()


def _act_methods():
  from mpq.quant.calibration import ACT_METHODS  # pylint: disable=g-import-not-at-top
  return ACT_METHODS


def _weight_methods():
  from mpq.quant.calibration import WEIGHT_METHODS  # pylint: disable=g-import-not-at-top
  return WEIGHT_METHODS


def _noise_rngs():
  from mpq.quant.estimators import NOISE_RNGS  # pylint: disable=g-import-not-at-top
  return NOISE_RNGS


# ------------------------------------------------------------------------------------------- table
@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: dotted `path` (e.g. 'quant.w_bits'), default, one line of documentation, the
  values it allows, and `only_if`: the path of a bool field that must be True for the check to run
  (the mixed.* fields are checked only with mixed.enabled). `legacy`: the value a config saved
  before the field existed means (`from_dict`), where that differs from the default."""
  path: str
  default: Any
  doc: str
  check: Check | None = None
  only_if: str | None = None
  legacy: Any = None


def _mixed(path, default, doc, check) -> Field:
  return Field(f"mixed.{path}", default, doc, check, only_if="mixed.enabled")


# Section headings for describe().
SECTIONS = {
    "quant": "quantization-aware training (off: quant.enabled=False)",
    "mixed": "mixed-precision allocation before QAT (needs quant.enabled and init_from); checked "
             "only with mixed.enabled",
}

FIELDS: tuple[Field, ...] = (
    # data
    Field("dataset", "fashion_mnist",
          "'fashion_mnist' (local IDX files) or 'tfds:NAME' (a TFDS dataset prepared in "
          "array_record format)", String()),
    Field("data_dir", "", "where the dataset lives ('' = the default places)", String()),
    Field("input_norm", "pixel", "how uint8 images become model inputs: 'pixel' (x = (p - z) s, "
          "z = round(255 mean) and s = 1 / (255 std), one of each for all channels: the inputs lie "
          "on an 8-bit grid, which is the first layer's input quantizer, fixed, so exports take the "
          "uint8 image exactly) or 'channel' (per-channel mean and std; the first quantizer is "
          "learned like the others; runs from before the pixel grid)", one_of(("pixel", "channel")),
          legacy="channel"),
    Field("num_train_examples", 0, "keep only the first N training examples (0 = all)",
          at_least(0, integer=True)),
    Field("num_test_examples", 0, "keep only the first N test examples (0 = all)",
          at_least(0, integer=True)),
    Field("augment", "none", "training augmentation: random crop with 4-pixel padding and/or "
          "horizontal flip", one_of(_augmentations)),
    # model
    Field("model", "cnn", "a name from mpq.models.MODELS", one_of(_models)),
    Field("model_kwargs", {}, "the model's keyword arguments, set in a config file (e.g. "
          "c.model_kwargs.width = 0.25)", Kwargs()),
    # optimisation
    Field("batch_size", 128, "global training batch (split over devices and processes)",
          positive(integer=True)),
    Field("eval_batch_size", 500, "global batch for evaluation", positive(integer=True)),
    Field("num_epochs", 10.0, "training length in epochs (may be fractional), unless "
          "num_train_steps > 0", at_least(0)),
    Field("num_train_steps", -1, "training length in steps when > 0 (wins over num_epochs); -1 or "
          "0: use num_epochs", at_least(-1, integer=True)),
    Field("optimizer", "adamw", "sgd uses momentum (Nesterov)",
          one_of(OPTIMIZERS)),
    Field("momentum", 0.9, "sgd: Nesterov momentum", in_range(0, 1, hi_open=True)),
    Field("learning_rate", 1e-3, "peak learning rate", positive()),
    Field("schedule", "cosine", "learning-rate schedule after warmup_steps of linear warm-up; "
          "cosine decays to 0", one_of(SCHEDULES)),
    Field("warmup_steps", 0, "steps of linear learning-rate warm-up from 0",
          at_least(0, integer=True)),
    Field("weight_decay", 1e-4, "decoupled (adamw) or L2 added to the gradient (sgd, adam); "
          "kernels only", at_least(0)),
    Field("grad_clip_norm", 0.0, "clip the global gradient norm to this (0 = off)", at_least(0)),
    Field("label_smoothing", 0.0, "label smoothing of the cross-entropy loss",
          in_range(0, 1, hi_open=True)),
    Field("seed", 0, "model init, data order and augmentation", at_least(0, integer=True)),
    # bookkeeping
    Field("log_every", 50, "steps between metric lines / TensorBoard points",
          positive(integer=True)),
    Field("eval_every", 0, "steps between evaluations on the test split (0 = once per epoch)",
          at_least(0, integer=True)),
    Field("checkpoint_every", 0, "steps between checkpoints (0 = once per epoch); the last step "
          "is always saved", at_least(0, integer=True)),
    Field("keep_checkpoints", 3, "how many recent checkpoints to keep (the best is kept "
          "separately)", at_least(1, integer=True)),
    Field("init_from", "", "a workdir whose latest checkpoint initialises the model (e.g. a float "
          "model; '' = off)", String()),
    # quantization-aware training
    Field("quant.enabled", False, "train with fake-quantized weights and activations", Boolean()),
    Field("quant.w_bits", 8, "default bitwidth of every dense/conv weight", bits()),
    Field("quant.a_bits", 8, "default bitwidth of every layer input", bits()),
    Field("quant.estimator", "lsq", "default gradient estimator: none, ste, lsq, lsq+, tqt, noise "
          "or dbits", RuleValue("estimator")),
    Field("quant.a_per_channel", False, "default granularity of dense/conv inputs: per tensor "
          "(False) or one scale per input channel, the last axis (True: fake quant only, calibrated "
          "by calib_act max or percentile; integer export needs per-tensor inputs; additions stay "
          "per tensor)", Boolean()),
    Field("quant.param_optimizer", "model", "how quantizer parameters train: 'model' (the model's "
          "optimizer and schedule, without weight decay) or 'declared' (the optimizer each "
          "estimator declares, at quant.param_lr; see the README)", one_of(("model", "declared"))),
    Field("quant.param_lr", 0.0, "learning rate of the quantizer parameters' own optimizer (each "
          "estimator declares its optimizer and a scale); 0: the model's learning_rate with "
          "adam/adamw, 1e-3 with sgd", at_least(0)),
    Field("quant.rules", (), "ordered (regex, dict(w_bits=, a_bits=, estimator=)) pairs over layer "
          "paths, the first full match wins (see mpq.quant.rules)",
          Pairs("(regex, dict(w_bits=..., a_bits=..., estimator=...))")),
    Field("quant.target", "", "a kernel family (mpq, litert-ref, litert-ruy, litert-auto, ort) "
          "that the run targets from the start: every evaluation runs the model as that family "
          "computes it (lowered for the family's format, multipliers derived from float32 scales "
          "as the runtime derives them, in mpq's executor emulating the family), and eval.py "
          "evaluates and exports for it, so that evaluation, executor and runtime agree bit for "
          "bit; training's forward is unchanged ('' = evaluate the fake-quant forward)",
          one_of(_families)),
    Field("quant.calib_act", "percentile", "activation calibration before training",
          one_of(_act_methods)),
    Field("quant.calib_weight", "mse", "weight calibration (per channel)", one_of(_weight_methods)),
    Field("quant.calib_percentile", 99.99, "percentile of calib_act='percentile'",
          in_range(0, 100, lo_open=True)),
    Field("quant.calib_batches", 4, "training batches used for calibration",
          at_least(1, integer=True)),
    Field("quant.bn_freeze_step", -1, "training steps after which folded BatchNorm uses its EMA "
          "statistics (-1 = never)", at_least(-1, integer=True)),
    Field("quant.ema_decay", 0.99, "EMA decay of the activation ranges of the ste estimator",
          in_range(0, 1, hi_open=True)),
    Field("quant.noise_lambda0", 0.5, "noise estimator: amplitude lambda0 * exp(-step / noise_tau)",
          at_least(0)),
    Field("quant.noise_tau", 1000.0, "noise estimator: decay of the amplitude, in steps",
          positive()),
    Field("quant.noise_rng", "hash", "noise estimator's U(-1, 1) generator: hash is a counter "
          "hash (cheap), threefry is jax.random (see mpq.quant.estimators.noise_uniform)",
          one_of(_noise_rngs)),
    Field("quant.osc_dampen", 0.0, "oscillation dampening (Nagel et al. 2022): final loss weight "
          "(0 = off), annealed from 0 with a half cosine", at_least(0)),
    Field("quant.osc_freeze", 0.0, "iterative weight freezing: oscillation-frequency threshold "
          "(0 = off); with folded BatchNorm it needs bn_freeze_step >= 0",
          in_range(0, 1, hi_open=True)),
    Field("quant.osc_track", False, "log per-layer oscillation frequencies (osc/...) without "
          "freezing", Boolean()),
    Field("quant.osc_momentum", 0.01, "EMA momentum of the oscillation frequency",
          in_range(0, 1, lo_open=True)),
    Field("quant.teacher_workdir", "", "knowledge distillation from this run's latest checkpoint "
          "('' = off)", String()),
    Field("quant.distill_weight", 0.5, "w in loss = (1 - w) CE + w T^2 KL(teacher || student)",
          in_range(0, 1)),
    Field("quant.distill_temperature", 1.0, "distillation temperature T", positive()),
    # mixed precision
    Field("mixed.enabled", False, "allocate per-layer bitwidths before QAT", Boolean()),
    _mixed("method", "ilp", "ilp: sensitivities + exact ILP under the budgets; dbits: learned "
           "continuous bits under a Lagrangian size budget, then ILP rounding and fine-tuning "
           "(needs quant.estimator='dbits' and weight_bits_avg)",
           one_of(MIXED_METHODS)),
    _mixed("sensitivity", "hessian", "hessian: Hutchinson trace x quantization error; measured: "
           "loss increase", one_of(SENSITIVITIES)),
    _mixed("solver", "ilp", "allocation solver: exact ILP, or greedy (the baseline)",
           one_of(SOLVERS)),
    _mixed("bit_choices", (2, 3, 4, 5, 6, 8), "candidate bitwidths", Bitwidths()),
    _mixed("a_bits", 0, "activation bits: 0 ties them to the weight bits' choices, > 0 fixes them",
           bits(also=(0,))),
    _mixed("weight_bits_avg", 0.0, "budget: average weight bits over the allocated layers, i.e. "
           "model size (0 = not constrained)", at_least(0)),
    _mixed("bops_ratio", 0.0, "budget: BOPs as a fraction of W8A8 (0 = not constrained)",
           at_least(0)),
    _mixed("activation_bits_max", 0, "no layer's activations above this many bits (0 = no limit)",
           at_least(0, integer=True)),
    _mixed("latency_table", "", "JSON file {\"layer\": {\"w4a4\": ms, ...}} for latency_budget "
           "('' = none)", String()),
    _mixed("latency_budget", 0.0, "budget: summed latency from latency_table (0 = not "
           "constrained)", at_least(0)),
    _mixed("pins", (), "(regex, bits) pairs, first match wins, e.g. (('conv1|head', 8),)",
           Pairs("(regex, bits)")),
    _mixed("calib_examples", 256, "training examples for the sensitivities",
           at_least(1, integer=True)),
    _mixed("hutchinson_tol", 0.05, "Hutchinson stopping rule: relative standard error of the "
           "trace", positive()),
    _mixed("hutchinson_max_probes", 32, "Hutchinson: most probes per layer",
           at_least(1, integer=True)),
    _mixed("dbits_fraction", 0.5, "dbits: fraction of training with learned bits before "
           "rounding", in_range(0, 1, lo_open=True, hi_open=True)),
    _mixed("dbits_lr", 0.01, "dbits: Adam learning rate of the continuous bits", positive()),
    _mixed("lagrange_lr", 0.05, "dbits: dual-ascent step of the budget's Lagrange multiplier",
           positive()),
)

FIELDS_BY_PATH = {f.path: f for f in FIELDS}
assert len(FIELDS_BY_PATH) == len(FIELDS), "a config field is declared twice"


def get(config, path: str):
  """`config`'s value at a dotted path, e.g. get(config, 'quant.w_bits')."""
  for key in path.split("."):
    config = config[key]
  return config


# --------------------------------------------------------------------------------------------- API
def base_config() -> ml_collections.ConfigDict:
  """A fresh ConfigDict of every field in `FIELDS` at its default."""
  c = ml_collections.ConfigDict()
  for f in FIELDS:
    *groups, name = f.path.split(".")
    d = c
    for g in groups:
      if g not in d:
        d[g] = ml_collections.ConfigDict()
      d = d[g]
    default = f.default
    d[name] = ml_collections.ConfigDict(dict(default)) if isinstance(default, dict) else default
  return c


def from_dict(stored: dict) -> ml_collections.ConfigDict:
  """A config saved by an earlier run (checkpoint metadata) over today's defaults, so that fields
  added since then take their default values."""
  config = base_config()

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and k in dst and isinstance(dst[k], ml_collections.ConfigDict):
        merge(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  merge(config, stored)
  for f in FIELDS:  # fields the saved config predates take the value that meant then
    if f.legacy is not None and not _has(stored, f.path):
      *groups, name = f.path.split(".")
      d = config
      for g in groups:
        d = d[g]
      d[name] = f.legacy
  return config


def _has(d: dict, path: str) -> bool:
  for k in path.split("."):
    if not isinstance(d, dict) or k not in d:
      return False
    d = d[k]
  return True


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError (one line: `config.PATH=VALUE must be ...`) for the first field whose value
  `FIELDS` does not allow, or for a combination of fields that does not work together."""

  def check(ok, msg):
    if not ok:
      raise UserError(msg)

  for f in FIELDS:
    if f.check is None or (f.only_if and not get(config, f.only_if)):
      continue
    error = f.check(f.path, get(config, f.path))
    if error:
      raise UserError(error)

  check(config.num_train_steps > 0 or config.num_epochs > 0,
        "set config.num_epochs > 0 or config.num_train_steps > 0")
  qc, mc = config.quant, config.mixed
  # The quantizer's own rule check (the one every quant.rules entry gets) on the defaults too.
  from mpq.quant import rules  # pylint: disable=g-import-not-at-top
  rules.check_values("config.quant", {"w_bits": qc.w_bits, "a_bits": qc.a_bits,
                                      "estimator": qc.estimator})
  per_channel = qc.a_per_channel or any(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[1], dict)
      and r[1].get("a_per_channel") for r in qc.rules)
  check(not (qc.enabled and per_channel) or qc.calib_act in ("max", "percentile"),
        f"config.quant.calib_act={qc.calib_act!r} cannot calibrate per-channel activations "
        "(a_per_channel); use max or percentile")
  if qc.target:
    check(qc.enabled, f"config.quant.target={qc.target!r} targets a quantized model: set "
          "config.quant.enabled=True")
    from mpq.export.targets import for_emulation  # pylint: disable=g-import-not-at-top
    owner = for_emulation(qc.target)
    check(not owner.pixel_input or config.input_norm == "pixel",
          f"config.quant.target={qc.target!r} runs {owner.name} files, which take the uint8 image: "
          "set config.input_norm='pixel'")
  if mc.enabled:
    check(qc.enabled, "config.mixed.enabled=True needs config.quant.enabled=True")
    if mc.method == "dbits":
      from mpq.quant import methods  # pylint: disable=g-import-not-at-top
      check(methods.get(qc.estimator).learns_bits,  # an estimator with learned bits
            f"config.mixed.method='dbits' needs --config.quant.estimator=dbits "
            f"(config.quant.estimator={qc.estimator!r})")
      check(mc.weight_bits_avg > 0,
            "config.mixed.method='dbits' needs a size budget: config.mixed.weight_bits_avg > 0")
    check(bool(mc.latency_table) == (mc.latency_budget > 0),
          "set both config.mixed.latency_table and config.mixed.latency_budget, or neither")


def describe() -> str:
  """The fields as text: path, default, documentation and allowed values, one field a line (long
  lines continue indented)."""
  width = 110
  pw = max(len(f.path) for f in FIELDS) + 2
  dw = min(max(len(_fmt(f.default)) for f in FIELDS), 20) + 2
  lines = ["Config fields (override any on the command line as --config.PATH=VALUE):",
           f"{'PATH':<{pw}}{'DEFAULT':<{dw}}DESCRIPTION; ALLOWED VALUES", ""]
  section = None
  for f in FIELDS:
    group = f.path.split(".")[0] if "." in f.path else None
    if group != section:
      section = group
      if group:
        lines += ["", f"{group}.*: {SECTIONS.get(group, '')}"]
    default = _fmt(f.default) if not isinstance(f.default, dict) else "{}"
    head = f"{f.path:<{pw}}{default:<{dw - 1}} "
    allowed = f.check.allowed() if f.check is not None else ""
    text = f"{f.doc}; {allowed}" if allowed else f.doc
    lines += textwrap.wrap(text, width=max(width, len(head) + 30), initial_indent=head,
                           subsequent_indent=" " * len(head), break_on_hyphens=False)
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(describe())
