"""The training loop (`fit`) and checkpoint evaluation (`evaluate_checkpoint`, `load_model`).

`fit` trains a prepared state: the experiment orchestrator (`mpq.experiment`) decides what that
state is (fresh, resumed, allocated, calibrated) and which method hooks run. Batch k and every
random draw of step k are functions of (seed, k) only (see `mpq.data.pipeline`), so a resumed run
is the same computation as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpq import config as config_lib
from mpq import data as data_lib
from mpq import models, quant
from mpq.quant import model as quant_model
from mpq.errors import Interrupted, NonFiniteLossError, UserError
from mpq.train import checkpoint as ckpt_lib
from mpq.train import parallel
from mpq.train.metrics import MetricWriter
from mpq.train.state import (TrainState, dampening_weight, make_eval_step,
                             make_train_step, split_model)

_compiles = [0]


def _on_event(event: str, *args, **kwargs):
  del args, kwargs
  if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits"):
    _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)
jax.monitoring.register_event_listener(_on_event)


def compile_count() -> int:
  """XLA compilations in this process so far, loads from a persistent compilation cache included
  (a recompilation after step 1 is a bug)."""
  return _compiles[0]


def load_data(config) -> data_lib.Dataset:
  return data_lib.load(config.dataset, config.data_dir or None, config.num_train_examples or None,
                       config.num_test_examples or None, config.input_norm)


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


class Hook:
  """A training method's hook into `fit` (e.g. `mixed.method=dbits`): its state rides in
  `TrainState.extra`; `penalty(model, extra, step) -> (penalty, new_extra, metrics)` runs inside
  the jitted step and adds to the loss; `after_step(step, state) -> state` runs on the host between
  steps. The defaults do nothing."""

  def init_extra(self):
    return ()

  penalty = None

  def after_step(self, step: int, state):
    return state


class _Stop:
  """SIGINT/SIGTERM during `fit` ask the loop to stop: it saves a checkpoint at the step it is at,
  finishes pending saves and raises `Interrupted`. A second SIGINT stops at once (the last saved
  checkpoint is kept). In a multi-process run the processes agree on the stop step through the
  step loop: every `log_every` steps they gather their signal flags (a collective every process
  reaches at the same step) and all stop and save together at the first such step after any of
  them saw a signal, so a signal seen by one process cannot deadlock the others' collective save."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum, self._old = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)

  def agreed(self, step: int, every: int) -> int | None:
    """The signal to stop on at `step`, or None to go on."""
    if jax.process_count() == 1:
      return self.signum
    if step % every:
      return None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    seen = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0))).reshape(-1)
    return int(seen[seen > 0][0]) if np.any(seen > 0) else None


def fit(config, workdir: str, data, mesh, graphdef, state: TrainState, tx, total: int,
        per_epoch: int, *, hook: Hook = Hook(), teacher=None, progress=None, evaluator=None):
  """Trains `state` from its step to `total`: checkpoints (latest and best) and metrics in
  `workdir`, evaluation every `eval_every` steps. `teacher`: `(graphdef, (params, rest))` for
  knowledge distillation. `evaluator(state)`: the evaluation ({"loss", "accuracy", ...}) in place
  of the model's own forward on the test split (`config.quant.target`: the model as a kernel
  family computes it). Returns (final evaluation, final state)."""
  eval_every = config.eval_every or per_epoch
  ckpt_every = config.checkpoint_every or per_epoch
  checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
  best_meta = checkpointer.best_meta()
  best_acc = best_meta["metrics"]["accuracy"] if best_meta else -1.0

  rep = parallel.replicated(mesh)
  state = jax.device_put(state, rep)
  qc = config.quant
  damp = (dampening_weight(qc.osc_dampen, total) if qc.enabled and qc.osc_dampen > 0 else None)
  teacher_graphdef, teacher_args = None, ()
  if teacher is not None:
    teacher_graphdef, teacher_vars = teacher
    teacher_args = (jax.device_put(teacher_vars, rep),)
  train_step = jax.jit(make_train_step(graphdef, tx, config.label_smoothing, damp, teacher_graphdef,
                                       qc.distill_weight, qc.distill_temperature, hook.penalty),
                       donate_argnums=(0,), out_shardings=(rep, rep))
  if evaluator is None:
    eval_step = jax.jit(make_eval_step(graphdef), out_shardings=rep)
    evaluator = lambda st: evaluate(eval_step, st.params, st.rest, data, config.eval_batch_size,
                                    mesh)

  start = int(state.step)
  ds = data_lib.train_dataset(data, config.batch_size, config.seed, total, config.augment,
                              jax.process_index(), jax.process_count())
  writer = MetricWriter(workdir, total, config.batch_size, start, progress)
  pending, result, interrupted = [], None, None
  stop = _Stop()
  try:
    stop.__enter__()
    step = start
    for batch in data_lib.iterate(ds, start):
      state, metrics = train_step(state, parallel.shard_batch(batch, mesh), *teacher_args)
      step += 1
      state = hook.after_step(step, state)
      pending.append((step, metrics))
      do_eval = step % eval_every == 0 or step == total
      do_ckpt = step % ckpt_every == 0 or step == total
      if step % config.log_every == 0 or do_eval or do_ckpt:
        pending = _flush(pending, writer, workdir, checkpointer)
      writer.advance(step)
      if do_eval:
        result = evaluator(state)
        writer.write(step, "test", {"loss": result["loss"], "accuracy": result["accuracy"]})
      if do_ckpt:
        is_best = do_eval and result["accuracy"] > best_acc
        if is_best:
          best_acc = result["accuracy"]
        meta = {"step": step, "config": config.to_dict(), "metrics": result or {},
                "epoch": step / per_epoch}
        checkpointer.save(step, state, meta, best=is_best)
      signum = stop.agreed(step, config.log_every)
      if signum:
        if not do_ckpt:
          pending = _flush(pending, writer, workdir, checkpointer)
          meta = {"step": step, "config": config.to_dict(), "metrics": result or {},
                  "epoch": step / per_epoch}
          checkpointer.save(step, state, meta)
        interrupted = Interrupted(signum, step)
        break
    if result is None and interrupted is None:  # resumed at the end: evaluate what is there
      result = evaluator(state)
  finally:
    stop.__exit__()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  if interrupted is not None:
    raise interrupted
  return {**result, "step": int(state.step)}, state


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


def _eval_state(config, model):
  """(graphdef, a TrainState without optimizer state): evaluation needs the model variables only."""
  del config
  graphdef, params, rest = split_model(model)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, ())
