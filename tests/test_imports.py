"""The package has no import cycles: no module imports a module that imports it back.

Imports are read from the source (module level and inside functions alike), so a cycle
hidden behind a function-level import is caught too.
"""

import ast
import os
import pkgutil
import subprocess
import sys

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


_FLAG_CHECK = """
import importlib, pkgutil
from absl import flags
import infdiff
names = [m.name for m in pkgutil.walk_packages(infdiff.__path__, 'infdiff.')]
for name in names:
  importlib.import_module(name)
clis = [n for n in names if hasattr(importlib.import_module(n), 'define_flags')]
for name in clis:
  before = set(flags.FLAGS)
  importlib.import_module(name).define_flags()
  for flag in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag)
print(len(clis))
"""


def test_cli_flags_do_not_collide_with_imported_modules():
  """A CLI that defines its flags only when run (`define_flags`) can still be called in a
  process that has imported every other module: no module defines flags on import with the
  same names."""
  out = subprocess.run(
      [sys.executable, "-c", _FLAG_CHECK],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
      check=False,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) >= 3  # evaluate, guide, checkpoint_check
