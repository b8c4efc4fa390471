"""A training workdir is owned by one run: output-path checks, the run lock, the resume check.

  check_dir / check_file   an output path's kind and writability, checked before any work, so that
                           a bad path is a one-line error and not a traceback half-way through
  Lock                     one run per workdir: an exclusive `flock` on `WORKDIR/.lock`, taken by
                           process 0 of a (multi-host) run. The kernel drops the lock when its
                           process dies, so a lock left by a killed run never blocks the next one;
                           the file holds the owner's pid, host and start time for the message. A
                           workdir the lock created is removed again if the run fails before it
                           starts training (`Lock.started`), so a failed start leaves nothing.
  resume_changes           a resumed run is the same run: the new config is compared with the
                           run's saved one (`config.json`); differences outside `RESUMABLE` are
                           refused unless the user passes --allow_config_change
  record_start             `config_history.jsonl`: one line per start or resume, with the
                           differences it was allowed to make
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from mpq.errors import UserError

LOCK, CONFIG, HISTORY = ".lock", "config.json", "config_history.jsonl"

# Fields that may change when a run is resumed: they change what is logged or kept, where the data
# is read from, or (the schedule's length, when extended) how long the same run goes on.
RESUMABLE = ("num_train_steps", "num_epochs", "log_every", "eval_every", "checkpoint_every",
             "keep_checkpoints", "eval_batch_size", "data_dir", "quant.target")
_SCHEDULE = ("num_train_steps", "num_epochs")


def _nearest_existing(path: str) -> str:
  p = os.path.abspath(path)
  while not os.path.exists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  return p


def _creatable(path: str, flag: str) -> None:
  """`path` does not exist: its nearest existing ancestor must be a writable directory."""
  base = _nearest_existing(path)
  if not os.path.isdir(base):
    raise UserError(f"{flag}={path}: {base} is a file, so this path cannot be created; "
                    "choose another path")
  if not os.access(base, os.W_OK | os.X_OK):
    raise UserError(f"{flag}={path}: cannot create it, {base} is not writable; choose a writable "
                    "location")


def check_dir(path: str, flag: str = "--workdir") -> None:
  """An output directory: an existing writable directory, or creatable."""
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise UserError(f"{flag}={path} is a file, not a directory; choose a directory")
    if not os.access(path, os.W_OK | os.X_OK):
      raise UserError(f"{flag}={path} is not writable; fix its permissions or choose another "
                      "directory")
  else:
    _creatable(path, flag)


def check_file(path: str, flag: str) -> None:
  """An output file: not a directory; an existing file must be writable, a new one creatable."""
  if os.path.isdir(path):
    raise UserError(f"{flag}={path} is a directory; pass a file name (e.g. {path.rstrip('/')}/"
                    "result.json)")
  if os.path.exists(path):
    if not os.access(path, os.W_OK):
      raise UserError(f"{flag}={path} is not writable; fix its permissions or choose another file")
  else:
    _creatable(path, flag)


def write_atomic(path: str, content: str | bytes) -> None:
  """Writes `content` (text as UTF-8, or bytes) to a temporary sibling of `path`, then renames it
  into place: `path` is whole or untouched."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(content.encode("utf-8") if isinstance(content, str) else content)
  os.replace(tmp, path)


