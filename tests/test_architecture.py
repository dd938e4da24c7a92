"""The import graph of jaxrecon (docs/architecture.md, "Floors"): no module imports another in a
cycle, counting function-level (lazy) imports. Reads the sources only; imports nothing."""

import ast
import pathlib

_PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxrecon"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(_PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the jaxrecon modules it imports anywhere in its source}. `from jaxrecon.x import y`
  counts as an import of jaxrecon.x.y when that is a module, else of jaxrecon.x."""
  modules = {_module_name(p): p for p in _PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:   # relative: from . import x / from .y import z
          base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
      else:
        continue
      for target in targets:
        while target and target not in modules:    # jaxrecon.x.attr → jaxrecon.x
          target = target.rpartition(".")[0]
        if target.startswith("jaxrecon") and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The non-trivial strongly connected components (Tarjan), each sorted."""
  index, low, stack, on_stack, components, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def test_the_graph_sees_lazy_imports():
  graph = import_graph()
  assert "jaxrecon.workdir" in graph["jaxrecon.train"] and "jaxrecon.workdir" in graph["jaxrecon.evaluation"]
  assert "jaxrecon.preview" in graph["jaxrecon.train"]            # a function-level import
  assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
  graph = import_graph()
  assert find_cycles(graph) == []
  assert "jaxrecon.train" not in graph["jaxrecon.evaluation"]
