"""SIGTERM and SIGINT in every phase of a run, from the first line of ``main`` on.

- SIGTERM means "preempted" (GKE, TPU maintenance): exit 75, after saving a checkpoint whenever a
  training step ran since the last one. Before the first step (data loading, weight loading,
  restore, compile) and after the final checkpoint is committed (export) there is nothing to save:
  the process exits 75 at once, even in the middle of a long compile.
- SIGINT (Ctrl-C) saves the same way and exits 130 with one line (no traceback); a second Ctrl-C
  aborts at once without saving.

Multi-host: ``jax.distributed.initialize`` installs JAX's own SIGTERM handler (the preemption
service), which replaces ours; every process then stops at JAX's preemption sync point, the first
step boundary all processes agree on. A Ctrl-C on one process of a multi-host run is turned into
that same preemption notice (by sending this process SIGTERM), so all processes save the same step;
the interrupted process exits 130, the others 75.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

_active: Signals | None = None


def _say(line: str) -> None:
  # os.write, not print/logging: a signal handler may run while another frame holds their locks.
  os.write(2, f"artifex_dpo: {line}\n".encode())


class Signals:
  """What the handlers know about the run: whether anything is unsaved, what was requested.

  Attributes:
    requested: None, or the exit code a signal asked for (75 preempted, 130 interrupted); the
      training loop saves at the next step boundary and exits with it.
    unsaved: True while a training step has run since the last committed checkpoint (set by the
      training loop); False means a signal exits at once.
  """

  def __init__(self):
    self.requested: int | None = None
    self.unsaved = False
    self._interrupts = 0
    self._cleanups: list[Callable[[], None]] = []
    self._previous: dict[int, object] = {}

  def install(self) -> Signals:
    """Installs the handlers (main thread only); returns self."""
    global _active
    for signum, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_int)):
      self._previous[signum] = signal.signal(signum, handler)
    _active = self
    return self

  def uninstall(self) -> None:
    global _active
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()
    if _active is self:
      _active = None

  def on_exit_now(self, cleanup: Callable[[], None]) -> None:
    """Registers a cleanup (e.g. releasing the workdir lease) run before an immediate exit."""
    self._cleanups.append(cleanup)

  def exit_now(self, code: int, line: str) -> None:
    for cleanup in self._cleanups:
      try:
        cleanup()
      except Exception:  # noqa: BLE001 - exiting anyway; the lease then expires by itself
        pass
    _say(line)
    os._exit(code)

  def _on_term(self, signum, frame) -> None:
    del signum, frame
    if self.unsaved:
      self.requested = self.requested or EXIT_PREEMPTED
      return
    self.exit_now(EXIT_PREEMPTED, f"preempted (SIGTERM) with nothing unsaved; exiting with code {EXIT_PREEMPTED}")

  def _on_int(self, signum, frame) -> None:
    del signum, frame
    self._interrupts += 1
    if self._interrupts > 1:
      self.exit_now(EXIT_INTERRUPTED, "interrupted again (Ctrl-C): aborted at once, without saving")
    if not self.unsaved:
      self.exit_now(EXIT_INTERRUPTED, f"interrupted (Ctrl-C) with nothing unsaved; exiting with code "
                                      f"{EXIT_INTERRUPTED}")
    self.requested = EXIT_INTERRUPTED
    if _multi_process():
      # Route the stop through JAX's preemption service so that every process saves the same step.
      threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM), daemon=True).start()

  def reached(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (every process gets the same answer at the same step)."""
    if _multi_process():
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested is not None

  def exit_code(self) -> int:
    return self.requested or EXIT_PREEMPTED


def _multi_process() -> bool:
  import jax

  return jax.process_count() > 1


def active() -> Signals | None:
  """The installed handlers (None when ``train.run`` is called as a library, outside ``main``)."""
  return _active
