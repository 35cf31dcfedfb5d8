"""The package has no import cycles: no module imports a module that imports it back.

Imports are read from the source (module level and inside functions alike), so a cycle
hidden behind a function-level import is caught too.
"""

import ast
import os
import pkgutil

import infdiff

ROOT = os.path.dirname(infdiff.__file__)


def _modules() -> dict[str, str]:
  out = {"infdiff": os.path.join(ROOT, "__init__.py")}
  for info in pkgutil.walk_packages([ROOT], prefix="infdiff."):
    spec = info.module_finder.find_spec(info.name)
    out[info.name] = spec.origin
  return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
  """infdiff modules that `name` imports (explicit imports only)."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  deps = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      deps |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative import
        base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module
      for a in node.names:
        sub = f"{mod}.{a.name}"
        deps.add(sub if sub in known else mod)
  return {d for d in deps if d in known and d != name}


def _graph():
  mods = _modules()
  return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_the_walk_sees_the_method_packages():
  graph = _graph()
  assert "infdiff.methods.rapd.stage2" in graph
  assert "infdiff.runs" in graph["infdiff.methods.rapd.stage2"]


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
  assert _cycles(_graph()) == []


def test_the_rapd_stage_modules_import():
  import infdiff.methods.rapd.stage1
  import infdiff.methods.rapd.stage2  # noqa: F401
