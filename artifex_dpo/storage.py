"""One storage layer for the workdir and the inputs: local paths and ``gs://`` URIs alike.

Everything the program reads or writes outside Orbax goes through these functions (Orbax itself
takes ``gs://`` paths through tensorstore and ``etils.epath``). They are thin wrappers over
fsspec (``gcsfs`` for ``gs://``, fsspec's local file system otherwise), so no code here speaks
the GCS protocol.

Object stores have no folders, cannot append and cannot rename atomically; what this module
promises instead:

* ``makedirs`` makes a local folder, and is a no-op on a bucket (a local folder named ``gs:``
  is never created: every ``scheme://`` path goes to its fsspec file system);
* ``write_bytes`` / ``write_text`` are atomic: locally a temporary file renamed over the target,
  on a bucket one upload (an object is visible only once complete);
* ``append`` on a bucket uploads the new bytes as a small part object and composes it onto the
  target server-side (GCS ``compose``), so nothing is rewritten through the client;
* ``identity`` gives (size, version) of a file: the modification time in ns locally, the
  object generation on a bucket (a cache key changes when a file does).

Credentials are gcsfs's defaults (the GKE workload identity / the metadata server). Tests
point gcsfs and tensorstore at a local emulator with ``STORAGE_EMULATOR_HOST`` /
``TENSORSTORE_GCS_HTTP_URL`` (see ``tests/gcs.py``).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec


def is_remote(path: str | os.PathLike) -> bool:
  """True for a ``scheme://`` URI (``gs://bucket/...``), False for a local path."""
  return "://" in str(path)


def join(base: str | os.PathLike, *parts: str) -> str:
  """``os.path.join`` for local paths, ``/``-joining for URIs (never turns ``gs://`` into ``gs:/``)."""
  base = str(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def dirname(path: str | os.PathLike) -> str:
  path = str(path).rstrip("/")
  if is_remote(path):
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{posixpath.dirname(rest)}"
  return os.path.dirname(path)


def basename(path: str | os.PathLike) -> str:
  return posixpath.basename(str(path).rstrip("/")) if is_remote(path) else os.path.basename(str(path))


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
  """``(fsspec file system, the path as that file system names it)``."""
  path = str(path)
  if is_remote(path):
    protocol = path.split("://", 1)[0]
    # No listings cache: other processes write to the same bucket, and a stale listing would
    # hide their objects (e.g. another host's part of the data cache).
    fs = fsspec.filesystem(protocol, use_listings_cache=False)
    return fs, fs._strip_protocol(path)  # pylint: disable=protected-access
  return fsspec.filesystem("file"), os.path.abspath(path)


def _uri(fs, path: str, like: str) -> str:
  """The URI of ``path`` (as ``fs`` lists it) in the form of ``like`` (local or ``scheme://``)."""
  if is_remote(like):
    return f"{like.split('://', 1)[0]}://{path}"
  return path


def local_or_uri(path: str | os.PathLike) -> str:
  """An absolute local path, or the URI unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(str(path))


# ------------------------------------------------------------------------------ queries


def exists(path: str | os.PathLike) -> bool:
  fs, p = filesystem(path)
  return fs.exists(p)


def isfile(path: str | os.PathLike) -> bool:
  fs, p = filesystem(path)
  return fs.isfile(p)


def isdir(path: str | os.PathLike) -> bool:
  """A local folder, or a prefix on a bucket that holds at least one object."""
  fs, p = filesystem(path)
  return fs.isdir(p)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) of the entries of a folder; [] if it does not exist."""
  fs, p = filesystem(path)
  try:
    entries = fs.ls(p, detail=False)
  except FileNotFoundError:
    return []
  return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != p.rstrip("/")})


def glob(pattern: str) -> list[str]:
  """Files matching ``pattern`` (``**`` recurses), sorted, as local paths or URIs like ``pattern``."""
  fs, p = filesystem(pattern)
  if not is_remote(pattern):
    p = pattern  # keep relative local patterns relative (as glob.glob does)
  found = []
  for m in fs.glob(p):
    if fs.isfile(m):
      found.append(_uri(fs, m, pattern) if is_remote(pattern) else (m if os.path.isabs(pattern) else
                                                                     os.path.relpath(m)))
  return sorted(found)


def size(path: str | os.PathLike) -> int:
  fs, p = filesystem(path)
  return int(fs.size(p))


def identity(path: str | os.PathLike) -> tuple[str, int, str]:
  """``(path, size, version)``: version is the object generation on a bucket, mtime (ns) locally."""
  path = str(path)
  if not is_remote(path):
    st = os.stat(path)
    return os.path.abspath(path), int(st.st_size), str(st.st_mtime_ns)
  fs, p = filesystem(path)
  info = fs.info(p)
  version = info.get("generation") or info.get("etag") or info.get("mtime") or info.get("updated")
  return path, int(info.get("size", 0)), str(version)


# ------------------------------------------------------------------------------ reading


def open(path: str | os.PathLike, mode: str = "rb", **kwargs) -> IO[Any]:  # pylint: disable=redefined-builtin
  """Opens a file for reading (``rb`` / ``r``) or writing from scratch (``wb`` / ``w``)."""
  path = str(path)
  if not is_remote(path):
    return builtins.open(path, mode, **kwargs)
  fs, p = filesystem(path)
  return fs.open(p, mode, **kwargs)


