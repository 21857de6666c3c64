"""Storage errors as one line: the path and what the errno means (read-only, no space, not a folder).

A read-only workdir, a workdir whose parent is a file, or a full disk are input errors (exit 2), not
crashes: a restart cannot fix them, a person must. :func:`storage_error` finds such an error in an
exception chain, including tensorstore's (Orbax) errors, which carry the errno only in their text.
"""

from __future__ import annotations

import errno
import os
import re

# Errors of the storage itself (not of a missing input file, which the data layer reports).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                            errno.EDQUOT, errno.EIO, errno.EISDIR, errno.EFBIG})
_TS_ERRNO = re.compile(r"os_error_code='?(\d+)")
_TS_PATH = re.compile(r'"(/[^"]+)"')


def storage_error(e: BaseException, where: str = "?") -> str | None:
  """``"PATH: strerror"`` for the first storage error in ``e``'s chain; None if there is none.

  ``where`` stands for the path when the error names none (a write to an open file, say).
  """
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return f"{_short(str(e.filename or where))}: {os.strerror(e.errno)}"
    match = _TS_ERRNO.search(str(e))
    if match and int(match.group(1)) in STORAGE_ERRNOS:
      paths = _TS_PATH.findall(str(e)[:match.start()])
      return f"{_short(paths[-1]) if paths else where}: {os.strerror(int(match.group(1)))}"
    e = e.__cause__ or e.__context__
  return None


def _short(path: str) -> str:
  """``.../checkpoints/7.orbax-checkpoint-tmp/state.../d/1a2b`` -> ``.../checkpoints/7`` (the save that failed)."""
  head, sep, _ = path.partition(".orbax-checkpoint-tmp")
  return head if sep else path


def quiet_closed_event_loops() -> None:
  """Drops the late reports of a failed Orbax read or write: "Event loop is closed" from tensorstore's
  callbacks and exceptions of Orbax coroutines that were never awaited once the first read failed. The
  failure itself is reported once (a damaged checkpoint's warning line, main's error line); other
  errors print as before."""
  import sys

  default, default_unraisable = sys.excepthook, sys.unraisablehook

  def closed(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"

  def hook(kind, value, tb):
    if not closed(value):
      default(kind, value, tb)

  def from_orbax(info) -> bool:
    tb = info.exc_traceback
    while tb is not None:
      if "orbax/checkpoint" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    return False

  def unraisable(info):  # tensorstore reports a failed callback with PyErr_WriteUnraisable
    if not (closed(info.exc_value) or from_orbax(info)):
      default_unraisable(info)

  sys.excepthook, sys.unraisablehook = hook, unraisable


def check_workdir(workdir: str) -> None:
  """Creates the workdir and writes a file in it: storage errors surface here, before any work.

  Raises:
    OSError: naming the path (see :func:`storage_error`).
  """
  if "://" in workdir:
    return  # object stores: the lease write is the probe
  os.makedirs(workdir, exist_ok=True)
  probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("x" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise OSError(e.errno, e.strerror, workdir) from None  # name the workdir, not the probe file
  finally:
    if os.path.exists(probe):
      os.remove(probe)
