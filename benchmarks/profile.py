"""Op-by-op profile of a train step or of the integer executor, from a jax.profiler trace.

Command:  python benchmarks/profile.py step --model=resnet20 --estimator=lsq   (or --estimator=float)
          python benchmarks/profile.py int --export=EXPORT_DIR                 (an `eval.py --export`)
Output:   the step's median wall time, the top `--top` XLA fusions by time per call with what each
          computes (result shape and its HLO op counts, read from the compiled module), and totals
          by kind (convolutions/dots, the rest); the raw trace stays in `--trace_dir` (Perfetto).
Runtime:  under a minute (cnn) to two (resnet20) on 2 CPU cores.

Times of ops that ran on the two cores at once add up to more than the wall time. This is how the
findings in benchmarks/README.md were made.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _fusion_summaries(hlo: str) -> dict[str, str]:
  """`{instruction name: "result shape  op counts"}` for every fusion of a compiled HLO module."""
  bodies, cur = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      cur = bodies.setdefault(head.group(1), [])
      continue
    if cur is not None:
      op = re.search(r"= \S+ ([\w\-]+)\(", line)
      if op and op.group(1) not in ("parameter", "constant", "bitcast", "broadcast"):
        cur.append(op.group(1))
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\(.*?calls=%?([\w.\-]+)", line)
    if m:
      counts = collections.Counter(bodies.get(m.group(3), []))
      out[m.group(1)] = m.group(2).split("{")[0] + "  " + " ".join(
          f"{k}{'' if v == 1 else v}" for k, v in counts.most_common())
  return out


def _trace(fn, trace_dir: str, calls: int) -> tuple[dict[str, float], list[float]]:
  """Per-op milliseconds per call (summed over the trace's complete events) and wall times."""
  import jax  # pylint: disable=g-import-not-at-top
  shutil.rmtree(trace_dir, ignore_errors=True)
  walls = []
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(calls):
    t = time.perf_counter()
    fn()
    walls.append(time.perf_counter() - t)
  jax.profiler.stop_trace()
  path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  ms = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "Pjit")):
      ms[e["name"]] += e.get("dur", 0) / calls / 1000
  return ms, walls


def report(ms: dict[str, float], walls: list[float], hlo: str, top: int) -> str:
  what = _fusion_summaries(hlo)
  lines = [f"median wall time {1000 * float(np.median(walls)):.1f} ms per call; "
           f"op time {sum(ms.values()):.1f} ms (both cores)"]
  for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"{t:8.2f} ms  {name:34s} {what.get(name, '')[:140]}")
  kinds = collections.defaultdict(float)
  for name, t in ms.items():
    w = what.get(name, "")
    matmul = name.startswith(("ynn_fusion", "convolution", "dot")) or " convolution" in w
    kinds["convolutions/dots" if matmul else "elementwise, reductions, copies"] += t
  lines.append("by kind: " + ", ".join(f"{k} {v:.1f} ms" for k, v in kinds.items()))
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("step", "int"))
  p.add_argument("--model", default="cnn", choices=("cnn", "resnet20"))
  p.add_argument("--estimator", default="lsq",
                 help="float, or a QAT estimator (W4A4): lsq, ste, tqt, noise, dbits")
  p.add_argument("--export", help="directory of an exported integer model (for `int`)")
  p.add_argument("--batch", type=int, default=None, help="default 128 (step), 256 (int)")
  p.add_argument("--calls", type=int, default=5)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--trace_dir", default="/tmp/mpq_profile")
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import speed  # pylint: disable=g-import-not-at-top
  from mpq import data as data_lib  # pylint: disable=g-import-not-at-top
  data = data_lib.load("fashion_mnist", None, None, 1000)
  if args.what == "step":
    est = None if args.estimator == "float" else args.estimator
    if est is not None and est not in speed.ESTIMATORS:
      raise SystemExit(f"error: --estimator={est!r}: use float or one of {speed.ESTIMATORS}")
    f, state, _ = speed._step_fn(speed._config(args.model, est), data)  # pylint: disable=protected-access
    batch = jax.device_put(speed._batch(data, args.batch or 128))  # pylint: disable=protected-access
    hlo = f.lower(state, batch).compile().as_text()
    box = [state]

    def call():
      box[0], m = f(box[0], batch)
      jax.block_until_ready(m)
  else:
    if not args.export or not os.path.exists(os.path.join(args.export, "manifest.json")):
      raise SystemExit("error: `int` needs --export=DIR, a directory written by eval.py --export")
    from mpq import export, intexec  # pylint: disable=g-import-not-at-top
    manifest, tensors = export.load(args.export)
    run, _, _ = intexec.build(manifest, tensors)
    x = jax.numpy.asarray(next(data_lib.eval_batches(data, args.batch or 256))["image"])
    hlo = run.lower(x).compile().as_text()

    def call():
      jax.block_until_ready(run(x))
  for _ in range(3):  # compile and warm up
    call()
  ms, walls = _trace(call, args.trace_dir, args.calls)
  print(report(ms, walls, hlo, args.top))


if __name__ == "__main__":
  main()
