"""Structure rules of the library, checked on its source (see README, "Architecture").

- No import cycle between mpq's parts: each subpackage (`mpq.train`, `mpq.quant`, ...) and each
  top-level module (`mpq.config`, `mpq.experiment`, ...) is a node; every import of one part by
  another, at module level or inside a function, is an edge; the graph must be acyclic.
- No branch on estimator names outside the estimator registry (`mpq/quant/methods.py`).
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "mpq")


def _modules():
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _part(module: str) -> str:
  """`mpq.train.loop` -> `mpq.train`; `mpq.config` -> `mpq.config`; `mpq` -> `mpq`."""
  parts = module.split(".")
  return ".".join(parts[:2])


def _imports(module: str, path: str):
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
      yield base
      for a in node.names:  # `from mpq import quant` imports the part mpq.quant
        yield f"{base}.{a.name}"


def _graph():
  known = {m for m, _ in _modules()}
  edges: dict[str, set[str]] = {}
  for module, path in _modules():
    src = _part(module)
    for target in _imports(module, path):
      if not target.startswith("mpq.") or target not in known:
        continue
      dst = _part(target)
      if dst != src and dst != "mpq":
        edges.setdefault(src, set()).add(dst)
  return edges


def _cycle(edges):
  """One cycle as a list of nodes, or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(edges.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(edges):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_cycles():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_no_import_cycle_between_parts():
  edges = _graph()
  assert edges, "no imports found: the walker is broken"
  assert "mpq.quant" in edges.get("mpq.allocate", ()), edges  # the walker sees real edges
  cycle = _cycle(edges)
  assert cycle is None, " -> ".join(cycle)


def test_training_and_allocation_do_not_import_each_other():
  edges = _graph()
  assert "mpq.allocate" not in edges.get("mpq.train", set())
  assert "mpq.train" not in edges.get("mpq.allocate", set())
  assert not edges.get("mpq.losses")  # a leaf
  assert not edges.get("mpq.rounding")  # a leaf


def test_no_estimator_name_branches_outside_the_registry():
  # a comparison of something named `estimator` (or the old `e`) with a value or a tuple
  pattern = re.compile(r"""(estimator|\be)\s*(==|!=|\bin\s*\()""")
  hits = []
  for module, path in _modules():
    if module == "mpq.quant.methods":
      continue
    for i, line in enumerate(open(path, encoding="utf-8"), 1):
      code = line.split("#", 1)[0]
      if pattern.search(code):
        hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
  assert not hits, "\n".join(hits)


# Process-wide state that is not a forward-pass recorder: the XLA compilation counter is fed by
# jax.monitoring's listener (there is one per process by nature).
ALLOWED_GLOBAL_LISTS = {("mpq.train.loop", "_compiles")}


def test_no_module_global_recorder_lists():
  """Graph capture, calibration and comparison state is an explicit object (a `Recorder`, a
  quantizer's `hooks`), never a module-global list that the forward pass appends to. Module-level
  mutable lists are flagged; dicts only as UPPER_CASE registries."""
  hits = []
  for module, path in _modules():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in tree.body:
      if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
      elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets, value = [node.target], node.value
      else:
        continue
      names = [t.id for t in targets if isinstance(t, ast.Name)]
      is_list = isinstance(value, ast.List) or (
          isinstance(value, ast.Call) and getattr(value.func, "id", None) == "list")
      is_dict = isinstance(value, ast.Dict) or (
          isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict")
      for n in names:
        if is_list and n != "__all__" and (module, n) not in ALLOWED_GLOBAL_LISTS:
          hits.append(f"{module}.{n}: a module-global list")
        if is_dict and not n.isupper():
          hits.append(f"{module}.{n}: a module-global dict that is not a registry")
  assert not hits, "\n".join(hits)
