"""The experiment orchestrator: the one place that knows the whole sequence of a training run.

    resume or init -> allocate -> build -> calibrate -> train (method hooks) -> report

  resume     a workdir with checkpoints continues from the newest (`mpq.train.checkpoint`); the
             bits, ranges and method state come from the checkpoint, nothing below reruns
  init       `init_from`: the model variables of another run's latest checkpoint (a float model
             fits its quantized model: quantized layers keep the float names)
  allocate   `mixed.method=ilp`: per-layer bits from the float model's sensitivities under the
             budgets (`mpq.allocate.workflow`, given the float model and a calibration set);
             `mixed.method=dbits`: fixed activation bits and pins (`mpq.allocate.dbits.setup`)
  calibrate  quantizer ranges from `quant.calib_batches` training batches
  train      `mpq.train.loop.fit`, with the method's hook (dbits: budget penalty, then rounding)
             and the distillation teacher (`quant.teacher_workdir`)
  report     `config.json`, `config_history.jsonl` (`mpq.workdir.record_start`) and `bits.json`
             (`write_bits`, the one writer of bits.json), written once every check has passed

The workdir belongs to the run (`mpq.workdir`): a lock, and a resume that refuses a different
config unless told to.

The steps do not import each other: training does not import allocation and allocation does not
import training; this module composes them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from flax import nnx

from mpq import config as config_lib
from mpq import data as data_lib
from mpq import models, quant
from mpq import workdir as workdir_lib
from mpq.allocate import dbits as dbits_lib
from mpq.allocate import workflow
from mpq.errors import UserError
from mpq.quant import model as quant_model
from mpq.train import checkpoint as ckpt_lib
from mpq.train import loop, optim, parallel
from mpq.train.state import TrainState, init_state, split_model

BITS_VERSION = 1
CORRUPT = "corrupt"  # unreadable checkpoint steps skipped by a resume are moved here


def train_and_evaluate(config, workdir: str, progress=None,
                       allow_config_change: bool = False) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns the final eval.

  Every check that can fail runs before the workdir is written: the config, the output path, the
  data, the lock (`mpq.workdir.Lock`: one run per workdir), the resume check against the run's
  saved config (differences outside `mpq.workdir.RESUMABLE` are refused unless
  `allow_config_change`), the checkpoint restore, allocation and calibration. Then `_start`
  writes `config.json`, `config_history.jsonl` and `bits.json`, and training begins.
  """
  parallel.maybe_initialize_distributed()
  config_lib.validate(config)
  workdir_lib.check_dir(workdir)
  data = loop.load_data(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  total, per_epoch = loop.num_steps(config, len(data.train))

  with workdir_lib.Lock(workdir, active=jax.process_index() == 0) as lock:
    saved = workdir_lib.saved_config(workdir)
    changes = {}
    if saved is not None:
      old_total, _ = loop.num_steps(config_lib.from_dict(saved), len(data.train))
      changes = workdir_lib.resume_changes(workdir, saved, config.to_dict(), old_total, total,
                                           allow_config_change)

    model, qtable = loop.build_model(config, data)
    tx = optim.build(config, total)
    graphdef, state = init_state(model, tx)
    del model
    hook = _method_hook(config, data, graphdef, total, mesh)
    state = state._replace(extra=hook.init_extra())

    latest_dir = os.path.join(workdir, ckpt_lib.LATEST)
    allocation, skipped = None, []
    resumed = bool(ckpt_lib.steps(latest_dir))
    if resumed:
      state, _, skipped = ckpt_lib.restore_intact(latest_dir, state)
      for step, reason in skipped:
        print(f"warning: checkpoint {os.path.join(latest_dir, str(step))} is unreadable ({reason}); "
              f"resuming from step {int(state.step)} (the unreadable step is moved to "
              f"{os.path.join(workdir, CORRUPT)})", flush=True)
      print(f"resuming from step {int(state.step)} in {workdir}", flush=True)
    else:
      if config.init_from:
        state = _init_from(config.init_from, state)
      if config.mixed.enabled and config.mixed.method == "ilp":
        state, allocation = _allocate(config, data, graphdef, state)
      if isinstance(hook, dbits_lib.Training):
        state = _with_model(graphdef, state, lambda m: dbits_lib.setup(
            m, config.mixed, config.mixed.a_bits or config.quant.a_bits))
      if qtable is not None:
        state = loop.calibrate_state(config, data, graphdef, state)
    teacher = None
    if config.quant.enabled and config.quant.teacher_workdir:
      teacher = load_teacher(config.quant.teacher_workdir, data)
    evaluator = _target_evaluator(config, data, graphdef, state)
    if changes:
      print(workdir_lib.describe_changes(changes, int(state.step), old_total, total), flush=True)
    bits = (_bits_report(graphdef, state, qtable, data, allocation)
            if qtable is not None and not resumed else None)

    _start(workdir, config, int(state.step), changes, allow_config_change, bits, skipped)
    lock.started()
    result, state = loop.fit(config, workdir, data, mesh, graphdef, state, tx, total, per_epoch,
                             hook=hook, teacher=teacher, progress=progress, evaluator=evaluator)
    if isinstance(hook, dbits_lib.Training):
      bits = _bits_report(graphdef, state, qtable, data, None)
      write_bits(workdir, {**bits, **hook.report(bits, state)})
  return result


def evaluate_run(workdir: str, step: int | None = None, which: str = "latest",
                 overrides: dict | None = None, mode: str = "auto", ptq=None) -> dict:
  """`mpq.train.evaluate_checkpoint`, except that a run with `config.quant.target` evaluates (mode
  auto) as that kernel family computes the model, as its training evaluations did
  (`_target_evaluator`); the result then also holds the fake-quant forward's `fake_quant_accuracy`
  and `fake_quant_loss`, and `target` names the family."""
  r = loop.evaluate_checkpoint(workdir, step, which, overrides, mode, ptq)
  family = r["config"]["quant"].get("target")
  if mode != "auto" or ptq or not family:
    return r
  from mpq.export import evaluate as export_eval  # pylint: disable=g-import-not-at-top
  model, config, data, _ = loop.load_model(workdir, r["step"], which, overrides)
  t = export_eval.evaluate_as(model, data.image_shape, family, export_eval.test_set(data),
                              export_eval.calibration_images(data), config.eval_batch_size)
  return {**r, "fake_quant_accuracy": r["accuracy"], "fake_quant_loss": r["loss"], **t,
          "mode": "int"}


def _start(workdir: str, config, step: int, changes: dict, forced: bool, bits: dict | None,
           skipped: list) -> None:
  """The first writes of a run start, after every check has passed (process 0 only): unreadable
  checkpoint steps moved aside to `WORKDIR/corrupt/`, `config.json` and `config_history.jsonl`
  (`mpq.workdir.record_start`), and `bits.json` for a new run."""
  if jax.process_index() != 0:
    return
  for s, _ in skipped:
    dest = os.path.join(workdir, CORRUPT, f"{ckpt_lib.LATEST}-{s}")
    n = 1
    while os.path.exists(dest):  # the same step skipped before
      dest, n = os.path.join(workdir, CORRUPT, f"{ckpt_lib.LATEST}-{s}.{n}"), n + 1
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.replace(os.path.join(workdir, ckpt_lib.LATEST, str(s)), dest)
  workdir_lib.record_start(workdir, config.to_json(indent=2, sort_keys=True), step, changes, forced)
  if bits is not None:
    write_bits(workdir, bits)


def _target_evaluator(config, data, graphdef, state: TrainState):
  """`config.quant.target`: the evaluation of a state as that kernel family computes the model
  (`mpq.export.evaluate.evaluate_as`: lowered for the family's format with its multipliers and
  rules, the output grid calibrated on `CALIB_EXAMPLES` training images as `eval.py --export`
  does, run in mpq's executor), or None. The starting model is lowered once here, so that a model
  the family cannot express fails before training (one line naming the layer)."""
  family = config.quant.target
  if not family:
    return None
  from mpq.export import evaluate as export_eval  # pylint: disable=g-import-not-at-top
  calib = export_eval.calibration_images(data)
  test = export_eval.test_set(data, batch_size=config.eval_batch_size)

  def model_of(st):
    return nnx.merge(graphdef, jax.device_get(st.params), jax.device_get(st.rest))

  try:
    export_eval.lower_for(model_of(state), data.image_shape, family, calib)
  except UserError as e:
    raise UserError(f"config.quant.target={family!r}: {e}") from None
  return lambda st: export_eval.evaluate_as(model_of(st), data.image_shape, family, test, calib,
                                            config.eval_batch_size)


def _with_model(graphdef, state: TrainState, fn) -> TrainState:
  """Applies `fn(model)` (in place) to the model of `state` on the host; returns the new state."""
  model = nnx.merge(graphdef, state.params, state.rest)
  fn(model)
  _, params, rest = split_model(model)
  return state._replace(params=params, rest=rest)


def _method_hook(config, data, graphdef, total: int, mesh) -> loop.Hook:
  """The training method's hook: `mixed.method=dbits` or none."""
  if not (config.mixed.enabled and config.mixed.method == "dbits"):
    return loop.Hook()
  rep = parallel.replicated(mesh)
  fm = _float_architecture(config, data)
  weights = {p: v["weights"] for p, v in models.layer_costs(fm, data.image_shape).items()}

  def merge(state):
    return nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.rest))

  def update(state, model):
    _, params, rest = split_model(model)
    return jax.device_put(state._replace(params=params, rest=rest), rep)

  return dbits_lib.Training(config.mixed, weights, total, merge, update)


