"""Start-up re-exec that lets glibc's malloc back large blocks with transparent huge pages (CPU).

XLA:CPU allocates a step's temporaries afresh on every call. With 4 KiB pages, each call then
pays one page fault per 4 KiB touched: a multiply over a fresh 64 MiB array takes 20 ms instead of
2 ms on the 2-core machines we test on, and the training step about 10% longer. glibc >= 2.35
can ``madvise`` its blocks to huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), but reads
that setting only when a process starts, hence the re-exec. Nothing changes numerically.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ARTIFEX_DPO_HUGEPAGES"  # set to 0 to never re-exec


def wanted(environ=os.environ, thp_file: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> bool:
  """Whether a re-exec would change anything: glibc >= 2.35, THP in ``madvise`` mode, not yet set."""
  if environ.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return False
  try:
    with open(thp_file) as f:
      if "[madvise]" not in f.read():  # "always" needs nothing, "never" cannot be helped
        return False
  except OSError:
    return False
  libc, version = platform.libc_ver()
  try:
    return libc == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


def reexec_if_wanted() -> None:
  """Replaces this process (same PID, same command line) with one that has the tunable set."""
  if not wanted():
    return
  tunables = ":".join(x for x in (os.environ.get("GLIBC_TUNABLES", ""), TUNABLE) if x)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))
