"""docker/Dockerfile (TPU) and docker/Dockerfile.cpu: what they copy and install exists, the layers are
ordered for fast rebuilds, and the entrypoint is the CLI (no docker engine needed)."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {"tpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
  """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
  out, pending = [], ""
  for line in path.read_text().splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith("#")):
      continue
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    full = (pending + line).strip()
    pending = ""
    word, _, rest = full.partition(" ")
    out.append((word.upper(), rest.strip()))
  assert not pending, f"{path}: dangling line continuation"
  return out


def index(steps, pred) -> int:
  return next(i for i, step in enumerate(steps) if pred(step))


def copy_sources(args: str) -> list[str]:
  parts = [p for p in shlex.split(args) if not p.startswith("--")]
  return parts[:-1]


def pip_installs(steps) -> list[tuple[int, str]]:
  """(step index, the pip install command) for every ``pip install`` in a RUN."""
  out = []
  for i, (word, args) in enumerate(steps):
    if word == "RUN":
      out += [(i, cmd.strip()) for cmd in re.split(r"&&|;", args) if "pip install" in cmd]
  return out


@pytest.fixture(params=sorted(DOCKERFILES))
def variant(request):
  return request.param


@pytest.fixture
def steps(variant):
  return instructions(DOCKERFILES[variant])


def test_base_image_has_the_python_the_project_requires(steps):
  word, image = steps[0]
  assert word == "FROM"
  m = re.fullmatch(r"python:(\d+)\.(\d+)(-slim)?", image)
  assert m, image
  required = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
  assert (int(m[1]), int(m[2])) >= (int(required[1]), int(required[2]))
  assert (int(m[1]), int(m[2])) >= (3, 11)  # the RUN step reads pyproject.toml with tomllib


def test_copied_files_exist(steps):
  sources = [s for word, args in steps if word == "COPY" for s in copy_sources(args)]
  assert {"pyproject.toml", "artifex_dpo", "configs"} <= set(sources)
  for s in sources:
    assert (ROOT / s).exists(), f"COPY {s}: no such file in the build context (the repository root)"
  # pip needs pyproject's readme file to build the package.
  assert PYPROJECT["project"]["readme"] in sources


def test_dependencies_are_installed_before_the_code_is_copied(steps):
  first_copy = index(steps, lambda s: s[0] == "COPY")
  assert copy_sources(steps[first_copy][1]) == ["pyproject.toml"]
  deps_run = index(steps, lambda s: s[0] == "RUN" and "requirements" in s[1] and "pip install" in s[1])
  code_copy = index(steps, lambda s: s[0] == "COPY" and "artifex_dpo" in copy_sources(s[1]))
  assert first_copy < deps_run < code_copy
  # Nothing between the pyproject COPY and the dependency install depends on the code.
  assert all(word != "COPY" for word, _ in steps[first_copy + 1:deps_run])
  package_install = [i for i, cmd in pip_installs(steps) if re.search(r"pip install '?\.", cmd)]
  assert package_install and min(package_install) > code_copy


def test_requirement_extraction_yields_the_pinned_dependencies(variant, steps, tmp_path):
  """Runs the Dockerfile's own dependency-listing command on a copy of pyproject.toml."""
  [(_, run)] = [s for s in steps if s[0] == "RUN" and "tomllib" in s[1]]
  m = re.match(r"python -c (\".*?\") > (\S+)", run)
  assert m, run
  code = shlex.split(m[1])[0]
  (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  expected = list(PYPROJECT["project"]["dependencies"])
  if variant == "tpu":
    expected += PYPROJECT["project"]["optional-dependencies"]["tpu"]
  assert proc.stdout.split("\n")[:-1] == expected
  assert "jax==0.10.2" in expected


def test_installed_extras_exist_and_tpu_only_in_the_tpu_image(variant, steps):
  extras = PYPROJECT["project"]["optional-dependencies"]
  named = set()
  for _, cmd in pip_installs(steps):
    for group in re.findall(r"\.\[([^\]]+)\]", cmd):
      named |= {e.strip() for e in group.split(",")}
  assert named <= set(extras), named - set(extras)
  if variant == "tpu":
    assert "tpu" in named
    assert extras["tpu"][0] == "jax[tpu]==0.10.2"
    assert any(r.startswith("gcsfs==") for r in extras["tpu"])  # gs:// workdirs without a FUSE mount
  else:
    assert "tpu" not in named
    assert not any("jax[tpu]" in args or "libtpu" in args for _, args in steps)
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "JAX_PLATFORMS=cpu" in env


def test_runs_as_a_non_root_user_after_installing(steps):
  users = [(i, args) for i, (word, args) in enumerate(steps) if word == "USER"]
  assert users, "no USER: the container would run as root"
  i, user = users[-1]
  assert user not in ("root", "0")
  assert i > max(j for j, (word, _) in enumerate(steps) if word == "RUN")
  assert any(word == "RUN" and f"useradd" in args and user in args for word, args in steps)


def exec_form(steps, word: str) -> list[str]:
  [(_, args)] = [s for s in steps if s[0] == word]
  value = json.loads(args)  # exec form: a JSON list (signals reach python, not a shell)
  assert isinstance(value, list) and all(isinstance(v, str) for v in value)
  return value


def test_entrypoint_is_the_cli_and_cmd_passes_defined_flags(steps):
  assert exec_form(steps, "ENTRYPOINT") == ["python", "-m", "artifex_dpo.main"]
  assert importlib.util.find_spec("artifex_dpo.main") is not None
  from absl import flags

  import artifex_dpo.main  # noqa: F401  (defines the flags)

  cmd = exec_form(steps, "CMD")
  for arg in cmd:
    assert arg.startswith("--") and "=" in arg, arg
    name, _, value = arg[2:].partition("=")
    assert name in flags.FLAGS, f"CMD passes --{name}, which artifex_dpo.main does not define"
    if name == "config":
      assert (ROOT / value).is_file()
  assert {a.split("=")[0] for a in cmd} == {"--config", "--workdir"}
  # The default workdir is the non-root user's home, which it can write.
  user = [args for word, args in steps if word == "USER"][-1]
  assert dict(a[2:].split("=", 1) for a in cmd)["workdir"].startswith(f"/home/{user}/")


def test_entrypoint_and_cmd_parse_as_the_cli(tmp_path):
  """The image's command line, run here: flags and config load; a bad value then exits 2 naming it."""
  steps = instructions(DOCKERFILES["cpu"])
  entry, cmd = exec_form(steps, "ENTRYPOINT"), exec_form(steps, "CMD")
  cmd = [a if not a.startswith("--workdir=") else f"--workdir={tmp_path}" for a in cmd]
  argv = [sys.executable if entry[0] == "python" else entry[0], *entry[1:], *cmd, "--config.train.steps=0"]
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "artifex_dpo: error: config key train.steps: must be > 0, got 0" in proc.stderr