def _float_architecture(config, data):
  return models.build(config.model, data.num_classes, data.image_shape, seed=config.seed,
                      **config.model_kwargs.to_dict())


def _allocate(config, data, graphdef, state):
  """mixed.method=ilp: bits from the float checkpoint's sensitivities, set in the state."""
  if not config.init_from:
    raise UserError("mixed.method=ilp needs a float checkpoint: set --config.init_from=FLOAT_WORKDIR")
  fm = _float_architecture(config, data)
  params, rest = nnx.state(fm, nnx.Param), nnx.state(fm, nnx.Not(nnx.Param))
  restored, _ = ckpt_lib.restore_subset(os.path.join(config.init_from, ckpt_lib.LATEST), None,
                                        {"params": params, "rest": rest})
  nnx.update(fm, restored["params"], restored["rest"])
  n = config.mixed.calib_examples
  ds = data_lib.train_dataset(data, min(n, len(data.train)), config.seed + 2, 1)
  batch = next(iter(data_lib.iterate(ds, 0)))
  allocation = workflow.allocate(config, fm, np.asarray(batch["image"]), np.asarray(batch["label"]),
                                 data.num_classes)
  state = _with_model(graphdef, state, lambda m: quant.set_bits(m, allocation["assignment"]))
  t = allocation["report"]["totals"]
  print(f"allocated bits by {config.mixed.sensitivity} sensitivity + {config.mixed.solver}: "
        f"weight bits avg {t['weight_bits_avg']:.3f}, BOPs {t['bops_ratio']:.3f} of W8A8", flush=True)
  return state, allocation


def _init_from(init_dir: str, state: TrainState) -> TrainState:
  """Takes the model variables from `init_dir`'s latest checkpoint; fresh optimizer and step.

  Every model variable of that checkpoint must exist in this model with the same shape (a float
  checkpoint fits its quantized model: quantized layers keep the float names); variables only this
  model has (quantizer state) keep their initial values and are calibrated afterwards.
  """
  directory = os.path.join(init_dir, ckpt_lib.LATEST)
  like = {"params": state.params, "rest": state.rest}
  restored, meta = ckpt_lib.restore_subset(directory, None, like)
  print(f"initialised from {init_dir} (step {meta['step']})", flush=True)
  return state._replace(params=restored["params"], rest=restored["rest"])


def load_teacher(workdir: str, data: data_lib.Dataset):
  """(graphdef, (params, rest)) of the model in `workdir`'s latest checkpoint, built from the config
  it was trained with (the distillation teacher, usually the float model)."""
  directory = os.path.join(workdir, ckpt_lib.LATEST)
  _, meta = ckpt_lib.restore(directory, None, None)
  tconfig = config_lib.from_dict(meta["config"])
  model, _ = loop.build_model(tconfig, data)
  graphdef, params, rest = split_model(model)
  restored, _ = ckpt_lib.restore_subset(directory, meta["step"], {"params": params, "rest": rest},
                                        strict=True)
  print(f"distilling from {workdir} (step {meta['step']})", flush=True)
  return graphdef, (restored["params"], restored["rest"])


def _bits_report(graphdef, state, qtable, data, allocation) -> dict:
  """The per-layer table of `bits.json`, with the ILP allocation's report when there is one."""
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.rest))
  bits = quant_model.bits_table(model, qtable, data.image_shape)
  if allocation is not None:
    rep = allocation["report"]
    for p, extra in rep["per_layer"].items():
      bits[p].update(extra)
    bits["_budgets"], bits["_totals"] = rep["budgets"], rep["totals"]
    bits["_allocation"] = {k: v for k, v in rep.items()
                           if k not in ("per_layer", "budgets", "totals")}
  return bits


def write_bits(workdir: str, bits: dict) -> None:
  """Writes `workdir/bits.json` (process 0 only, atomically): per layer `w_bits`, `a_bits`,
  `estimator`, `params`, `macs` (and allocation details), plus `_version` and the `_budgets`,
  `_totals`, `_allocation` sections of a mixed-precision run."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "bits.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"_version": BITS_VERSION, **bits}, f, indent=2)
  os.replace(tmp, path)