class Lock:
  """Exclusive ownership of `workdir` by this run (process 0 only when `active` is False elsewhere).

  Use as a context manager around the run. On entry the workdir is created if needed and locked,
  or a `UserError` names the run that holds it. On exit the lock is released; if the run never
  called `started()` and the lock created the workdir, the (then empty) workdir is removed.
  """

  def __init__(self, workdir: str, active: bool = True):
    self.workdir, self.active = workdir, active
    self.path = os.path.join(workdir, LOCK)
    self._fd, self._created, self._started = None, None, False

  def __enter__(self) -> "Lock":
    if not os.path.isdir(self.workdir):
      self._created = _nearest_existing(self.workdir)  # removed up to here on a failed start
      os.makedirs(self.workdir, exist_ok=True)  # other hosts of a run may create it at once
    if not self.active:
      return self
    try:
      self._fd = self._acquire()
    except BaseException:
      self._remove_created()
      raise
    return self

  def _acquire(self) -> int:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        raise UserError(f"workdir {self.workdir} is in use by another run ({self._owner()}); "
                        "wait for it to finish or choose another --workdir") from None
      # The holder may have removed the file between our open and flock (release unlinks it): the
      # lock is only ours if the path still names the file we locked.
      try:
        same = os.path.samestat(os.fstat(fd), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd

  def _owner(self) -> str:
    try:
      with open(self.path, encoding="utf-8") as f:
        info = json.load(f)
      return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
      return "owner unknown"

  def started(self) -> None:
    """The run has written its workdir: from now on the workdir stays, whatever happens."""
    self._started = True

  def _remove_created(self) -> None:
    """Removes the directories the lock created (innermost first) while they are empty."""
    if not self._created or self._started:
      return
    d = os.path.abspath(self.workdir)
    while d != self._created and d.startswith(self._created):
      try:
        os.rmdir(d)
      except OSError:
        return  # something else is in it now: leave it
      d = os.path.dirname(d)

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass
      os.close(self._fd)  # releases the flock
      self._fd = None
    self._remove_created()


def saved_config(workdir: str) -> dict | None:
  """The config of the run in `workdir` (its `config.json`), or None for a new workdir."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is unreadable ({e}); restore it, or delete it to resume with this "
                    "command's config") from None
  if not isinstance(saved, dict):
    raise UserError(f"{path} is not a config (a JSON object); restore it, or delete it to resume "
                    "with this command's config")
  return saved


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(saved: dict, new: dict) -> dict[str, tuple]:
  """{dotted field: (saved value, new value)} over the fields of `new` (JSON-normalised: tuples
  compare equal to lists); fields only `saved` has (removed since) are not differences."""
  a = _flat(json.loads(json.dumps(saved)))
  b = _flat(json.loads(json.dumps(new)))
  return {k: (a.get(k), v) for k, v in sorted(b.items()) if k in a and a[k] != v}


def resume_changes(workdir: str, saved: dict, new: dict, old_total: int, new_total: int,
                   allow: bool) -> dict[str, tuple]:
  """The config differences of resuming the run in `workdir` with `new`; raises a `UserError`
  listing them unless each is in `RESUMABLE` (the schedule only when it is not shortened) or
  `allow` (--allow_config_change)."""
  diff = differences(saved, new)
  shortened = new_total < old_total
  refused = {k: v for k, v in diff.items()
             if k not in RESUMABLE or (k in _SCHEDULE and shortened)}
  if refused and not allow:
    listed = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
    why = (f" (the schedule would shrink from {old_total} to {new_total} steps)"
           if shortened and any(k in _SCHEDULE for k in refused) else "")
    raise UserError(
        f"{workdir} holds a run with a different config: {listed}{why}; a resumed run keeps its "
        f"config (may change: {', '.join(RESUMABLE)}, the schedule only extended). Use another "
        "--workdir, or pass --allow_config_change to resume with these changes (recorded in "
        f"{HISTORY})")
  return diff


def describe_changes(diff: dict, step: int, old_total: int, new_total: int) -> str:
  text = ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items())
  note = f"note: resuming at step {step} with {text}"
  if new_total != old_total:
    note += (f"; the schedule now ends at step {new_total} instead of {old_total}, which reshapes "
             "the learning-rate decay (warm-up + cosine) from here on")
  return note


def _show(v) -> str:
  return json.dumps(v) if isinstance(v, (list, dict)) else repr(v)


def record_start(workdir: str, config_json: str, step: int, changes: dict, forced: bool) -> None:
  """Writes `config.json` (the config this run now trains with) and appends the start to
  `config_history.jsonl`. The one writer of both; called once, when training really starts."""
  path = os.path.join(workdir, CONFIG)
  old = None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = f.read()
  if old != config_json:
    write_atomic(path, config_json)
  entry = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
           "event": "resume" if step > 0 or old is not None else "start", "step": step,
           "changes": {k: list(v) for k, v in changes.items()},
           "allow_config_change": forced}
  with open(os.path.join(workdir, HISTORY), "a", encoding="utf-8") as f:
    f.write(json.dumps(entry) + "\n")
