"""One run per workdir: a lease file ``WORKDIR/lease.json`` that its holder renews.

Two runs on one workdir would both append to ``metrics.jsonl`` and resume from each other's
checkpoints. The lease names its holder (host, pid, start time) and a generation number that
every write bumps; all writes are compare-and-swap on that generation, so two starters can never
both win:

- absent: create it (only if still absent);
- held by a process on this host that is gone (``kill -9``, crash): take it over at once;
- held by a live process on this host: refused at once (exit 2, naming the holder);
- held from another host: watch it. If its holder renews it (the generation changes), the
  holder is alive: refused. If it is not renewed for ``timeout_s`` seconds (measured on this
  host's monotonic clock, so clock skew does not matter), the holder is gone: take it over.

The holder renews every ``timeout_s / 4`` seconds from a daemon thread and deletes the lease on
exit. A holder that finds its lease taken (it stalled for longer than the timeout and another run
took over) stops at once without saving, so that it never overwrites the new holder's checkpoints.

Multi-host: the processes of one job share one lease; process 0 holds and renews it (see
``main``). The compare-and-swap is a small backend (:class:`LocalBackend` here: ``flock`` around
read-check-replace; :class:`ObjectStoreBackend` for ``gs://``: object generation preconditions,
"only if missing" to create, "only if generation g" to renew, take over or delete).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Protocol

LEASE_FILE = "lease.json"


class LeaseError(ValueError):
  """The workdir is leased by another live run (one line naming the holder)."""


class Backend(Protocol):
  """Compare-and-swap storage of one small JSON document."""

  def read(self) -> tuple[dict[str, Any], int] | None:
    """``(document, generation)``, or None when absent."""

  def write_if(self, doc: dict[str, Any], generation: int | None) -> int | None:
    """Writes if the stored generation is ``generation`` (None: only if absent); the new generation or None."""

  def delete_if(self, generation: int) -> bool:
    """Deletes if the stored generation is ``generation``."""


class LocalBackend:
  """A file on a local or shared POSIX file system; ``flock`` on a side file guards each swap."""

  def __init__(self, path: str):
    self.path = path
    self._lock_path = path + ".lock"

  def _locked(self):
    fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd

  def _read_unlocked(self) -> tuple[dict[str, Any], int] | None:
    try:
      with open(self.path) as f:
        doc = json.load(f)
    except FileNotFoundError:
      return None
    except ValueError:  # half-written by a writer killed mid-write: treat as a stale lease
      return {"host": "?", "pid": -1, "start_time": "?"}, -1
    return doc, int(doc.get("generation", 0))

  def read(self):
    fd = self._locked()
    try:
      return self._read_unlocked()
    finally:
      os.close(fd)

  def write_if(self, doc, generation):
    fd = self._locked()
    try:
      current = self._read_unlocked()
      if (current is None) != (generation is None) or (current is not None and current[1] != generation):
        return None
      new_generation = (generation if generation is not None else 0) + 1
      tmp = f"{self.path}.tmp-{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(dict(doc, generation=new_generation), f)
      os.chmod(tmp, 0o644)
      os.replace(tmp, self.path)
      return new_generation
    finally:
      os.close(fd)

  def delete_if(self, generation):
    fd = self._locked()
    try:
      current = self._read_unlocked()
      if current is None or current[1] != generation:
        return False
      os.remove(self.path)
      return True
    finally:
      os.close(fd)


def _process_start(pid: int) -> str | None:
  """The kernel's start time of ``pid`` (tells a reused pid apart); None where /proc has none."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, start: str | None) -> bool:
  if pid <= 0 or pid == os.getpid():  # our own pid: a previous incarnation (a container restarted in place)
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  return start is None or _process_start(pid) in (None, start)


def describe(doc: dict[str, Any]) -> str:
  return f"host {doc.get('host')} pid {doc.get('pid')} (started {doc.get('start_time')})"


