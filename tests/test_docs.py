"""The project's docs are its own: the README links docs/, and nothing points outside the project."""

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files():
  out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
  return [ROOT / f for f in out if f.endswith((".py", ".md", ".toml", ".yaml", ".txt")) or "Dockerfile" in f]


def test_readme_links_design_doc_that_exists():
  readme = (ROOT / "README.md").read_text()
  links = set(re.findall(r"\]\((docs/[^)#]+)", readme))
  assert "docs/design.md" in links
  assert all((ROOT / link).is_file() for link in links), links


def test_nothing_cites_files_outside_the_project():
  offenders = []
  for path in _tracked_text_files():
    if path.name == "test_docs.py" or not path.is_file():
      continue
    text = path.read_text(errors="replace")
    rel = path.relative_to(ROOT)
    # The benchmarks and their test may run the shared standard workload; nothing a user reads may cite outside.
    outside = r"(?<![\w/])DESIGN\.md" if rel.parts[0] in ("benchmarks", "tests") else r"(?<![\w/])DESIGN\.md|\.\./shared/"
    if re.search(outside, text):
      offenders.append(str(rel))
  assert not offenders, offenders


def _exit_codes_in_package():
  """Every ``EXIT_* = N`` constant of the package (plain or tuple assignments), parsed, not imported."""
  codes = {}
  for path in (ROOT / "artifex_dpo").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target, value = node.targets[0], node.value
        names = [target] if isinstance(target, ast.Name) else getattr(target, "elts", [])
        values = [value] if isinstance(value, ast.Constant) else getattr(value, "elts", [])
        for n, v in zip(names, values):
          if isinstance(n, ast.Name) and n.id.startswith("EXIT_") and isinstance(v, ast.Constant):
            codes[n.id] = v.value
  return codes


def test_design_doc_lists_every_exit_code():
  codes = set(_exit_codes_in_package().values()) - {0}
  assert {2, 3, 75} <= codes, codes
  design = (ROOT / "docs" / "design.md").read_text()
  documented = {int(c) for c in re.findall(r"^\| (\d+) \|", design, flags=re.M)}
  assert codes <= documented, codes - documented


def _package_modules() -> set[str]:
  """Every module file of the package, relative to ``artifex_dpo/`` (``setup.py``, ``data/loader.py``, ...)."""
  pkg = ROOT / "artifex_dpo"
  return {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if "__pycache__" not in p.parts}


def _design_module_list(design: str) -> set[str]:
  """The modules listed in the design doc's package block (the fenced block that starts ``artifex_dpo/``)."""
  block = re.search(r"^```\nartifex_dpo/\n(.*?)^```", design, flags=re.M | re.S)
  assert block, "docs/design.md has no package block starting with 'artifex_dpo/'"
  return set(re.findall(r"^  ([\w/]+\.py)\s", block.group(1), flags=re.M))


def test_design_doc_lists_every_module_of_the_package():
  listed = _design_module_list((ROOT / "docs" / "design.md").read_text())
  modules = _package_modules()
  assert not modules - listed, f"modules missing from docs/design.md's layout: {sorted(modules - listed)}"
  assert not listed - modules, f"docs/design.md lists modules that do not exist: {sorted(listed - modules)}"


def test_design_doc_module_check_fails_when_a_module_is_missing():
  """The check above notices a module left out of the list (here: the doc without its ``setup.py`` line)."""
  design = (ROOT / "docs" / "design.md").read_text()
  without = re.sub(r"^  setup\.py .*\n", "", design, flags=re.M)
  assert without != design
  assert "setup.py" in _package_modules() - _design_module_list(without)


def _module_exists(dotted: str) -> bool:
  """``artifex_dpo.a.b[.name]``: each part a subpackage or module, the first part after a module aside."""
  path = ROOT
  for part in dotted.split("."):
    if (path / part).is_dir() and (path / part / "__init__.py").is_file():
      path = path / part
    elif (path / f"{part}.py").is_file():
      return True  # a module: what follows is a name in it
    else:  # a name the package re-exports (artifex_dpo.models.LlamaModel)
      return path != ROOT and re.search(rf"\b{re.escape(part)}\b", (path / "__init__.py").read_text()) is not None
  return True


def test_every_module_named_in_the_docs_exists():
  missing = []
  for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    text = doc.read_text()
    # Lower-case names only: ``configs/X.py`` and the like are placeholders.
    for path in re.findall(r"(?<![\w/.])((?:artifex_dpo|benchmarks|configs|launch|tests|docker)/[a-z0-9_/]+\.py)\b",
                           text):
      if not (ROOT / path).is_file():
        missing.append(f"{doc.name}: {path}")
    for dotted in re.findall(r"(?<![\w/.])(artifex_dpo(?:\.\w+)+)", text):
      if not _module_exists(dotted):
        missing.append(f"{doc.name}: {dotted}")
  assert not missing, missing
