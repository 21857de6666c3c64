"""The modules of artifex_dpo.data import each other without a cycle (issue 14).

Every ``import`` / ``from ... import`` statement counts, wherever it stands: at module level,
inside a function, or under ``if TYPE_CHECKING:`` (a cycle hidden in a function is still a cycle
of responsibilities, and one edit away from an ImportError at import time).
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "artifex_dpo.data"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "artifex_dpo" / "data"
INIT = "__init__"


def _imported_modules(source: str, module: str, submodules: set[str]) -> set[str]:
  """The package's modules (by short name; ``__init__`` for the package) that ``source`` imports."""
  found: set[str] = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
      for name in names:
        if name == PACKAGE:
          found.add(INIT)
        elif name.startswith(PACKAGE + "."):
          found.add(name[len(PACKAGE) + 1:].split(".")[0])
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from . import x / from .x import y (modules of this package only)
        base = node.module.split(".")[0] if node.module else None
        if node.level > 1:
          continue
      elif node.module == PACKAGE:
        base = None
      elif node.module and node.module.startswith(PACKAGE + "."):
        base = node.module[len(PACKAGE) + 1:].split(".")[0]
      else:
        continue
      if base is not None:
        found.add(base)
        continue
      for alias in node.names:  # from artifex_dpo.data import x: a submodule, or a name of __init__
        found.add(alias.name if alias.name in submodules else INIT)
  found.discard(module)
  return found


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """Module short name -> the package's modules it imports (every import statement, anywhere)."""
  files = {path.stem: path for path in sorted(package_dir.glob("*.py"))}
  submodules = set(files) - {INIT}
  return {name: _imported_modules(path.read_text(), name, submodules) & set(files)
          for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as ``[a, b, ..., a]``, or None when the graph has none."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_data_package_has_no_import_cycle():
  graph = import_graph(PACKAGE_DIR)
  assert len(graph) > 5, f"found too few modules in {PACKAGE_DIR}"
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle in artifex_dpo.data: " + " -> ".join(cycle)


def test_a_cycle_through_a_function_or_type_checking_import_is_found(tmp_path):
  """The checker itself: imports inside functions and under TYPE_CHECKING are edges."""
  (tmp_path / "__init__.py").write_text("from artifex_dpo.data.first import thing\n")
  (tmp_path / "first.py").write_text("def f():\n  from artifex_dpo.data.second import other\n")
  (tmp_path / "second.py").write_text(
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from artifex_dpo.data.first import thing\n")
  (tmp_path / "third.py").write_text("import numpy\nfrom artifex_dpo.data import second\n")
  graph = import_graph(tmp_path)
  assert graph == {"__init__": {"first"}, "first": {"second"}, "second": {"first"}, "third": {"second"}}
  assert find_cycle(graph) == ["first", "second", "first"]
  (tmp_path / "second.py").write_text("from artifex_dpo.data import DataError\n")  # a name of __init__
  assert find_cycle(import_graph(tmp_path)) == ["__init__", "first", "second", "__init__"]
  (tmp_path / "second.py").write_text("import os\n")
  assert find_cycle(import_graph(tmp_path)) is None