class ObjectStoreBackend:
  """The lease as one object in a bucket (``gs://``), swapped with the store's own preconditions.

  Through tensorstore's kvstore (the library Orbax already uses for ``gs://``): each write carries
  ``if_equal`` = the object generation last read (GCS ``ifGenerationMatch``; "missing" to create),
  so of two writers only one succeeds. The integer generation the :class:`Lease` compares is kept in
  the document, as :class:`LocalBackend` does.
  """

  def __init__(self, path: str):
    import tensorstore as ts  # noqa: PLC0415

    bucket, _, key = path.removeprefix("gs://").partition("/")
    if not path.startswith("gs://") or not bucket or not key:
      raise ValueError(f"{path}: a lease in a bucket needs a gs://BUCKET/path")
    self.path = path
    self._kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    self._key = key

  def _read(self):
    """``((document, generation) | None, object generation)``."""
    r = self._kv.read(self._key).result()
    if r.state == "missing":
      return None, r.stamp.generation
    try:
      doc = json.loads(r.value)
    except ValueError:
      return ({"host": "?", "pid": -1, "start_time": "?"}, -1), r.stamp.generation
    return (doc, int(doc.get("generation", 0))), r.stamp.generation

  def read(self):
    return self._read()[0]

  def write_if(self, doc, generation):
    current, stamp = self._read()
    if (current is None) != (generation is None) or (current is not None and current[1] != generation):
      return None
    new_generation = (generation if generation is not None else 0) + 1
    data = json.dumps(dict(doc, generation=new_generation)).encode()
    written = self._kv.write(self._key, data, if_equal=stamp).result()
    return new_generation if written.generation else None  # an empty generation: the precondition failed

  def delete_if(self, generation):
    current, stamp = self._read()
    if current is None or current[1] != generation:
      return False
    return bool(self._kv.write(self._key, None, if_equal=stamp).result().generation)


def backend_for(path: str) -> Backend:
  """The compare-and-swap backend of a lease path: a bucket object for ``gs://``, else a local file."""
  return ObjectStoreBackend(path) if path.startswith("gs://") else LocalBackend(path)


@dataclasses.dataclass
class Lease:
  """The workdir lease of this run (see the module docstring).

  Attributes:
    path: the lease file.
    timeout_s: seconds without renewal after which a lease from another host is taken over.
  """

  path: str
  timeout_s: float
  backend: Backend | None = None
  log: Any = None

  def __post_init__(self):
    self.backend = self.backend or backend_for(self.path)
    self._doc = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                 "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    self._generation: int | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self, poll_s: float | None = None) -> None:
    """Takes the lease or raises LeaseError naming the live holder (may wait up to ``timeout_s``)."""
    poll_s = poll_s or min(1.0, self.timeout_s / 20)
    watched: tuple[int, float] | None = None  # (generation seen, monotonic time first seen)
    while True:
      current = self.backend.read()
      if current is None:
        self._generation = self.backend.write_if(self._doc, None)
        if self._generation is not None:
          return
        continue
      holder, generation = current
      if holder.get("host") == self._doc["host"] and generation >= 0:
        if _alive(int(holder.get("pid", -1)), holder.get("pid_start")):
          raise LeaseError(f"{self.path}: the workdir is in use by a live run: {describe(holder)}; stop it or "
                           "use another --workdir")
        reason = "its process is gone"
      elif generation < 0:
        reason = "it is unreadable"
      else:
        now = time.monotonic()
        if watched is None or watched[0] != generation:
          if watched is not None:
            raise LeaseError(f"{self.path}: the workdir is in use by a live run (it renewed its lease while we "
                             f"waited): {describe(holder)}; stop it or use another --workdir")
          watched = (generation, now)
          self._say(f"the workdir lease is held by {describe(holder)} on another host: waiting up to "
                    f"{self.timeout_s:g} s to see whether it is renewed")
        if now - watched[1] < self.timeout_s:
          time.sleep(poll_s)
          continue
        reason = f"not renewed for {self.timeout_s:g} s"
      self._generation = self.backend.write_if(self._doc, generation)
      if self._generation is not None:
        self._say(f"took over the workdir lease of {describe(holder)}: {reason}")
        return
      watched = None  # someone else swapped it meanwhile: look again

  def start_renewing(self, on_lost) -> None:
    """Renews every ``timeout_s / 4`` s from a daemon thread; ``on_lost(holder)`` when taken over."""

    def loop():
      while not self._stop.wait(self.timeout_s / 4):
        try:
          generation = self.backend.write_if(dict(self._doc, renewed=time.time()), self._generation)
        except OSError as e:  # a full disk, a network hiccup: try again at the next tick
          self._say(f"could not renew the workdir lease ({e}); retrying")
          continue
        if generation is None:
          current = self.backend.read()
          on_lost(describe(current[0]) if current else "nobody (deleted)")
          return
        self._generation = generation

    self._thread = threading.Thread(target=loop, name="workdir-lease", daemon=True)
    self._thread.start()

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=5)  # a renewal in flight would bump the generation under us
    if self._generation is not None:
      self.backend.delete_if(self._generation)
      self._generation = None

  def _say(self, line: str) -> None:
    if self.log is not None:
      self.log(line)