def read_bytes(path: str | os.PathLike) -> bytes:
  fs, p = filesystem(path)
  return fs.cat_file(p)


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def read_range(path: str | os.PathLike, start: int, end: int) -> bytes:
  """Bytes ``[start, end)`` of a file: one ranged GET on a bucket, a seek+read locally."""
  if end <= start:
    return b""
  fs, p = filesystem(path)
  return fs.cat_file(p, start=int(start), end=int(end))


# ------------------------------------------------------------------------------ writing


def makedirs(path: str | os.PathLike) -> None:
  """A local folder (with parents); nothing on a bucket (objects need no folders)."""
  if not is_remote(path):
    os.makedirs(str(path), exist_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes a whole file atomically (complete or absent, never half-written)."""
  path = str(path)
  if is_remote(path):
    fs, p = filesystem(path)
    fs.pipe_file(p, bytes(data))  # one upload: the object appears only when complete
    return
  makedirs(os.path.dirname(os.path.abspath(path)))
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with builtins.open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def append(path: str | os.PathLike, data: bytes) -> None:
  """Appends bytes to a file; on a bucket: a part object composed onto the target (no rewrite).

  Not safe against concurrent appenders of the same object (only process 0 appends here).
  """
  path = str(path)
  if not data:
    return
  if not is_remote(path):
    makedirs(os.path.dirname(os.path.abspath(path)))
    with builtins.open(path, "ab") as f:
      f.write(data)
    return
  fs, p = filesystem(path)
  if not fs.exists(p):
    fs.pipe_file(p, bytes(data))
    return
  part = f"{p}.part-{uuid.uuid4().hex[:12]}"
  fs.pipe_file(part, bytes(data))
  try:
    fs.merge(p, [p, part])  # GCS compose: server-side concatenation into the same name
  finally:
    with contextlib.suppress(FileNotFoundError):
      fs.rm_file(part)
  fs.invalidate_cache(p)


def remove(path: str | os.PathLike, recursive: bool = False) -> None:
  """Removes a file (or a folder / prefix with ``recursive``); a missing path is no error."""
  fs, p = filesystem(path)
  try:
    fs.rm(p, recursive=recursive)
  except FileNotFoundError:
    pass
  if is_remote(path):
    fs.invalidate_cache()


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Moves a file or a folder. Atomic locally (``os.replace``); on a bucket a copy then a delete
  per object (not atomic: callers that need atomicity write a completion marker last)."""
  src, dst = str(src), str(dst)
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
    return
  fs, p = filesystem(src)
  _, q = filesystem(dst)
  # Object by object: copy (server-side rewrite), then delete the sources. (gcsfs's mv first
  # tries a move API that not every GCS endpoint offers, and retries it with back-off.)
  if fs.isdir(p):
    pairs = [(f, q + f[len(p):]) for f in fs.find(p)]
  else:
    pairs = [(p, q)]
  for a, b in pairs:
    fs.copy(a, b)
  fs.invalidate_cache()
  fs.rm([a for a, _ in pairs])
  fs.invalidate_cache()


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
  """Copies one file (any mix of local and remote)."""
  write_bytes(dst, read_bytes(src))


@contextlib.contextmanager
def staged_write(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """A local temporary path to write ``path`` through, for writers that need a local (seekable) file.

  When the context exits normally the file becomes ``path`` atomically: locally renamed over it
  (in the same folder), on a bucket uploaded in one streamed upload (the object appears only when
  complete). On an error the temporary file is deleted and ``path`` is left as it was.

  Args:
    path: The target, a local path or a ``scheme://`` URI.
    suffix: The temporary file's suffix (default: the target's extension).

  Yields:
    The local path to write.
  """
  path = str(path)
  import tempfile

  if is_remote(path):
    folder = None
  else:
    folder = os.path.dirname(os.path.abspath(path))
    makedirs(folder)
  fd, tmp = tempfile.mkstemp(prefix=".artifex-", suffix=suffix or posixpath.splitext(path)[1], dir=folder)
  os.close(fd)
  try:
    yield tmp
    if folder is not None:
      os.replace(tmp, path)
    else:
      fs, p = filesystem(path)
      fs.put_file(tmp, p)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)


@contextlib.contextmanager
def local_file(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
  """A local path holding the file's bytes, for libraries that only open local files.

  A local path is yielded as is. A remote file is streamed (never held whole in memory) into a
  private temporary file under ``tempfile.gettempdir()`` (``TMPDIR``), which is deleted when the
  context exits, also on an error or a download cut short.

  Args:
    path: A local path or a ``scheme://`` URI.
    suffix: The temporary file's suffix (default: the path's extension).

  Yields:
    The local path.

  Raises:
    FileNotFoundError: No such file.
    OSError: The download failed (e.g. the local disk is full).
  """
  path = str(path)
  if not is_remote(path):
    yield path
    return
  import tempfile

  fs, p = filesystem(path)
  fd, tmp = tempfile.mkstemp(prefix="artifex-", suffix=suffix or posixpath.splitext(path)[1])
  os.close(fd)
  try:
    fs.get_file(p, tmp)
    yield tmp
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)
