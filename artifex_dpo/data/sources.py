"""Record sources: JSON Lines, Parquet, ArrayRecord files found by globs.

Every record is a JSON object (a dict). Records are numbered from 1 within their file (line
number for JSON Lines, row number for Parquet and ArrayRecord) so that errors can say
``file:line: what is wrong``. Nothing is unpickled or evaluated: ArrayRecord records must hold
JSON-encoded objects (UTF-8 bytes).
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from artifex_dpo import storage
from artifex_dpo.data.errors import DataError

FORMATS = ("jsonl", "json", "parquet", "array_record")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".array_record": "array_record",
    ".arrayrecord": "array_record",
}
_GLOB_CHARS = set("*?[")
_ARRAY_RECORD_CHUNK = 1024
_PARQUET_BATCH = 4096


def _is_uri(path: str) -> bool:
  return "://" in path


def expand_files(globs: str | Sequence[str]) -> list[str]:
  """Expands ``data.train_files`` / ``data.eval_files`` into a sorted list of files.

  Args:
    globs: One string of comma-separated globs, or a list of globs. ``**`` recurses.
      Paths with a ``scheme://`` are globbed with ``etils.epath``.

  Returns:
    The matching files, sorted and without duplicates.

  Raises:
    DataError: No globs were given, or a glob (or plain path) matches no file.
  """
  if isinstance(globs, str):
    patterns = [g.strip() for g in globs.split(",")]
  else:
    patterns = [str(g).strip() for g in globs]
  patterns = [p for p in patterns if p]
  if not patterns:
    raise DataError(None, None, "no data files given")
  files: set[str] = set()
  for pattern in patterns:
    if _is_uri(pattern):
      matches = _glob_uri(pattern)
    elif _GLOB_CHARS & set(pattern):
      matches = [m for m in _glob.glob(pattern, recursive=True) if os.path.isfile(m)]
    else:
      matches = [pattern] if os.path.isfile(pattern) else []
    if not matches:
      what = "no file matches this glob" if _GLOB_CHARS & set(pattern) else "no such file"
      raise DataError(pattern, None, what)
    files.update(matches)
  return sorted(files)


def _glob_uri(pattern: str) -> list[str]:
  if not _GLOB_CHARS & set(pattern):
    return [pattern] if storage.isfile(pattern) else []
  return storage.glob(pattern)


def detect_format(path: str, format: str | None = None) -> str:
  """The record format of a file: ``format`` if given (``data.format``; ``auto``: none), else its extension.

  Raises:
    DataError: Unknown format or extension.
  """
  if format and format != "auto":
    if format not in FORMATS:
      raise DataError(path, None, f"unknown data.format {format!r} (one of {', '.join(FORMATS)})")
    return format
  name = path.lower()
  for ext, fmt in _EXTENSIONS.items():
    if name.endswith(ext):
      return fmt
  raise DataError(
      path, None, "cannot tell the format from the extension (use .jsonl, .json, .parquet, "
      ".array_record, or set data.format)"
  )


def read_records(path: str, format: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
  """Reads the records of one file.

  Args:
    path: The file.
    format: ``jsonl`` | ``json`` | ``parquet`` | ``array_record``; None: from the extension.
      ``json`` accepts JSON Lines or a single JSON array of objects.

  Yields:
    (record number from 1, record dict).

  Raises:
    DataError: The file cannot be read, holds no records, or a record is not a JSON
      object (malformed JSON, another JSON type, bad UTF-8).
  """
  for line, value in read_records_lenient(path, format):
    if isinstance(value, DataError):
      raise value
    yield line, value


def read_records_lenient(
    path: str, format: str | None = None
) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
  """Like `read_records`, but a bad record is yielded as its `DataError` (to skip it).

  Problems of the whole file (cannot open, no records, unreadable Parquet) still raise.
  """
  fmt = detect_format(path, format)
  reader = {
      "jsonl": _read_jsonl,
      "json": _read_json,
      "parquet": _read_parquet,
      "array_record": _read_array_record,
  }[fmt]
  count = 0
  for item in reader(path):
    count += 1
    yield item
  if count == 0:
    raise DataError(path, None, "empty file (no records)")


def _open_binary(path: str):
  try:
    return storage.open(path, "rb")
  except OSError as e:
    raise DataError(path, None, f"cannot open: {e.strerror or e}") from None


def _parse_object(path: str, line: int, raw: bytes | str) -> dict[str, Any]:
  try:
    if isinstance(raw, bytes):
      raw = raw.decode("utf-8")
    value = json.loads(raw)
  except UnicodeDecodeError as e:
    raise DataError(path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise DataError(path, line, f"malformed JSON: {e.msg} (column {e.colno})") from None
  except RecursionError:
    raise DataError(path, line, "malformed JSON: nested too deeply") from None
  if not isinstance(value, dict):
    raise DataError(path, line, f"expected a JSON object, got {_json_type(value)}")
  return value


def _parse_or_error(path: str, line: int, raw: bytes | str) -> dict[str, Any] | DataError:
  try:
    return _parse_object(path, line, raw)
  except DataError as e:
    return e


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
      type(value), "a number"
  )


def _read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
  with _open_binary(path) as f:
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark.
      if not raw.strip():
        continue
      yield line_no, _parse_or_error(path, line_no, raw)


def _read_json(path: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
  """A .json file: a JSON array of objects (numbered from 1), or JSON Lines."""
  with _open_binary(path) as f:
    head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
  if not head.startswith(b"["):
    yield from _read_jsonl(path)
    return
  with _open_binary(path) as f:
    data = f.read()
  try:
    values = json.loads(data.decode("utf-8-sig"))
  except UnicodeDecodeError as e:
    raise DataError(path, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise DataError(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(values, list):
    raise DataError(path, None, "expected a JSON array of objects or JSON Lines")
  for index, value in enumerate(values, start=1):
    if not isinstance(value, dict):
      value = DataError(path, index, f"expected a JSON object, got {_json_type(value)}")
    yield index, value


def _read_parquet(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    source = _open_binary(path) if _is_uri(path) else path
    parquet = pq.ParquetFile(source)
  except (pa.ArrowException, OSError) as e:
    raise DataError(path, None, f"cannot read Parquet: {e}") from None
  row = 0
  try:
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
      for record in batch.to_pylist():
        row += 1
        yield row, record
  except (pa.ArrowException, OSError) as e:
    raise DataError(path, row + 1, f"cannot read Parquet: {e}") from None


def read_array_record_lenient(
    path: str, wanted: Callable[[], bool] | None = None
) -> Iterator[tuple[int, dict[str, Any] | DataError | None]]:
  """`read_records_lenient` for one ArrayRecord file, reading (decompressing, parsing) only wanted records.

  Args:
    path: The file (local or ``gs://``).
    wanted: Called once per record, in order; a record for which it is False is yielded as None,
      neither read nor parsed (the tokenize-once cache: each process reads only its chunks). None:
      every record.

  Yields:
    (record number from 1, record dict, its `DataError`, or None when not wanted).

  Raises:
    DataError: The file cannot be read or holds no records.
  """
  count = 0
  for item in _read_array_record(path, wanted):
    count += 1
    yield item
  if count == 0:
    raise DataError(path, None, "empty file (no records)")


def _read_array_record(
    path: str, wanted: Callable[[], bool] | None = None
) -> Iterator[tuple[int, dict[str, Any] | DataError | None]]:
  """An ArrayRecord file, local or on a bucket (``gs://``), read in runs of records (see `read_array_record_lenient`).

  The ArrayRecord reader (``array_record`` 0.8) opens local paths only (no file object, no
  ``gs://``), so a file on a bucket is streamed once into a local temporary file (`storage.local_file`),
  read from there, and deleted when the reading ends. With the tokenize-once cache
  (``data/cache.py``) that happens at the first pass only: a restart reads the cache, not the file.
  A process cannot fetch only its records by byte range: the reader takes neither a file object nor
  a ``gs://`` path and tells no record's byte offsets (the index is in the file's compressed footer).
  """
  from array_record.python import array_record_module

  if not storage.isfile(path):
    raise DataError(path, None, "cannot open: no such file")
  with contextlib.ExitStack() as stack:
    try:
      local = stack.enter_context(storage.local_file(path))
    except OSError as e:
      raise DataError(path, None, f"cannot download: {e.strerror or e}") from None
    try:
      reader = array_record_module.ArrayRecordReader(local)
    except Exception as e:  # The C++ binding raises RuntimeError / ValueError.
      raise DataError(path, None, f"cannot read ArrayRecord: {_clean(e, local, path)}") from None
    if not reader.ok():  # e.g. not an ArrayRecord file: the reason comes out of close()
      try:
        reader.close()
        reason = "not an ArrayRecord file"
      except Exception as e:  # noqa: BLE001 - the binding's RuntimeError
        reason = _clean(e, local, path)
      raise DataError(path, None, f"cannot read ArrayRecord: {reason}")
    stack.callback(_close_quietly, reader)
    total = reader.num_records()
    window_start, window = 0, []  # the records read last: [window_start, window_start + len(window))
    for i in range(total):
      # ``wanted`` is asked record by record, as the record is yielded (the cache counts records by it).
      if wanted is not None and not wanted():
        yield i + 1, None
        continue
      if not window_start <= i < window_start + len(window):
        stop = min(i + _ARRAY_RECORD_CHUNK, total)
        try:
          window_start, window = i, reader.read(i, stop)
        except Exception as e:  # Corrupt chunk.
          raise DataError(path, i + 1, f"cannot read ArrayRecord: {_clean(e, local, path)}") from None
      yield i + 1, _parse_or_error(path, i + 1, window[i - window_start])


def _close_quietly(reader) -> None:
  """Closes a reader without masking the error that stopped the reading (if any)."""
  with contextlib.suppress(Exception):
    reader.close()


def _clean(error: Exception, local: str, path: str) -> str:
  """The reader's message on one line, naming the file as the user gave it (not the temporary copy)."""
  return " ".join(str(error).replace(local, path).split())
