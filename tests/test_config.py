"""mpq.config: the field table, base_config(), describe(), validate() and from_dict()."""

import glob
import importlib.util
import math
import os

import ml_collections
import pytest

from conftest import ROOT, run_cli
from mpq import config as config_lib
from mpq.errors import UserError

FIELDS = config_lib.FIELDS
RANGES = [f for f in FIELDS if isinstance(f.check, config_lib.Range)]
ENUMS = [f for f in FIELDS if isinstance(f.check, (config_lib.OneOf, config_lib.RuleValue))]
BOOLS = [f for f in FIELDS if isinstance(f.check, config_lib.Boolean)]


def _leaf_paths(c, prefix=""):
  """Dotted paths of a ConfigDict's fields (an empty ConfigDict such as model_kwargs is a field)."""
  out = []
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict) and len(v):
      out += _leaf_paths(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _config_for(path):
  """A fresh base config in which the check of `path` runs and its neighbours allow edge values."""
  c = config_lib.base_config()
  if path.startswith("mixed."):
    c.quant.enabled, c.mixed.enabled, c.mixed.weight_bits_avg = True, True, 4.0
  if path == "num_epochs":
    c.num_train_steps = 10  # num_epochs = 0 is fine when the length is given in steps
  return c


def _set(c, path, value, ignore_type=False):
  *groups, name = path.split(".")
  for g in groups:
    c = c[g]
  if ignore_type:
    with c.ignore_type():
      c[name] = value
  else:
    c[name] = value


def _outside(r):
  vals = []
  if r.lo is not None:
    vals.append(r.lo if r.lo_open else (r.lo - 1 if r.integer else math.nextafter(r.lo, -math.inf)))
  if r.hi is not None:
    vals.append(r.hi if r.hi_open else (r.hi + 1 if r.integer else math.nextafter(r.hi, math.inf)))
  return [v for v in vals if v not in r.also]


def _edges(r):
  vals = list(r.also)
  if r.lo is not None:
    vals.append((r.lo + 1 if r.integer else math.nextafter(r.lo, math.inf)) if r.lo_open else r.lo)
  if r.hi is not None:
    vals.append((r.hi - 1 if r.integer else math.nextafter(r.hi, -math.inf)) if r.hi_open else r.hi)
  return vals


def _assert_one_line_error(c, path):
  with pytest.raises(UserError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "\n" not in msg and f"config.{path}=" in msg, msg
  return msg


OUTSIDE = [(f.path, v) for f in RANGES for v in _outside(f.check)]
EDGES = [(f.path, v) for f in RANGES for v in _edges(f.check)]


def test_every_numeric_field_has_a_range():
  numeric = {f.path for f in FIELDS
             if isinstance(f.default, (int, float)) and not isinstance(f.default, bool)}
  assert numeric == {f.path for f in RANGES}
  for f in RANGES:  # each has at least one bound to test
    assert f.check.lo is not None or f.check.hi is not None, f.path


@pytest.mark.parametrize("path,value", OUTSIDE, ids=[f"{p}={v!r}" for p, v in OUTSIDE])
def test_value_outside_the_range_is_a_one_line_error(path, value):
  c = _config_for(path)
  _set(c, path, value)
  msg = _assert_one_line_error(c, path)
  assert "must be" in msg


NON_FINITE = [(f.path, v) for f in RANGES if not f.check.integer
              for v in (math.inf, -math.inf, math.nan) if v not in f.check.also]


@pytest.mark.parametrize("path,value", NON_FINITE, ids=[f"{p}={v!r}" for p, v in NON_FINITE])
def test_non_finite_float_is_a_one_line_error(path, value):
  # learning_rate=inf passed an open upper bound before; NaN fails every comparison
  c = _config_for(path)
  _set(c, path, value)
  assert "must be" in _assert_one_line_error(c, path)


@pytest.mark.parametrize("path,value", EDGES, ids=[f"{p}={v!r}" for p, v in EDGES])
def test_value_at_the_edge_of_the_range_validates(path, value):
  c = _config_for(path)
  _set(c, path, value)
  config_lib.validate(c)


@pytest.mark.parametrize("path", [f.path for f in RANGES])
def test_wrong_type_in_a_numeric_field(path):
  f = config_lib.FIELDS_BY_PATH[path]
  c = _config_for(path)
  _set(c, path, "3", ignore_type=True)
  _assert_one_line_error(c, path)
  if f.check.integer:
    c = _config_for(path)
    _set(c, path, 4.5, ignore_type=True)
    assert "integer" in _assert_one_line_error(c, path)


@pytest.mark.parametrize("path", [f.path for f in ENUMS])
def test_unknown_name_in_an_enumerated_field(path):
  c = _config_for(path)
  _set(c, path, "no_such_name")
  msg = _assert_one_line_error(c, path)
  assert f"config.{path}='no_such_name' is unknown; use " in msg


@pytest.mark.parametrize("path", [f.path for f in BOOLS])
@pytest.mark.parametrize("value", ["False", 1])
def test_bool_fields_hold_bools(path, value):
  c = _config_for(path)
  _set(c, path, value, ignore_type=True)
  assert "must be True or False" in _assert_one_line_error(c, path)


@pytest.mark.parametrize("path,value,fragment", [
    ("momentum", 1.5, "config.momentum=1.5 must be in [0, 1)"),
    ("batch_size", -4, "config.batch_size=-4 must be positive"),
    ("quant.w_bits", 17, "config.quant.w_bits=17 must be an integer from 2 to 16"),
    ("quant.noise_rng", "mt19937", "noise_rng='mt19937' is unknown; use 'hash' or 'threefry'"),
    ("mixed.a_bits", 1, "config.mixed.a_bits=1 must be 0 or an integer from 2 to 16"),
    ("mixed.bit_choices", (1, 4), "config.mixed.bit_choices=(1, 4) must be bitwidths from 2 to 16"),
    ("mixed.bit_choices", (), "must be bitwidths from 2 to 16"),
    ("mixed.pins", (("conv1",),), "config.mixed.pins[0]=('conv1',) must be a pair (regex, bits)"),
    ("quant.rules", (("conv1",),), "config.quant.rules[0]=('conv1',) must be a pair"),
    ("quant.param_lr", -0.1, "config.quant.param_lr=-0.1 must be >= 0"),
])
def test_messages(path, value, fragment):
  c = _config_for(path)
  _set(c, path, value)
  with pytest.raises(UserError) as e:
    config_lib.validate(c)
  assert fragment in str(e.value)


@pytest.mark.parametrize("changes,fragment", [
    ({"num_epochs": 0.0}, "set config.num_epochs > 0 or config.num_train_steps > 0"),
    ({"mixed.enabled": True}, "config.mixed.enabled=True needs config.quant.enabled=True"),
    ({"mixed.enabled": True, "quant.enabled": True, "mixed.method": "dbits"},
     "needs --config.quant.estimator=dbits"),
    ({"mixed.enabled": True, "quant.enabled": True, "mixed.method": "dbits",
      "quant.estimator": "dbits"}, "needs a size budget: config.mixed.weight_bits_avg"),
    ({"mixed.enabled": True, "quant.enabled": True, "mixed.latency_budget": 2.0},
     "set both config.mixed.latency_table and config.mixed.latency_budget, or neither"),
    ({"mixed.enabled": True, "quant.enabled": True, "mixed.latency_table": "t.json"},
     "set both config.mixed.latency_table and config.mixed.latency_budget, or neither"),
])
def test_cross_field_checks(changes, fragment):
  c = config_lib.base_config()
  for path, value in changes.items():
    _set(c, path, value)
  with pytest.raises(UserError, match=fragment.replace(".", r"\.")) as e:
    config_lib.validate(c)
  assert "\n" not in str(e.value)


def test_mixed_fields_are_checked_only_when_mixed_is_enabled():
  c = config_lib.base_config()
  c.mixed.a_bits, c.mixed.dbits_lr, c.mixed.method = 1, -1.0, "nope"
  config_lib.validate(c)
  c.quant.enabled, c.mixed.enabled = True, True
  with pytest.raises(UserError, match="config.mixed"):
    config_lib.validate(c)


def test_base_config_and_the_table_agree():
  c = config_lib.base_config()
  paths = _leaf_paths(c)
  assert sorted(paths) == sorted(f.path for f in FIELDS)
  assert len(set(paths)) == len(paths)
  for f in FIELDS:
    value = config_lib.get(c, f.path)
    if isinstance(f.default, dict):
      assert isinstance(value, ml_collections.ConfigDict) and value.to_dict() == f.default
    else:
      assert value == f.default and type(value) is type(f.default), f.path
    assert f.doc and "\n" not in f.doc, f.path
  assert c.quant.param_lr == 0.0 and isinstance(c.quant.param_lr, float)
  config_lib.validate(c)
  # fresh objects each time: changing one config leaves the next one at the defaults
  c.model_kwargs.width = 0.5
  assert "width" not in config_lib.base_config().model_kwargs


def test_describe_lists_every_field_once():
  text = config_lib.describe()
  starts = [line.split()[0] for line in text.splitlines() if line and not line[0].isspace()]
  for path in _leaf_paths(config_lib.base_config()):
    assert starts.count(path) == 1, path
  assert "quant.param_lr" in text and "learning rate of the quantizer parameters" in text
  assert "describe()" in config_lib.__doc__ and "python -m mpq.config" in config_lib.__doc__


def test_python_m_mpq_config_prints_the_fields():
  r = run_cli("-m", "mpq.config")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == config_lib.describe().strip()


def test_from_dict_fills_missing_fields_with_defaults():
  stored = config_lib.base_config().to_dict()
  stored["batch_size"] = 7
  stored["quant"]["w_bits"] = 4
  del stored["momentum"], stored["quant"]["param_lr"], stored["mixed"]["lagrange_lr"]
  c = config_lib.from_dict(stored)
  assert c.batch_size == 7 and c.quant.w_bits == 4
  assert c.momentum == 0.9 and c.quant.param_lr == 0.0 and c.mixed.lagrange_lr == 0.05
  assert sorted(_leaf_paths(c)) == sorted(f.path for f in FIELDS)
  config_lib.validate(c)


CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[os.path.basename(p) for p in CONFIG_FILES])
def test_every_config_file_validates(path):
  spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_lib.validate(module.get_config())


def test_cli_rejects_an_out_of_range_field_before_creating_the_workdir(tmp_path):
  wd = tmp_path / "w"
  r = run_cli("train.py", "--config=configs/tiny.py", f"--workdir={wd}", "--config.momentum=1.5")
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "config.momentum=1.5 must be in [0, 1)" in lines[0]
  assert not wd.exists()
