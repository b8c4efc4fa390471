"""Metric output: TensorBoard event files (tensorboardX, no TensorFlow), `metrics.jsonl`, progress.

On a terminal a tqdm bar shows the step, throughput (images/s) and ETA; otherwise (CI, pipes, files)
plain log lines are printed every `log_every` steps. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax


class MetricWriter:

  def __init__(self, workdir: str, total_steps: int, batch_size: int, start_step: int = 0,
               progress: bool | None = None):
    self.active = jax.process_index() == 0
    self.total = total_steps
    self.batch_size = batch_size
    self._tb = None
    self._jsonl = None
    self._bar = None
    self._t0, self._s0 = time.time(), start_step
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    tb_dir, jsonl = os.path.join(workdir, "tb"), os.path.join(workdir, "metrics.jsonl")
    # A resumed run repeats the steps after its checkpoint: drop what a killed run logged for them.
    self._tb = SummaryWriter(tb_dir, purge_step=start_step + 1 if os.path.isdir(tb_dir) else None)
    _truncate(jsonl, start_step)
    self._jsonl = open(jsonl, "a", encoding="utf-8")
    if progress is None:
      progress = sys.stderr.isatty()
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       file=sys.stderr)

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    for k, v in metrics.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
    self._jsonl.flush()
    # per-layer metrics ("clip/conv1", ...) go to TensorBoard and metrics.jsonl, not the console
    text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "/" not in k)
    if self._bar is not None:
      if split == "train":
        self._bar.set_postfix_str(text)
      else:
        self._bar.write(f"step {step} {split}: {text}")
    else:
      extra = ""
      if split == "train":
        rate = (step - self._s0) / max(time.time() - self._t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        extra = f" | {rate * self.batch_size:.0f} img/s, ETA {eta:.0f}s"
      print(f"step {step}/{self.total} {split}: {text}{extra}", flush=True)

  def advance(self, step: int) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      rate = self._bar.format_dict.get("rate")
      if rate:
        self._bar.set_description(f"{rate * self.batch_size:.0f} img/s", refresh=False)

  def close(self) -> None:
    if not self.active:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()


def _truncate(path: str, step: int) -> None:
  """Keeps the lines of `metrics.jsonl` up to `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a kill
  if len(kept) == len(lines) and all(a == b for a, b in zip(kept, lines)):
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
