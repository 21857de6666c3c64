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
