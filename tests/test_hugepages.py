"""The start-up re-exec that turns on glibc malloc's transparent-huge-page mode."""

import os
import subprocess
import sys

import pytest

from artifex_dpo import hugepages


def _thp(tmp_path, text):
  p = tmp_path / "enabled"
  p.write_text(text)
  return str(p)


def test_wanted_only_in_madvise_mode_and_once(tmp_path, monkeypatch):
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
  madvise = _thp(tmp_path, "always [madvise] never\n")
  assert hugepages.wanted({}, madvise)
  assert not hugepages.wanted({}, _thp(tmp_path, "[always] madvise never\n"))
  assert not hugepages.wanted({}, str(tmp_path / "missing"))
  assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, madvise)
  assert not hugepages.wanted({hugepages.OPT_OUT: "0"}, madvise)
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.31"))
  assert not hugepages.wanted({}, madvise)


def test_reexec_keeps_command_line_and_adds_tunable():
  code = ("import sys; from artifex_dpo import hugepages; hugepages.reexec_if_wanted(); import os; "
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
  env["GLIBC_TUNABLES"] = "glibc.malloc.trim_threshold=1048576"
  will = hugepages.wanted(env)
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True,
                       check=True).stdout.strip()
  if not will:
    pytest.skip("this machine's glibc or THP mode gains nothing from the re-exec")
  assert out == "glibc.malloc.trim_threshold=1048576:glibc.malloc.hugetlb=1 ['a', '--b=1']"
