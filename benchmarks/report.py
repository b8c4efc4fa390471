"""Regenerates the README's benchmark tables from `benchmarks/results/*.json`.

Command:  python benchmarks/report.py     (run by `make bench` after the benchmarks)

Each table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in README.md, so the README
never states a figure that no benchmark command produced. Missing result files leave their section
saying so.
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def accuracy_table(r: dict) -> str:
  cmds = sorted({row.get("command", r["command"]) for row in r["rows"]})
  lines = [f"Model `{r['model']}` on {r['dataset']}, test split; produced by "
           + ", ".join(f"`{c}`" for c in cmds) + ".", "",
           "| row | test accuracy (%) | delta to fp32 | target | meets | seconds |",
           "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    target = f"within {row['target']}" if "target" in row else ""
    meets = "" if "meets" not in row else ("yes" if row["meets"] else "**no**")
    delta = f"{row['delta']:+.2f}" if "delta" in row else ""
    lines.append(f"| {row['name']} | {row['accuracy']:.2f} | {delta} | {target} | {meets} | "
                 f"{row['seconds']:.0f} |")
  return "\n".join(lines)


def mixed_table(r: dict) -> str:
  lines = [f"Model `{r['model']}` on {r['dataset']} (fp32 {r['fp32']:.2f}%); produced by "
           f"`{r['command']}`. Budgets: the size of uniform b-bit weights with conv1 and head at 8.",
           "", "| arm | budget | test accuracy (%) | avg weight bits |", "|---|---|---|---|"]
  for row in r["rows"]:
    lines.append(f"| {row['name']} | {row['budget_bits']}-bit | {row['accuracy']:.2f} | "
                 f"{row['weight_bits_avg']:.3f} |")
  lines += ["", "| budget | uniform | best ILP | gain | target | meets |", "|---|---|---|---|---|---|"]
  for b, v in r["summary"].items():
    lines.append(f"| {b} | {v['uniform']:.2f} | {v['best_ilp']:.2f} | {v['gain']:+.2f} | "
                 f"{v['target']} | {'yes' if v['meets'] else '**no**'} |")
  lines += ["", "![accuracy vs weight size](benchmarks/results/mixed_pareto.png)"]
  return "\n".join(lines)


def integer_table(r: dict) -> str:
  from benchmarks import integer  # pylint: disable=g-import-not-at-top
  return (f"Fashion-MNIST test split (10,000 images), {r['device']}; produced by `{r['command']}`.\n\n"
          + integer.table(r["rows"], r.get("speed", [])))


def speed_table(r: dict) -> str:
  from benchmarks import speed  # pylint: disable=g-import-not-at-top
  cmds = sorted({row.get("command", r["command"]) for row in r["rows"]})
  return (f"{r['device']}; produced by " + ", ".join(f"`{c}`" for c in cmds) + ". Each ratio is a/b of two medians "
          "measured in one process (alternating calls after warm-up).\n\n" + speed.table(r["rows"]))


def deploy_table(r: dict) -> str:
  from benchmarks import deploy  # pylint: disable=g-import-not-at-top
  rt = ", ".join(f"{k} {v}" for k, v in r["runtimes"].items())
  n = sorted({row["num_examples"] for row in r["rows"]})
  flags = f" ({', '.join(r['cpu_flags'])})" if r.get("cpu_flags") else ""
  return (f"Fashion-MNIST test split (first {'/'.join(f'{x:,}' for x in n)} images), {rt}, "
          f"{r['cpu']}{flags}; produced by `{r['command']}`. Mismatches: output values that differ "
          "from mpq's executor emulating that runtime path. Latency: the integer file's batch-1 "
          "one-thread median over its float twin's under the same resolver (LiteRT), timed "
          "alternately in one process; ORT: the median in ms.\n\n" + deploy.table(r["rows"]))


TABLES = {"accuracy": accuracy_table, "mixed": mixed_table, "integer": integer_table,
          "speed": speed_table, "deploy": deploy_table}


def main():
  path = os.path.join(ROOT, "README.md")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  for name, fn in TABLES.items():
    res = os.path.join(RESULTS, f"{name}.json")
    if os.path.exists(res):
      with open(res, encoding="utf-8") as f:
        body = fn(json.load(f))
    else:
      body = f"(no results yet: run `make bench` to produce benchmarks/results/{name}.json)"
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
    if not pattern.search(text):
      raise SystemExit(f"error: README.md lacks the <!-- bench:{name} --> ... markers")
    text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"updated {path}")


if __name__ == "__main__":
  main()
