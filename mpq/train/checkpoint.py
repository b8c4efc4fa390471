"""Checkpoints with orbax `CheckpointManager`.

Layout in the workdir:
  checkpoints/<step>/   the last `keep` checkpoints (training resumes from the newest)
  best/<step>/          the checkpoint with the best test accuracy seen so far
Each checkpoint holds `state` (the train state flattened to `{'params.conv1.conv.kernel.value': array,
...}`, so that a restore checks every name and shape against the model being built) and `meta` (JSON:
step, config, metrics, `checkpoint_version`). Saves are asynchronous; orbax writes into a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mpq.errors import CheckpointError

LATEST, BEST = "checkpoints", "best"

# Layout versions (`meta["checkpoint_version"]`; absent = 1):
#   1  optimizer state of one optax chain over every parameter (mpq before issue 14)
#   2  optimizer state of `optax.multi_transform`: the model's optimizer and one per quantizer
#      parameter group (`mpq.train.optim`); parameter and statistics names unchanged
# A v1 checkpoint evaluates, exports and initialises runs (`init_from`) as before; resuming it
# fails with one line that says so.
VERSION = 2


def version(meta: dict) -> int:
  return int(meta.get("checkpoint_version", 1))


def flatten(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="."): v for p, v in leaves}


def unflatten(like, flat: dict[str, Any], where: str):
  """Fills the structure of `like` from `flat`, checking names and shapes."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  names = [jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in leaves]
  missing = [n for n in names if n not in flat]
  extra = [n for n in flat if n not in set(names)]
  if missing or extra:
    raise CheckpointError(f"{where} does not fit this model/optimizer: missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                          f"{'...' if len(extra) > 3 else ''}; use the config it was trained with")
  out = []
  for n, (_, ref) in zip(names, leaves):
    v = flat[n]
    if np.shape(v) != np.shape(ref):
      raise CheckpointError(f"{where}: {n} has shape {np.shape(v)}, the model expects "
                            f"{np.shape(ref)}; use the config it was trained with")
    out.append(v)
  return jax.tree_util.tree_unflatten(treedef, out)


def _manager(directory: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                      enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                               item_names=("state", "meta"))


class Checkpointer:
  """The workdir's two managers: recent checkpoints and the best one."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, LATEST), keep)
    self.best = _manager(os.path.join(workdir, BEST), 1)

  def save(self, step: int, state, meta: dict, best: bool = False) -> None:
    meta = {**meta, "checkpoint_version": VERSION}
    flat = flatten(state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
    self.latest.save(step, args=args, force=True)
    if best:
      # After a resume that fell back past an unreadable step, `best/` may hold a step at or after
      # this one from before the fallback: it is superseded (the run is at this step now).
      for s in self.best.all_steps():
        if s >= step:
          self.best.wait_until_finished()
          self.best.delete(s)
      self.best.save(step, args=args, force=True)

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def best_meta(self) -> dict | None:
    step = self.best.latest_step()
    if step is None:
      return None
    return restore(os.path.join(self.workdir, BEST), step, None)[1]

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


def steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  mngr = _manager(directory, 1, read_only=True)
  try:
    return list(mngr.all_steps())
  finally:
    mngr.close()


def _pick(directory: str, step: int | None) -> tuple[int, str]:
  """(the step to restore, "checkpoint DIR/STEP") or a CheckpointError naming what exists."""
  available = steps(directory)
  if not available:
    raise CheckpointError(f"no checkpoint in {directory}; train first (train.py --workdir=...)")
  step = max(available) if step is None else step
  if step not in available:
    raise CheckpointError(f"no checkpoint for step {step} in {directory}; available: {available}")
  return step, f"checkpoint {os.path.join(directory, str(step))}"


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files are unreadable (as opposed to readable but not fitting the model)."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


def _corrupt(where: str, e: Exception) -> CheckpointError:
  msg = str(e).splitlines()[0].split(" See full TensorStore details")[0] if str(e) else ""
  reason = f"{type(e).__name__}: {msg[:200]}"
  return CorruptCheckpointError(f"{where} is unreadable or corrupt ({reason}); delete that step "
                                "directory to fall back to an earlier one", reason)


def restore_intact(directory: str, like) -> tuple[Any, dict, list[tuple[int, str]]]:
  """Restores the newest readable checkpoint of `directory`: (state, meta, [(skipped step,
  reason)] for the newer ones that are unreadable). Raises the newest step's error when none is
  readable; an error other than corruption (a version or model mismatch) is raised at once."""
  skipped, first = [], None
  for step in sorted(steps(directory), reverse=True):
    try:
      state, meta = restore(directory, step, like)
      return state, meta, skipped
    except CorruptCheckpointError as e:
      first = first or e
      skipped.append((step, e.reason))
  if first is not None:
    raise first
  return restore(directory, None, like) + ([],)  # no steps: raises "no checkpoint in ..."


def restore(directory: str, step: int | None, like) -> tuple[Any, dict]:
  """Restores (state shaped like `like`, meta) from `directory`, step `step` (None = latest).

  With `like=None` only the metadata is read (the state is returned as None).
  """
  step, where = _pick(directory, step)
  mngr = _manager(directory, 1, read_only=True)
  try:
    if like is None:
      out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return None, dict(out["meta"])
    meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if version(meta) != VERSION:
      raise CheckpointError(
          f"{where} has checkpoint layout v{version(meta)} and this mpq writes v{VERSION} (the "
          "optimizer state changed), so it cannot be resumed; evaluate or export it with eval.py, "
          "or start a new workdir from it with --config.init_from")
    target = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in flatten(like).items()}
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      # Names or shapes differ: read what is there to say which.
      raw = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
      unflatten(like, raw, where)
      raise CheckpointError(f"{where} cannot be restored: {str(e).splitlines()[0]}") from None
    return unflatten(like, out["state"], where), dict(out["meta"])
  except CheckpointError:
    raise
  except Exception as e:  # orbax/tensorstore raise many types for damaged files.
    raise _corrupt(where, e) from None
  finally:
    mngr.close()


def restore_subset(directory: str, step: int | None, like: dict,
                   strict: bool = False) -> tuple[dict, dict]:
  """Restores the entries of `like` (`{"params": ..., "rest": ...}`) that the checkpoint holds.

  Every `params.*` / `rest.*` entry of the checkpoint must exist in `like` with the same shape (so a
  float checkpoint fits its quantized model, not the reverse); entries of `like` the checkpoint
  lacks keep their values, or with `strict` are an error (evaluation: the model variables of
  a checkpoint of any layout version, without its optimizer state). Returns (filled `like`, meta).
  """
  step, where = _pick(directory, step)
  mngr = _manager(directory, 1, read_only=True)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files.
    raise _corrupt(where, e) from None
  finally:
    mngr.close()
  raw = {k: v for k, v in out["state"].items() if k.startswith(("params.", "rest."))}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  names = [jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in leaves]
  extra = sorted(set(raw) - set(names))
  if extra:
    raise CheckpointError(f"{where} does not fit this model: it holds {extra[:3]}"
                          f"{'...' if len(extra) > 3 else ''}, which this model lacks; "
                          "use the same model and model_kwargs")
  missing = [n for n in names if n not in raw]
  if strict and missing:
    raise CheckpointError(f"{where} does not fit this model: it lacks {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}; use the config it was trained with")
  filled = []
  for n, (_, ref) in zip(names, leaves):
    if n in raw:
      if np.shape(raw[n]) != np.shape(ref):
        raise CheckpointError(f"{where}: {n} has shape {np.shape(raw[n])}, the model expects "
                              f"{np.shape(ref)}; use the same model and model_kwargs")
      filled.append(np.asarray(raw[n], dtype=np.asarray(ref).dtype))
    else:
      filled.append(ref)
  return jax.tree_util.tree_unflatten(treedef, filled), dict(out["meta"])
