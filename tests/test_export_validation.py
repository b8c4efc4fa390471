"""Exported integer models are validated on load, field by field, with one-line errors; an export
never replaces anything but an earlier export, and a failed one leaves that intact (issue 18).

One tiny quantized model (conv+ReLU, max pool, conv, residual add with ReLU6, global average
pooling, dense head; 2-8 bits, uncalibrated) is exported once; each corruption is applied to a
copy of that export.
"""

import dataclasses
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from flax import nnx

from mpq import export
from mpq.export import ExportError, exporter, targets

SHAPE = (12, 12, 1)


class Tiny(nnx.Module):
  def __init__(self, f, rngs):
    self.conv1 = f.conv_bn("conv1", 1, 4, 3, signed_input=True, activation="relu", rngs=rngs)
    self.pool = f.max_pool("pool", 2)
    self.conv2 = f.conv("conv2", 4, 4, 3, signed_input=False, rngs=rngs)
    self.add = f.add("add", activation="relu6")
    self.gap = f.avg_pool("gap")
    self.head = f.dense("head", 4, 10, signed_input=False, rngs=rngs)

  def __call__(self, x, train=False):
    y = self.pool(self.conv1(x, train), train)
    y = self.add(self.conv2(y, train), y, train)
    return self.head(self.gap(y, train), train)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(model, its export directory, the manifest)."""
  from mpq.quant.layers import LayerQuant, QuantLayers
  table = {"conv1": LayerQuant(8, 8, "lsq"), "conv2": LayerQuant(4, 6, "lsq"),
           "add": LayerQuant(8, 8, "lsq"), "head": LayerQuant(2, 4, "lsq")}
  model = Tiny(QuantLayers(table), nnx.Rngs(0))
  out = tmp_path_factory.mktemp("tiny") / "int"
  manifest = export.export(model, SHAPE, str(out))
  return model, out, manifest


def _op(m, name):
  return next(o for o in m["ops"] if o["name"] == name)


def _set(field, value, op=None):
  def edit(m):
    (m if op is None else _op(m, op))[field] = value
  return edit


def _del(field, op=None):
  def edit(m):
    del (m if op is None else _op(m, op))[field]
  return edit


def _tensor(name, fn):
  """A weights.npz edit: replaces array `name` by `fn(array)`."""
  def edit(w):
    w[name] = fn(w[name])
  return edit


def _raw(data: bytes, file="weights.npz"):
  def edit(d):
    (d / file).write_bytes(data)
  return edit


def _truncate(file="weights.npz"):
  def edit(d):
    data = (d / file).read_bytes()
    (d / file).write_bytes(data[:len(data) // 2])
  return edit


def _object_array(d):
  w = dict(np.load(d / "weights.npz"))
  w["conv1/bias"] = np.asarray([{"a": 1}, None], dtype=object)
  np.savez(d / "weights.npz", **w)  # np.savez pickles object arrays


def _remove(file):
  def edit(d):
    os.remove(d / file)
  return edit


M, W, F = "manifest", "weights", "files"
NAN = float("nan")
CORRUPTIONS = [
    # manifest.json: the file, the top-level keys, the input spec
    ("not_json", F, _raw(b'{"format": "mpq-int", "ops": [', "manifest.json"),
     r"manifest.json is not valid JSON \(Expecting value at line 1"),
    ("json_list", F, _raw(b"[1, 2]", "manifest.json"), r"manifest.json is not a JSON object"),
    ("no_manifest", F, _remove("manifest.json"), r"holds no manifest.json"),
    ("missing_ops", M, _del("ops"), r"manifest.json: missing top-level key 'ops'"),
    ("missing_num_classes", M, _del("num_classes"), r"missing top-level key 'num_classes'"),
    ("missing_input", M, _del("input"), r"missing top-level key 'input'"),
    ("version", M, _set("version", 99), r"version 99 is not 'mpq-int' version 1"),
    ("ops_not_list", M, _set("ops", {"a": 1}), r"top-level key 'ops' must be a list"),
    ("num_classes_str", M, _set("num_classes", "10"), r"'num_classes' must be an integer"),
    ("op_not_object", M, lambda m: m["ops"].__setitem__(2, 5), r"ops\[2\] must be an object"),
    ("input_shape_rank", M, lambda m: m["input"].update(shape=[12, 12]),
     r"input field 'shape' must be \[H, W, C\]"),
    ("input_scale_negative", M, lambda m: m["input"].update(scale=-0.1),
     r"input field 'scale' must be a finite number > 0 \(got -0.1\)"),
    ("input_bits_1", M, lambda m: m["input"].update(bits=1),
     r"input field 'bits' must be an integer from 2 to 16"),
    ("input_zero_point_off_grid", M, lambda m: m["input"].update(zero_point=300),
     r"input field 'zero_point' must be an integer from -128 to 127"),
    # quantize
    ("quantize_bits_1", M, _set("bits", 1, "conv1/input"),
     r"'conv1/input' \(quantize\): field 'bits' must be an integer from 2 to 16 \(got 1\)"),
    ("quantize_scale_nan", M, _set("scale", NAN, "conv1/input"),
     r"\(quantize\): field 'scale' must be a finite number > 0 \(got nan\)"),
    ("quantize_scale_negative", M, _set("scale", -0.5, "conv1/input"),
     r"\(quantize\): field 'scale' must be a finite number > 0 \(got -0.5\)"),
    ("quantize_scale_zero", M, _set("scale", 0, "conv1/input"),
     r"\(quantize\): field 'scale' must be a finite number > 0 \(got 0\)"),
    ("quantize_scale_string", M, _set("scale", "0.1", "conv1/input"),
     r"\(quantize\): field 'scale' must be a finite number > 0"),
    ("quantize_qmax_beyond_bits", M, _set("qmax", 1000, "conv1/input"),
     r"\(quantize\): field 'qmax' must be an integer from -127 to 127"),
    ("quantize_differs_from_spec", M, _set("zero_point", 1, "conv1/input"),
     r"\(quantize\): field 'zero_point' is 1, but the input spec says 0"),
    ("quantize_not_first", M, lambda m: m["ops"].insert(1, dict(m["ops"][0], output="tq")),
     r"\(quantize\): field 'op' 'quantize' may only be the first op"),
    # requantize
    ("multiplier_int64", W, _tensor("conv1->conv2/multiplier", lambda a: a.astype(np.int64)),
     r"'conv1->conv2' \(requantize\): field 'multiplier' must name a non-empty 1-d int32 tensor"),
    ("multiplier_negative", W, _tensor("conv1->conv2/multiplier", lambda a: -a),
     r"field 'multiplier' must hold integers >= 0"),
    ("shift_wrong_shape", W, _tensor("conv1->conv2/shift", lambda a: a[:2]),
     r"field 'shift' must name an int32 tensor of the multiplier's shape \(4,\)"),
    ("multiplier_missing", M, _set("multiplier", "nope", "conv1->conv2"),
     r"field 'multiplier' names no tensor in weights.npz \(got 'nope'\)"),
    ("requantize_bits_17", M, _set("bits", 17, "conv1->conv2"),
     r"\(requantize\): field 'bits' must be an integer from 2 to 16"),
    ("clamp_beyond_bits", M, _set("clamp", [0, 300], "conv1->conv2"),
     r"field 'clamp' must be \[lo, hi\] integers with lo <= hi on a 6-bit grid"),
    ("clamp_floats", M, _set("clamp", [0.0, 63.0], "conv1->conv2"),
     r"field 'clamp' must be \[lo, hi\] integers"),
    # dequantize
    ("dequantize_scale_nan", M, lambda m: m["ops"][-1]["scale"].__setitem__(3, NAN),
     r"'head/output' \(dequantize\): field 'scale' must be a non-empty list of finite numbers > 0 "
     r"\(holds nan\)"),
    ("dequantize_scale_empty", M, lambda m: m["ops"][-1].update(scale=[]),
     r"\(dequantize\): field 'scale' must be a non-empty list"),
    ("dequantize_scale_count", M, _set("num_classes", 7),
     r"\(dequantize\): field 'scale' must have 1 or num_classes = 7 entries, not 10"),
    ("output_name", M, _set("output", "probs"),
     r"\(dequantize\): field 'output' is 'logits', but the manifest's output is 'probs'"),
    # dense / conv2d
    ("missing_weight_shape", M, _del("weight_shape", "conv1"),
     r"'conv1' \(conv2d\): field 'weight_shape' must be \[kh, kw, cin/groups, cout\] positive "
     r"integers \(missing\)"),
    ("weight_shape_zero", M, _set("weight_shape", [4, 0], "head"),
     r"'head' \(dense\): field 'weight_shape' must be \[in, out\] positive integers"),
    ("weight_wrong_size_int8", W, _tensor("conv1/weight", lambda a: a[:-1]),
     r"'conv1' \(conv2d\): field 'weight' must name an int8 tensor of shape \(36,\): 36 weights "
     r"of 8 bits \(3x3x1x4\), one per element; weights.npz holds 'conv1/weight' as int8 of shape "
     r"\(35,\)"),
    ("weight_wrong_size_packed", W, _tensor("conv2/weight", lambda a: np.concatenate([a, a])),
     r"'conv2' \(conv2d\): field 'weight' must name a uint8 tensor of shape \(72,\): 144 weights "
     r"of 4 bits \(3x3x4x4\), packed 2 per byte"),
    ("weight_shape_bigger_than_array", M, _set("weight_shape", [3, 3, 4, 8], "conv2"),
     r"'conv2' \(conv2d\): field 'weight' must name a uint8 tensor of shape \(144,\)"),
    ("float_weights", W, _tensor("conv1/weight", lambda a: a.astype(np.float32)),
     r"'conv1' \(conv2d\): field 'weight' must name an int8 tensor .* holds 'conv1/weight' as "
     r"float32"),
    ("float_weights_packed", W, _tensor("head/weight", lambda a: a.astype(np.float64)),
     r"'head' \(dense\): field 'weight' must name a uint8 tensor"),
    ("weight_values_beyond_bits", M, _set("w_bits", 5, "conv1"),
     r"'conv1' \(conv2d\): field 'weight' holds values outside 5 bits"),
    ("w_bits_1", M, _set("w_bits", 1, "conv1"), r"field 'w_bits' must be an integer from 2 to 16"),
    ("bias_int64", W, _tensor("conv1/bias", lambda a: a.astype(np.int64)),
     r"'conv1' \(conv2d\): field 'bias' must name an int32 tensor of shape \(4,\)"),
    ("input_range_narrower", M, _set("input_range", [0, 31], "conv2"),
     r"'conv2' \(conv2d\): field 'input_range' \[0, 31\] does not contain the range \[0, 63\] of "
     r"its input"),
    ("input_zero_point_off_range", M, _set("input_zero_point", 64, "conv2"),
     r"'conv2' \(conv2d\): field 'input_zero_point' must be an integer from 0 to 63"),
    ("weight_scale_negative", M, lambda m: _op(m, "conv2")["weight_scale"].__setitem__(0, -1.0),
     r"'conv2' \(conv2d\): field 'weight_scale' must be a non-empty list of finite numbers > 0"),
    ("input_scale_inf", M, _set("input_scale", float("inf"), "head"),
     r"'head' \(dense\): field 'input_scale' must be a finite number > 0 \(got inf\)"),
    ("groups_not_dividing", M, _set("groups", 3, "conv2"),
     r"'conv2' \(conv2d\): field 'groups' must divide the output channels \(4\)"),
    ("stride_zero", M, _set("stride", [0, 1], "conv2"),
     r"field 'stride' must be a list of 2 integers from 1 to 65536"),
    ("padding", M, _set("padding", "FULL", "conv2"), r"field 'padding' must be 'SAME' or 'VALID'"),
    ("weight_shape_does_not_fit_input", M, _set("weight_shape", [1, 1, 36, 4], "conv2"),
     r"'conv2' \(conv2d\): field 'input' does not fit: its input t4 \(2, 6, 6, 4\)"),
    ("dense_input_from_accumulator", M, _set("input", "t12", "head"),
     r"'head' \(dense\): field 'input' names 't12', which is no integer grid tensor"),
    ("unknown_input", M, _set("input", "nope", "head"),
     r"'head' \(dense\): field 'input' names tensor 'nope', which no earlier op produces"),
    ("unknown_op", M, _set("op", "conv3d", "conv1"),
     r"'conv1' \(conv3d\): field 'op' must be one of"),
    # add, clamp, pools, shift
    ("add_left_shift_overflow", M, _set("left_shift", 30, "add"),
     r"'add' \(add\): field 'left_shift' 30 overflows int32 on input 't6'"),
    ("add_multiplier_float", M, _set("multipliers", [1.5, 2], "add"),
     r"'add' \(add\): field 'multipliers' must be a list of 2 integers from 0 to 2147483647"),
    ("add_one_input", M, _set("inputs", ["t6"], "add"),
     r"field 'inputs' must list two tensor names"),
    ("add_scale_nan", M, _set("input_scales", [NAN, 1.0], "add"),
     r"'add' \(add\): field 'input_scales' must be a non-empty list of finite numbers > 0"),
    ("clamp_hi_float", W, _tensor("add/relu6_hi", lambda a: a.astype(np.float32)),
     r"'add/relu6' \(clamp\): field 'hi' must name a non-empty 1-d int32 tensor"),
    ("clamp_lo_above_hi", M, _set("lo", 2 ** 31 - 1, "add/relu6"),
     r"'add/relu6' \(clamp\): field 'lo' must be <= hi"),
    ("max_pool_window_0", M, _set("window", 0, "conv2/pool"),
     r"'conv2/pool' \(max_pool\): field 'window' must be an integer from 1 to 65536 \(got 0\)"),
    ("max_pool_window_too_big", M, _set("window", 20, "conv2/pool"),
     r"'conv2/pool' \(max_pool\): field 'output' would be empty \(shape \(2, 0, 0, 4\)"),
    ("shift_right_40", M, _set("right", 40, "add/shift"),
     r"'add/shift' \(shift\): field 'right' must be an integer from 0 to 31 \(got 40\)"),
    ("sum_pool_axes", M, _set("axes", [0], "add/sum_pool"),
     r"'add/sum_pool' \(sum_pool\): field 'axes' must be a list of distinct positive axes"),
    # weights.npz
    ("weights_missing", F, _remove("weights.npz"), r"weights.npz is missing"),
    ("weights_truncated", F, _truncate(),
     r"weights.npz is not a valid .npz file \(truncated or corrupt zip archive"),
    ("weights_pickle", F, _raw(pickle.dumps({"conv1/weight": np.zeros(3)})),
     r"weights.npz is not a valid .npz file \(not a zip archive\)"),
    ("weights_text", F, _raw(b"conv1/weight: 1 2 3\n"),
     r"weights.npz is not a valid .npz file \(not a zip archive\)"),
    ("weights_empty", F, _raw(b""), r"weights.npz is not a valid .npz file \(the file is empty\)"),
    ("weights_object_array", F, _object_array,
     r"weights.npz is not a valid .npz file \(entry 'conv1/bias' holds Python objects"),
    ("weights_tensor_missing", W, lambda w: w.pop("head/bias"),
     r"'head' \(dense\): field 'bias' names no tensor in weights.npz"),
]


def _corrupt(src, dst, where, edit):
  shutil.copytree(src, dst)
  if where == M:
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
  elif where == W:
    w = dict(np.load(dst / "weights.npz"))
    edit(w)
    np.savez(dst / "weights.npz", **w)
  else:
    edit(dst)
  return dst


def test_the_export_itself_loads(tiny):
  _, out, manifest = tiny
  m, tensors = export.load(str(out))
  assert m == manifest
  assert {op["op"] for op in m["ops"]} == {"quantize", "conv2d", "requantize", "max_pool", "add",
                                           "clamp", "shift", "sum_pool", "dense", "dequantize"}
  assert all(t.dtype == np.int32 for t in tensors.values())


@pytest.mark.parametrize("name,where,edit,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_every_defect_is_one_line_naming_the_field(tiny, tmp_path, name, where, edit, message):
  _, out, _ = tiny
  d = _corrupt(out, tmp_path / "m", where, edit)
  with pytest.raises(ExportError) as e:
    export.load(str(d))
  text = str(e.value)
  assert "\n" not in text and "pickle" not in text.lower(), text
  assert text.startswith(str(d)), text  # names the file
  assert len(text) < 400, text
  assert re.search(message, text), text


def test_check_input(tiny):
  _, out, manifest = tiny
  export.check_input(manifest, SHAPE)
  export.check_input(manifest, np.asarray(SHAPE))
  with pytest.raises(ExportError, match=r"input shape \[12, 12, 1\] does not fit the dataset's "
                     r"images \(28, 28, 1\); evaluate it on the dataset it was exported for"):
    export.check_input(manifest, (28, 28, 1), str(out))
  with pytest.raises(ExportError, match="does not fit"):
    export.check_input(manifest, (12, 12, 3))


# ------------------------------------------------------------------------- the output directory
def _siblings(d):
  return sorted(p for p in os.listdir(d.parent) if p.startswith(f".{d.name}."))


def _snapshot(d):
  return {p: (d / p).read_bytes() for p in sorted(os.listdir(d))}


def _same_export(a, b):
  assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == ["manifest.json", "weights.npz"]
  assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
  wa, wb = np.load(a / "weights.npz"), np.load(b / "weights.npz")
  assert sorted(wa.files) == sorted(wb.files)
  for k in wa.files:
    assert wa[k].dtype == wb[k].dtype
    np.testing.assert_array_equal(wa[k], wb[k])


def test_target_declares_its_files(tmp_path):
  t = targets.TARGETS["mpq"]
  assert t.files == ("manifest.json", "weights.npz")
  exporter.write(str(tmp_path / "x"), "mpq", {"format": "mpq-int"}, {"a": np.zeros(2, np.int32)})
  assert sorted(os.listdir(tmp_path / "x")) == sorted(t.files)


@pytest.mark.parametrize("files", [
    {"manifest.json": b'{"name": "my project", "version": 3}\n'},
    {"manifest.json": b'{"name": "my project"}\n', "weights.npz": b"mine"},
    {"manifest.json": b"not json at all"},
    {"notes.txt": b"keep me"},
])
def test_refuses_a_directory_that_is_no_earlier_export(tiny, tmp_path, monkeypatch, files):
  model = tiny[0]
  d = tmp_path / "out"
  d.mkdir()
  for name, data in files.items():
    (d / name).write_bytes(data)
  monkeypatch.setattr(exporter, "Lowering", None)  # refused before any work
  with pytest.raises(ExportError, match=r"out is not empty and holds no earlier mpq export"):
    export.export(model, SHAPE, str(d))
  with pytest.raises(ExportError, match="holds no earlier mpq export"):
    export.check_out_dir(str(d))
  assert _snapshot(d) == files  # byte for byte
  assert _siblings(d) == []


def test_refuses_an_earlier_export_with_an_extra_file(tiny, tmp_path):
  model, out, _ = tiny
  d = tmp_path / "out"
  shutil.copytree(out, d)
  (d / "notes.txt").write_text("mine")
  (d / "plots").mkdir()
  before = {p: (d / p).read_bytes() for p in ("manifest.json", "weights.npz", "notes.txt")}
  with pytest.raises(ExportError, match=r"besides the export's files it holds notes.txt, plots"):
    export.export(model, SHAPE, str(d))
  assert {p: (d / p).read_bytes() for p in before} == before
  assert sorted(os.listdir(d)) == ["manifest.json", "notes.txt", "plots", "weights.npz"]


def test_refuses_a_file_and_a_path_through_a_file(tiny, tmp_path):
  model = tiny[0]
  f = tmp_path / "model.bin"
  f.write_bytes(b"data")
  with pytest.raises(ExportError, match=r"model.bin is a file; pass a directory"):
    export.export(model, SHAPE, str(f))
  with pytest.raises(ExportError, match=r"cannot create export directory .*model.bin/sub: "
                     r".*model.bin is a file"):
    export.check_out_dir(str(f / "sub"))
  assert f.read_bytes() == b"data" and os.listdir(tmp_path) == ["model.bin"]


def test_refuses_an_unwritable_parent(tiny, tmp_path, monkeypatch):
  # Tests may run as root, who may write anywhere: os.access stands in for the permissions.
  ro = tmp_path / "ro"
  ro.mkdir()
  real = os.access
  monkeypatch.setattr(os, "access",
                      lambda p, m, **kw: False if str(p).startswith(str(ro)) else real(p, m, **kw))
  with pytest.raises(ExportError, match="is not writable"):
    export.check_out_dir(str(ro / "out"))


def test_exports_into_new_and_empty_directories(tiny, tmp_path):
  model, out, _ = tiny
  assert export.check_out_dir(str(tmp_path / "a" / "b")) == "new"
  export.export(model, SHAPE, str(tmp_path / "a" / "b"))
  _same_export(tmp_path / "a" / "b", out)
  assert oct(os.stat(tmp_path / "a" / "b").st_mode & 0o777) == oct(0o777 & ~_umask())
  empty = tmp_path / "empty"
  empty.mkdir()
  inode = os.stat(empty).st_ino
  assert export.check_out_dir(str(empty)) == "empty"
  export.export(model, SHAPE, str(empty))
  assert os.stat(empty).st_ino == inode  # the same directory, now holding the files
  _same_export(empty, out)
  assert _siblings(empty) == [] and _siblings(tmp_path / "a" / "b") == []


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_re_export_replaces_an_earlier_export(tiny, tmp_path):
  model, out, _ = tiny
  d = tmp_path / "out"
  export.export(model, SHAPE, str(d), meta={"run": 1})
  os.chmod(d, 0o750)
  assert export.check_out_dir(str(d)) == "export"
  manifest = export.export(model, SHAPE, str(d))
  _same_export(d, out)
  assert manifest == export.load(str(d))[0]
  assert oct(os.stat(d).st_mode & 0o777) == oct(0o750)  # keeps the directory's mode
  assert _siblings(d) == []
  # an earlier export whose manifest is of another version of the format is an export too
  m = json.loads((d / "manifest.json").read_text())
  (d / "manifest.json").write_text(json.dumps(dict(m, version=0)))
  export.export(model, SHAPE, str(d))
  _same_export(d, out)


def _failing(t):
  """`t` whose writer fails after writing its files."""
  def write(out_dir, manifest, tensors):
    t.write(out_dir, manifest, tensors)
    raise OSError(28, "No space left on device")
  return dataclasses.replace(t, write=write)


def test_a_failed_write_leaves_the_earlier_export_intact(tiny, tmp_path, monkeypatch):
  model, out, _ = tiny
  d = tmp_path / "out"
  shutil.copytree(out, d)
  (d / "manifest.json").write_text((d / "manifest.json").read_text())  # a distinct earlier one
  before = _snapshot(d)
  monkeypatch.setitem(targets.TARGETS, "mpq", _failing(targets.TARGETS["mpq"]))
  for target in (d, tmp_path / "new" / "sub"):
    with pytest.raises(OSError, match="No space left"):
      export.export(model, SHAPE, str(target))
  assert _snapshot(d) == before
  assert not os.path.exists(tmp_path / "new")  # nor the parent it created
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(OSError, match="No space left"):
    export.export(model, SHAPE, str(empty))
  assert os.listdir(empty) == []
  assert sorted(os.listdir(tmp_path)) == ["empty", "out"]  # no temporary directories left


def test_a_failed_swap_restores_the_earlier_export(tiny, tmp_path, monkeypatch):
  model, out, _ = tiny
  d = tmp_path / "out"
  shutil.copytree(out, d)
  before = _snapshot(d)
  rename = os.rename

  def flaky(src, dst):
    if os.path.basename(src).startswith(".out.tmp-"):
      raise OSError(5, "Input/output error")
    return rename(src, dst)

  monkeypatch.setattr(os, "rename", flaky)
  with pytest.raises(OSError, match="Input/output error"):
    export.export(model, SHAPE, str(d))
  assert _snapshot(d) == before
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_target_may_write_only_its_declared_files(tiny, tmp_path, monkeypatch):
  t = targets.TARGETS["mpq"]

  def write(out_dir, manifest, tensors):
    t.write(out_dir, manifest, tensors)
    open(os.path.join(out_dir, "extra.bin"), "wb").close()

  monkeypatch.setitem(targets.TARGETS, "mpq", dataclasses.replace(t, write=write))
  with pytest.raises(RuntimeError, match="wrote extra.bin, which are not in its declared files"):
    export.export(tiny[0], SHAPE, str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []
