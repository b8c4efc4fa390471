"""The training loop (`train_and_evaluate`) and checkpoint evaluation (`evaluate_checkpoint`).

Resumption: re-running the same command on a workdir restores the newest checkpoint in
`WORKDIR/checkpoints` and continues from its step. Batch k and every random draw of step k are
functions of (seed, k) only (see `mpq.data.pipeline`), so a resumed run is the same computation as
an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mpq import config as config_lib
from mpq import data as data_lib
from mpq import models, quant
from mpq.allocate import dbits as dbits_lib
from mpq.quant import model as quant_model
from mpq.errors import NonFiniteLossError, UserError
from mpq.train import checkpoint as ckpt_lib
from mpq.train import optim, parallel
from mpq.train.metrics import MetricWriter
from mpq.train.state import (TrainState, dampening_weight, init_state, make_eval_step,
                             make_train_step, split_model)

_compiles = [0]


def _on_event(event: str, *args, **kwargs):
  del args, kwargs
  if event == "/jax/core/compile/backend_compile_duration":
    _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
  """XLA compilations in this process so far (a recompilation after step 1 is a bug)."""
  return _compiles[0]


def load_data(config) -> data_lib.Dataset:
  return data_lib.load(config.dataset, config.data_dir or None, config.num_train_examples or None,
                       config.num_test_examples or None)


def num_steps(config, num_train: int) -> tuple[int, int]:
  """(total train steps, steps per epoch)."""
  per_epoch = max(num_train // config.batch_size, 1)
  if config.num_train_steps > 0:
    return config.num_train_steps, per_epoch
  return max(1, math.ceil(config.num_epochs * per_epoch)), per_epoch


def build_model(config, data: data_lib.Dataset, bypass: bool = False):
  """(model, quantization table or None). With `config.quant.enabled` the model is built from
  quantized layers per `config.quant` (rules resolved once); `bypass` makes its quantizers identity."""
  if config.quant.enabled:
    return quant_model.build(config, data.num_classes, data.image_shape, bypass=bypass)
  return models.build(config.model, data.num_classes, data.image_shape, seed=config.seed,
                      **config.model_kwargs.to_dict()), None


def load_teacher(workdir: str, data: data_lib.Dataset):
  """(graphdef, (params, rest)) of the model in `workdir`'s latest checkpoint, built from the config
  it was trained with (the distillation teacher, usually the float model)."""
  directory = os.path.join(workdir, ckpt_lib.LATEST)
  _, meta = ckpt_lib.restore(directory, None, None)
  tconfig = config_lib.from_dict(meta["config"])
  model, _ = build_model(tconfig, data)
  graphdef, params, rest = split_model(model)
  restored, _ = ckpt_lib.restore_subset(directory, meta["step"], {"params": params, "rest": rest})
  print(f"distilling from {workdir} (step {meta['step']})", flush=True)
  return graphdef, (restored["params"], restored["rest"])


def _dbits_budget(config, data):
  """(kernel elements per allocated layer, the weight-bit budget) for mixed.method=dbits."""
  fm = models.build(config.model, data.num_classes, data.image_shape, seed=config.seed,
                    **config.model_kwargs.to_dict())
  weights = {p: v["weights"] for p, v in models.layer_costs(fm, data.image_shape).items()}
  return weights, float(config.mixed.weight_bits_avg) * sum(weights.values())


def _round_dbits(config, graphdef, state, weights, budget_bits, rep):
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.rest))
  assignment = dbits_lib.round_bits(model, weights, budget_bits, config.mixed.bit_choices)
  _, params, rest = split_model(model)
  used = sum(weights[p] * b for p, b in assignment.items()) / sum(weights.values())
  print(f"dbits: rounded to {assignment} (weight bits avg {used:.3f}); fine-tuning", flush=True)
  return jax.device_put(state._replace(params=params, rest=rest), rep)


def _allocate(config, data, graphdef, state):
  """mixed.method=ilp: allocates bits from the float checkpoint and sets them in the state."""
  from mpq.allocate import workflow  # pylint: disable=g-import-not-at-top
  allocation = workflow.allocate(config, data)
  model = nnx.merge(graphdef, state.params, state.rest)
  quant.set_bits(model, allocation["assignment"])
  _, params, rest = split_model(model)
  t = allocation["report"]["totals"]
  print(f"allocated bits by {config.mixed.sensitivity} sensitivity + {config.mixed.solver}: "
        f"weight bits avg {t['weight_bits_avg']:.3f}, BOPs {t['bops_ratio']:.3f} of W8A8", flush=True)
  return state._replace(params=params, rest=rest), allocation


def calibrate_state(config, data, graphdef, state: TrainState) -> TrainState:
  """Sets quantizer ranges from `quant.calib_batches` training batches (Wu et al. 2020)."""
  qc = config.quant
  ds = data_lib.train_dataset(data, config.batch_size, config.seed + 1, qc.calib_batches)
  images = [np.asarray(b["image"]) for b in data_lib.iterate(ds, 0)]
  model = nnx.merge(graphdef, state.params, state.rest)
  quant.calibrate(model, images, qc.calib_act, qc.calib_weight, qc.calib_percentile)
  _, params, rest = split_model(model)
  return state._replace(params=params, rest=rest)


def evaluate(eval_step, params, rest, data, batch_size: int, mesh) -> dict[str, float]:
  """Loss and accuracy over the whole test split."""
  totals = None
  for batch in data_lib.eval_batches(data, batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = eval_step(params, rest, parallel.shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  n = float(totals["count"])
  return {"loss": float(totals["loss"]) / n, "accuracy": float(totals["correct"]) / n,
          "num_examples": int(n)}


def _first_non_finite(pending):
  """(step, name, value) of the first non-finite loss term: the task loss, the gradient norm, or any
  term added to the loss (oscillation dampening, distillation, the dbits budget ratio)."""
  for step, m in pending:
    for name in ("loss", "grad_norm", "damp", "distill", "size_ratio"):
      if name in m and not np.isfinite(m[name]):
        return step, name, float(m[name])
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, progress=None) -> dict:
  """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns the final eval."""
  parallel.maybe_initialize_distributed()
  config_lib.validate(config)
  data = load_data(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  total, per_epoch = num_steps(config, len(data.train))
  eval_every = config.eval_every or per_epoch
  ckpt_every = config.checkpoint_every or per_epoch

  model, qtable = build_model(config, data)
  tx = optim.build(config, total)
  graphdef, state = init_state(model, tx)
  state = _with_method_state(config, state)
  dbits_method = config.mixed.enabled and config.mixed.method == "dbits"

  latest = ckpt_lib.steps(os.path.join(workdir, ckpt_lib.LATEST))
  allocation = None
  if latest:
    state, meta = ckpt_lib.restore(os.path.join(workdir, ckpt_lib.LATEST), None, state)
    print(f"resuming from step {int(state.step)} in {workdir}", flush=True)
  else:
    if config.init_from:
      state = _init_from(config.init_from, state)
    if config.mixed.enabled and not dbits_method:
      state, allocation = _allocate(config, data, graphdef, state)
    if dbits_method:
      m = nnx.merge(graphdef, state.params, state.rest)
      dbits_lib.setup(m, config.mixed, config.mixed.a_bits or config.quant.a_bits)
      _, params, rest = split_model(m)
      state = state._replace(params=params, rest=rest)
    if qtable is not None:
      state = calibrate_state(config, data, graphdef, state)
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)
  if qtable is not None and jax.process_index() == 0:
    model = nnx.merge(graphdef, state.params, state.rest)
    bits = quant_model.bits_table(model, qtable, data.image_shape)
    if allocation is not None:
      rep = allocation["report"]
      for p, extra in rep["per_layer"].items():
        bits[p].update(extra)
      bits["_budgets"], bits["_totals"] = rep["budgets"], rep["totals"]
      bits["_allocation"] = {k: v for k, v in rep.items()
                             if k not in ("per_layer", "budgets", "totals")}
    if allocation is not None or not latest:
      quant_model.write_bits(os.path.join(workdir, "bits.json"), bits)
  del model

  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  best_meta = checkpointer.best_meta()
  best_acc = best_meta["metrics"]["accuracy"] if best_meta else -1.0

  rep = parallel.replicated(mesh)
  state = jax.device_put(state, rep)
  damp = (dampening_weight(config.quant.osc_dampen, total)
          if config.quant.enabled and config.quant.osc_dampen > 0 else None)
  teacher_graphdef, teacher = None, ()
  if config.quant.enabled and config.quant.teacher_workdir:
    teacher_graphdef, teacher = load_teacher(config.quant.teacher_workdir, data)
    teacher = (jax.device_put(teacher, rep),)
  budget, round_step, weights = None, -1, None
  if dbits_method:
    weights, budget_bits = _dbits_budget(config, data)
    round_step = int(config.mixed.dbits_fraction * total)
    budget = dbits_lib.make_budget(weights, budget_bits, config.mixed.lagrange_lr, round_step)
  train_step = jax.jit(make_train_step(graphdef, tx, config.label_smoothing, damp, teacher_graphdef,
                                       config.quant.distill_weight, config.quant.distill_temperature,
                                       budget),
                       donate_argnums=(0,), out_shardings=(rep, rep))
  eval_step = jax.jit(make_eval_step(graphdef), out_shardings=rep)

  start = int(state.step)
  ds = data_lib.train_dataset(data, config.batch_size, config.seed, total, config.augment,
                              jax.process_index(), jax.process_count())
  writer = MetricWriter(workdir, total, config.batch_size, start, progress)
  pending, result = [], None
  try:
    step = start
    for batch in data_lib.iterate(ds, start):
      state, metrics = train_step(state, parallel.shard_batch(batch, mesh), *teacher)
      step += 1
      if step == round_step:
        state = _round_dbits(config, graphdef, state, weights, budget_bits, rep)
      pending.append((step, metrics))
      do_eval = step % eval_every == 0 or step == total
      do_ckpt = step % ckpt_every == 0 or step == total
      if step % config.log_every == 0 or do_eval or do_ckpt:
        pending = _flush(pending, writer, workdir, checkpointer)
      writer.advance(step)
      if do_eval:
        result = evaluate(eval_step, state.params, state.rest, data, config.eval_batch_size, mesh)
        writer.write(step, "test", {"loss": result["loss"], "accuracy": result["accuracy"]})
      if do_ckpt:
        is_best = do_eval and result["accuracy"] > best_acc
        if is_best:
          best_acc = result["accuracy"]
        meta = {"step": step, "config": config.to_dict(), "metrics": result or {},
                "epoch": step / per_epoch}
        checkpointer.save(step, state, meta, best=is_best)
    if result is None:  # resumed at the end: evaluate what is there
      result = evaluate(eval_step, state.params, state.rest, data, config.eval_batch_size, mesh)
    if dbits_method and jax.process_index() == 0:
      m = nnx.merge(graphdef, state.params, state.rest)
      bits = quant_model.bits_table(m, qtable, data.image_shape)
      bits["_budgets"] = {"weight_bits": budget_bits}
      bits["_totals"] = {"weight_bits": float(sum(weights[p] * bits[p]["w_bits"] for p in weights))}
      bits["_totals"]["weight_bits_avg"] = bits["_totals"]["weight_bits"] / sum(weights.values())
      bits["_allocation"] = {"method": "dbits", "round_step": round_step,
                             "lagrange": float(state.extra["lagrange"])}
      quant_model.write_bits(os.path.join(workdir, "bits.json"), bits)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return {**result, "step": int(state.step)}


def _flush(pending, writer, workdir, checkpointer):
  if not pending:
    return []
  fetched = jax.device_get(pending)
  bad = _first_non_finite(fetched)
  if bad is not None:
    step, name, value = bad
    last = checkpointer.latest_step()
    kept = f"the last good checkpoint (step {last}) is kept" if last else "no checkpoint was saved"
    what = {"loss": "loss", "grad_norm": "the gradient norm"}.get(name, f"the {name!r} loss term")
    raise NonFiniteLossError(f"{what} became {value} at step {step}; {kept} in {workdir}; "
                             "lower --config.learning_rate or set --config.grad_clip_norm")
  step = fetched[-1][0]
  mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
  writer.write(step, "train", mean)
  return []


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


def _write_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() != text:
        print(f"note: the config differs from the one in {path}; keeping the new one "
              "(the old one stays in the checkpoints' metadata)", flush=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def evaluate_checkpoint(workdir: str, step: int | None = None, which: str = "latest",
                        overrides: dict | None = None, mode: str = "auto", ptq=None) -> dict:
  """Restores a checkpoint of `workdir` and evaluates it on the test split.

  `mode`: 'fake_quant' (default for QAT checkpoints), 'float' (a QAT checkpoint with its quantizers
  bypassed) or 'auto'. `ptq`: calibrate a float checkpoint and evaluate it quantized; a dict of
  `config.quant` overrides (e.g. `{"w_bits": 8, "a_bits": 8, "calib_act": "mse"}`) or True.
  """
  parallel.maybe_initialize_distributed()
  directory, meta, config, data = _checkpoint_config(workdir, step, which, overrides)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  if mode not in ("auto", "float", "fake_quant"):
    raise UserError(f"--mode={mode!r} is unknown; use float or fake_quant")
  if mode == "auto":
    mode = "fake_quant" if config.quant.enabled or ptq else "float"
  if mode == "fake_quant" and not config.quant.enabled and not ptq:
    raise UserError(f"{workdir} holds a float model; evaluate it with --mode=float, or quantize it "
                    "with --ptq")
  graphdef, state, meta, qtable = _restored(workdir, config, data, directory, meta["step"], ptq,
                                            bypass=mode == "float" and config.quant.enabled)
  state = jax.device_put(state, parallel.replicated(mesh))
  eval_step = jax.jit(make_eval_step(graphdef))
  t0 = time.time()
  result = evaluate(eval_step, state.params, state.rest, data, config.eval_batch_size, mesh)
  out = {**result, "mode": mode, "step": int(meta["step"]), "config": config.to_dict(),
         "seconds": time.time() - t0}
  if qtable is not None:
    out["bits"] = quant_model.bits_table(nnx.merge(graphdef, state.params, state.rest), qtable,
                                         data.image_shape)
  return out



def _restored(workdir, config, data, directory, step, ptq, bypass=False):
  """(graphdef, eval state, meta, quant table) of a checkpoint; with `ptq` (a dict of
  `config.quant` overrides, or True) a float checkpoint is restored into a quantized model and
  calibrated on training batches (post-training quantization). Mutates `config` for `ptq`."""
  if ptq:
    if config.quant.enabled:
      raise UserError(f"{workdir} already holds a quantized model; --ptq takes a float checkpoint")
    config.quant.enabled = True
    for k, v in (ptq if isinstance(ptq, dict) else {}).items():
      config.quant[k] = v
    config_lib.validate(config)
  model, qtable = build_model(config, data, bypass=bypass)
  graphdef, state = _eval_state(config, model)
  if ptq:
    restored, meta = ckpt_lib.restore_subset(directory, step, {"params": state.params,
                                                               "rest": state.rest})
    state = calibrate_state(config, data, graphdef,
                            state._replace(params=restored["params"], rest=restored["rest"]))
  else:  # the model variables only: evaluation needs no optimizer state
    restored, meta = ckpt_lib.restore_subset(directory, step, {"params": state.params,
                                                               "rest": state.rest}, strict=True)
    state = state._replace(params=restored["params"], rest=restored["rest"])
  return graphdef, state, meta, qtable


def load_model(workdir: str, step: int | None = None, which: str = "latest",
               overrides: dict | None = None, ptq=None):
  """(model in eval form, config, dataset, step) restored from a checkpoint of `workdir`; `ptq` as
  for `evaluate_checkpoint` (a calibrated quantized model from a float checkpoint)."""
  directory, meta, config, data = _checkpoint_config(workdir, step, which, overrides)
  graphdef, state, meta, _ = _restored(workdir, config, data, directory, meta["step"], ptq)
  return nnx.merge(graphdef, state.params, state.rest), config, data, int(meta["step"])


def _checkpoint_config(workdir: str, step: int | None, which: str, overrides: dict | None):
  """(checkpoint directory, meta, config with `overrides`, dataset) of a workdir's checkpoint."""
  if not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
  directory = os.path.join(workdir, ckpt_lib.LATEST if which == "latest" else ckpt_lib.BEST)
  _, meta = ckpt_lib.restore(directory, step, None)
  config = config_lib.from_dict(meta["config"])
  for k, v in (overrides or {}).items():
    config[k] = v
  return directory, meta, config, load_data(config)


def _with_method_state(config, state: TrainState) -> TrainState:
  """The training-method state a checkpoint of this config holds (mixed.method=dbits: lambda)."""
  if config.mixed.enabled and config.mixed.method == "dbits":
    return state._replace(extra={"lagrange": jnp.zeros((), jnp.float32)})
  return state


def _eval_state(config, model):
  graphdef, state = init_state(model, optim.build(config, 1))
  return graphdef, _with_method_state(config, state)
