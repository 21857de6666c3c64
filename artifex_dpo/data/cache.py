"""Tokenize once: a tokenized cache of the data in the workdir, split over processes, read on demand.

``load_or_tokenize`` returns the same pairs as ``PreferenceDataset.from_files`` (same order, same
counters, same ``file:line`` errors), but:

* the first pass writes ``<workdir>/data_cache/<key>/``; a restart, a resume or another job on the
  same workdir finds it and tokenizes nothing. The key covers the data files' identity (path,
  size, modification time or object generation), the tokenizer (its files' identity and special
  ids), the truncation settings, the format and ``skip_invalid``: a changed file changes the key;
* with P processes, records are dealt out in chunks of ``CHUNK`` (chunk c to process c mod P):
  each process parses (JSON Lines: only its own lines are JSON-decoded) and tokenizes only its
  chunks, batched through the tokenizer's ``encode_batch``, and writes its part
  (``part-<p>.tokens`` int32, streamed chunk by chunk so that no part is ever held whole in memory,
  ``part-<p>.offsets.npy``, then ``part-<p>.json`` last); process 0 then writes ``index.json``,
  the key's completion marker;
* every process then keeps only the per-pair table (offsets, lengths: 40 bytes a pair) in memory;
  token ranges are read on demand from the parts (`TokenStore`: ``pread`` of exactly the ranges
  locally, by byte range with a small block cache from a bucket);
* caches of earlier keys are deleted by `remove_stale_keys` (process 0, once the keys a run reads
  are complete; never a key without its completion marker, nor one completed after the newest of them).

Multi-host hazard: a bad record is found by one process only. It does not raise at once (the
others would wait for it forever at the barrier); it records the error in its part, every process
passes the barrier, and then all raise the earliest error in file order.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from artifex_dpo import storage
from artifex_dpo.data.errors import DataError
from artifex_dpo.data.formats import PairTexts, TruncationSettings, parse_record, tokenize_pairs, truncate_pair
from artifex_dpo.data.sources import (_open_binary, _parse_or_error, detect_format, expand_files,
                                      read_array_record_lenient, read_records_lenient)

CHUNK = 1024  # records per unit of work
_MAX_REPORTED = 10
_BLOCK = 1 << 16  # tokens per block read from a bucket (256 KiB)
_CACHED_BLOCKS = 64  # at most 16 MiB of blocks

log = logging.getLogger(__name__)


class TokenStore:
  """A read-only int32 token buffer made of part files, read on demand.

  Supports ``len``, ``store[a:b]`` and ``store[int_array]`` (what the batch builders use). Holds
  nothing but open file descriptors and (for a bucket) up to 16 MiB of recently read blocks.
  """

  def __init__(self, paths: Sequence[str], sizes: Sequence[int], fingerprint: str):
    self.paths = list(paths)
    self.sizes = np.asarray(sizes, np.int64)
    self.bases = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
    self.fingerprint = fingerprint
    self._fds: dict[int, int] = {}
    self._blocks: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
    self.dtype = np.dtype(np.int32)

  def __len__(self) -> int:
    return int(self.bases[-1])

  @property
  def nbytes(self) -> int:
    return 4 * len(self)

  def _fd(self, part: int) -> int:
    if part not in self._fds:
      self._fds[part] = os.open(self.paths[part], os.O_RDONLY)
    return self._fds[part]

  def _read_runs(self, part: int, local: np.ndarray) -> np.ndarray:
    """Local file: one ``pread`` per run of consecutive positions (a pair's prompt, a response).

    Not a memory map: with batches of shuffled pairs, the kernel's fault-around / read-ahead made
    the mapped (resident) part grow to the whole buffer within a few batches.
    """
    out = np.empty(local.shape, np.int32)
    if not len(local):
      return out
    breaks = np.flatnonzero(np.diff(local) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(local)]])
    fd = self._fd(part)
    for a, b in zip(starts, stops):
      raw = os.pread(fd, 4 * int(b - a), 4 * int(local[a]))
      out[a:b] = np.frombuffer(raw, np.int32)
    return out

  def __del__(self):
    for fd in getattr(self, "_fds", {}).values():
      try:
        os.close(fd)
      except OSError:
        pass

  def _block(self, part: int, block: int) -> np.ndarray:
    key = (part, block)
    if key in self._blocks:
      self._blocks.move_to_end(key)
      return self._blocks[key]
    start = block * _BLOCK
    stop = min(int(self.sizes[part]), start + _BLOCK)
    data = np.frombuffer(storage.read_range(self.paths[part], 4 * start, 4 * stop), np.int32)
    self._blocks[key] = data
    if len(self._blocks) > _CACHED_BLOCKS:
      self._blocks.popitem(last=False)
    return data

  def _gather(self, part: int, local: np.ndarray) -> np.ndarray:
    if not storage.is_remote(self.paths[part]):
      return self._read_runs(part, local)
    out = np.empty(local.shape, np.int32)
    blocks = local // _BLOCK
    for b in np.unique(blocks):
      sel = blocks == b
      out[sel] = self._block(part, int(b))[local[sel] - b * _BLOCK]
    return out

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, slice):
      start, stop, step = key.indices(len(self))
      if step != 1:
        raise ValueError("strided token reads are not supported")
      key = np.arange(start, stop, dtype=np.int64)
    index = np.asarray(key, np.int64)
    flat = index.reshape(-1)
    out = np.empty(flat.shape, np.int32)
    parts = np.searchsorted(self.bases, flat, side="right") - 1
    for part in np.unique(parts):
      sel = parts == part
      out[sel] = self._gather(int(part), flat[sel] - self.bases[part])
    return out.reshape(index.shape)


def _tokenizer_identity(tokenizer) -> list[Any]:
  name = str(getattr(tokenizer, "name", type(tokenizer).__name__))
  ident: list[Any] = [type(tokenizer).__name__, name, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id,
                      tokenizer.pad_id]
  if name != "byte" and storage.isfile(name):
    ident.append(list(storage.identity(name)))
  return ident


def cache_key(paths: Sequence[str], tokenizer, settings: TruncationSettings, format: str | None,
              skip_invalid: bool, id_limit: int | None = None) -> str:
  """The cache's name: a digest of everything the tokenized pairs depend on."""
  ident = {
      "files": [list(storage.identity(p)) for p in paths],
      "tokenizer": _tokenizer_identity(tokenizer),
      "truncation": [settings.max_length, settings.max_prompt_length, settings.truncation_mode],
      "format": format,
      "skip_invalid": bool(skip_invalid),
      "id_limit": id_limit,
      "version": 2,
  }
  return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def barrier(name: str, process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _agreed(key: str, process_count: int) -> str:
  """Process 0's key on every process (hosts with their own copies of local files see other mtimes)."""
  if process_count == 1:
    return key
  from jax.experimental import multihost_utils

  raw = np.frombuffer(key.encode("ascii"), np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw), np.uint8)).decode("ascii")


def _lenient_records(path: str, format: str | None, wanted):
  """``read_records_lenient(path, format)``, but a record for which ``wanted()`` is False comes as None, unparsed.

  ``wanted`` is called once per record, in order. JSON Lines (and ``.json`` holding JSON Lines) are
  split into lines here and only the wanted ones are parsed: with P processes each parses ~1/P of
  the records instead of all of them. Line numbers, blank-line skipping, the byte order mark, the
  per-record errors and the empty-file error are `sources._read_jsonl`'s. ArrayRecord files are read
  (decompressed and parsed) only at the wanted records (`sources.read_array_record_lenient`; from a
  bucket the file is still copied whole first). Other formats are read (and parsed) whole by
  `read_records_lenient`.
  """
  fmt = detect_format(path, format)
  if fmt == "json":
    with _open_binary(path) as f:
      head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
      fmt = "jsonl"
  if fmt == "array_record":  # reads (decompresses, parses) only the wanted records
    yield from read_array_record_lenient(path, wanted)
    return
  if fmt != "jsonl":
    for line, record in read_records_lenient(path, format):
      yield line, (record if wanted() else None)
    return
  count = 0
  with _open_binary(path) as f:
    for line_no, raw in enumerate(f, start=1):
      if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark.
      if not raw or raw.isspace():  # (== ``not raw.strip()``, without copying the line)
        continue
      count += 1
      yield line_no, (_parse_or_error(path, line_no, raw) if wanted() else None)
  if count == 0:
    raise DataError(path, None, "empty file (no records)")


class _PartWriter:
  """Streams a part's tokens into ``<name>.tokens`` as they are made (the part never sits whole in memory).

  Locally into a temporary file renamed over the target at the end (a reader of a complete copy
  written by a concurrent job with the same key never sees a half-written file); on a bucket one
  streamed upload (the object appears only when complete). Either way, ``<name>.json``, written after
  it, is what says that the part is complete.
  """

  def __init__(self, path: str):
    self.path = path
    self.tmp = path if storage.is_remote(path) else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    self.file = storage.open(self.tmp, "wb")

  def write(self, tokens: np.ndarray) -> None:
    self.file.write(memoryview(np.ascontiguousarray(tokens, np.int32)).cast("B"))

  def commit(self) -> None:
    self.file.close()
    if self.tmp != self.path:
      os.replace(self.tmp, self.path)

  def abort(self) -> None:
    discard = getattr(self.file, "discard", None)  # gcsfs: cancel the upload instead of committing it
    try:
      if discard is not None:
        discard()
      else:
        self.file.close()
    except Exception:  # noqa: BLE001 - already failing
      pass
    if self.tmp != self.path:
      with contextlib.suppress(OSError):
        os.remove(self.tmp)


def _tokenize_part(paths, tokenizer, settings, format, skip_invalid, process_index, process_count,
                   id_limit=None, sink: _PartWriter | None = None) -> dict:
  """Parses and tokenizes this process's chunks; returns the offsets and the part's meta.

  The tokens go to ``sink`` chunk by chunk (and are also returned, concatenated, when it is None).
  """
  held: list[np.ndarray] = []
  offsets: list[np.ndarray] = []
  chunk_pairs: dict[int, int] = {}
  skipped: list[tuple[int, str]] = []
  counts = {"invalid": 0, "dropped": 0, "identical": 0, "prompts": 0, "responses": 0}
  pending: list[tuple[int, PairTexts | Any]] = []
  # One content hash per chunk (its pairs' token ids and boundaries): the data's fingerprint is made
  # of them, so it does not depend on paths, on where the cache lies or on how many processes wrote it.
  chunk_hashes: dict[int, Any] = {}
  pos = 0
  error = None

  def flush():
    nonlocal pos
    texts = [p for _, p in pending if isinstance(p, PairTexts)]
    tokenized = iter(tokenize_pairs(texts, tokenizer))
    pieces: list[np.ndarray] = []
    rows: list[tuple[int, int, int, int]] = []
    for k, parsed in pending:
      pair = next(tokenized) if isinstance(parsed, PairTexts) else parsed
      cut, _ = truncate_pair(pair, settings, tokenizer.bos_id)
      if cut is None:
        counts["dropped"] += 1
        continue
      p, c, r = (np.asarray(x, np.int32) for x in (cut.prompt_ids, cut.chosen_ids, cut.rejected_ids))
      if len(c) == len(r) and np.array_equal(c, r):  # as PreferenceDataset.from_files
        counts["identical"] += 1
        continue
      counts["prompts"] += len(p) < len(pair.prompt_ids)
      counts["responses"] += (len(c) < len(pair.chosen_ids)) + (len(r) < len(pair.rejected_ids))
      digest = chunk_hashes.get(k // CHUNK)
      if digest is None:
        digest = chunk_hashes[k // CHUNK] = hashlib.sha256()
      a, b, e = pos + len(p), pos + len(p) + len(c), pos + len(p) + len(c) + len(r)
      for ids in (p, c, r):
        digest.update(np.int64(len(ids)).tobytes())
        digest.update(ids.tobytes())
      pieces += (p, c, r)
      rows.append((pos, a, b, e))
      pos = e
      chunk_pairs[k // CHUNK] += 1
    pending.clear()
    if rows:
      offsets.append(np.asarray(rows, np.int64))
      tokens = np.concatenate(pieces)
      if sink is None:
        held.append(tokens)
      else:
        sink.write(tokens)

  # Multi-host: every process reads every line (to count records), but parses and tokenizes only its own.
  k = -1

  def wanted() -> bool:
    nonlocal k
    k += 1
    return (k // CHUNK) % process_count == process_index

  for path in paths:
    for line, record in _lenient_records(path, format, wanted):
      if record is None:
        continue  # another process's chunk
      chunk_pairs.setdefault(k // CHUNK, 0)
      try:
        if isinstance(record, DataError):
          raise record
        pending.append((k, parse_record(record, tokenizer, path, line, id_limit)))
      except DataError as e:
        if not skip_invalid:
          error = (k, str(e))
          break
        counts["invalid"] += 1
        if len(skipped) < _MAX_REPORTED:
          skipped.append((k, str(e)))
      if len(pending) >= CHUNK:
        flush()
    if error:
      break
  flush()
  meta = {"chunks": sorted(chunk_pairs), "pairs_per_chunk": [chunk_pairs[c] for c in sorted(chunk_pairs)],
          "num_tokens": int(pos), "invalid": counts["invalid"], "dropped": counts["dropped"],
          "identical": counts["identical"], "prompts": counts["prompts"], "responses": counts["responses"],
          "skipped": skipped, "error": error, "process_count": process_count,
          "chunk_sha256": [chunk_hashes.get(c, hashlib.sha256()).hexdigest() for c in sorted(chunk_pairs)]}
  out = {"offsets": np.concatenate(offsets) if offsets else np.zeros((0, 4), np.int64), "meta": meta}
  if sink is None:
    out["tokens"] = np.concatenate(held) if held else np.zeros((0,), np.int32)
  return out


def load_or_tokenize(files: str | Sequence[str], tokenizer, cache_dir: str, *, format: str | None = None,
                     max_length: int | None = None, max_prompt_length: int | None = None,
                     truncation_mode: str = "keep_end", skip_invalid: bool = False, id_limit: int | None = None,
                     process_index: int = 0, process_count: int = 1):
  """The dataset of ``files`` from the tokenized cache, tokenizing (split over processes) if absent.

  Every process must call it (there are barriers when ``process_count > 1``).

  Returns:
    A `PreferenceDataset` whose tokens are a `TokenStore` over the cache's parts.

  Raises:
    DataError: as ``PreferenceDataset.from_files`` (the earliest bad record in file order).
  """
  from artifex_dpo.data.dataset import PreferenceDataset

  settings = TruncationSettings(max_length, max_prompt_length, truncation_mode)
  paths = expand_files(files)
  key = _agreed(cache_key(paths, tokenizer, settings, format, skip_invalid, id_limit), process_count)
  folder = storage.join(cache_dir, key)
  index_path = storage.join(folder, "index.json")
  # Multi-host hazard: each process checks for the index on its own. Within one job they agree (the index
  # is written before the last barrier); a concurrent job completing this key between two processes'
  # checks would split them (some at the barriers, some not): the workdir lease rules that job out.
  if storage.isfile(index_path):
    log.info("tokenized data: using the cache %s", folder)
  else:
    name = storage.join(folder, f"part-{process_index:05d}-of-{process_count:05d}")
    storage.makedirs(folder)
    sink = _PartWriter(f"{name}.tokens")
    try:
      part = _tokenize_part(paths, tokenizer, settings, format, skip_invalid, process_index, process_count,
                            id_limit, sink)
      sink.commit()
    except BaseException:
      sink.abort()
      raise
    buf = io.BytesIO()
    np.save(buf, part["offsets"], allow_pickle=False)
    storage.write_bytes(f"{name}.offsets.npy", buf.getvalue())
    storage.write_text(f"{name}.json", json.dumps(part["meta"]))  # last: the part is complete
    log.info("tokenized data: process %d of %d tokenized %d records into %s", process_index, process_count,
             sum(part["meta"]["pairs_per_chunk"]) + part["meta"]["invalid"] + part["meta"]["dropped"]
             + part["meta"]["identical"], name)
    del part
    barrier("artifex_data_cache_parts", process_count)
    metas = [json.loads(storage.read_text(storage.join(folder, f"part-{p:05d}-of-{process_count:05d}.json")))
             for p in range(process_count)]
    errors = sorted(tuple(m["error"]) for m in metas if m["error"])
    if errors:
      raise _error_from_message(errors[0][1])
    if process_index == 0:  # the key's completion marker (`remove_stale_keys` compares completed_at)
      storage.write_text(index_path, json.dumps({"parts": [f"part-{p:05d}-of-{process_count:05d}"
                                                           for p in range(process_count)],
                                                 "completed_at": time.time()}))
    barrier("artifex_data_cache_index", process_count)
  dataset = _load(folder, key, paths, tokenizer.pad_id, PreferenceDataset)
  dataset.cache_key = key
  return dataset


_KEY_RE = re.compile(r"[0-9a-f]{20}")
_TMP_AGE_S = 3600.0


def _completed_at(folder: str) -> float | None:
  """When a key was completed (its index.json's ``completed_at``, else the file's time); None if incomplete."""
  index_path = storage.join(folder, "index.json")
  try:
    index = json.loads(storage.read_text(index_path))
  except (FileNotFoundError, ValueError):
    return None
  if isinstance(index.get("completed_at"), (int, float)):
    return float(index["completed_at"])
  return _mtime(index_path)  # a cache from before completed_at


def _mtime(path: str) -> float:
  if not storage.is_remote(path):
    return os.stat(path).st_mtime
  fs, p = storage.filesystem(path)
  updated = fs.info(p).get("updated")
  try:
    return datetime.datetime.fromisoformat(str(updated)).timestamp()
  except ValueError:
    return 0.0


def remove_stale_keys(cache_dir: str, keep: Sequence[str], *, process_index: int = 0) -> list[str]:
  """Deletes the tokenized caches of earlier keys in ``cache_dir``; call it once the keys in ``keep`` are loaded.

  The rule (safe with many processes and with another job writing into the same folder):

  * only process 0 deletes (the others return at once): no two processes race over the same files;
  * ``keep`` (the keys this job reads, all complete: `load_or_tokenize` returned them) is never
    touched, and nothing is deleted if one of them is not complete;
  * a key without its completion marker (``index.json``) is never deleted: it may be being written
    right now by another job pointed at the same workdir (or was cut short, and the next run with
    that key completes it); remove such folders by hand once no job can be writing them;
  * a complete key is deleted only if it was completed before the newest key in ``keep`` (this
    run's data as of now): a key completed later belongs to a job that tokenized after this one
    (newer data, maybe still being read), and stays;
  * the deletion removes ``index.json`` first, so a deletion cut short leaves an incomplete key
    that nobody reads (it is never mistaken for a complete one).

  Two jobs sharing a workdir: the service holds the workdir lease (``lease.json``) for the whole
  run, so no other run reads a complete key while this runs; a library user who runs concurrent
  jobs on different data with one cache folder must not call this (or give each its own folder).
  Locally, temporary files of a kept key older than an hour (a part writer killed mid-write; a live
  writer touches its file every chunk) are removed too.

  Returns:
    The deleted keys (process 0), [] elsewhere.
  """
  if process_index != 0:
    return []
  try:
    return _remove_stale_keys(cache_dir, set(keep))
  except Exception as e:  # noqa: BLE001 - best effort: see the multi-host hazard below
    log.warning("tokenized data: could not clean up %s: %s", cache_dir, e)
    return []


def _remove_stale_keys(cache_dir: str, keep: set[str]) -> list[str]:
  kept = [_completed_at(storage.join(cache_dir, k)) for k in keep]
  if not kept or any(t is None for t in kept):
    return []
  newest_kept = max(kept)
  removed = []
  for name in storage.listdir(cache_dir):
    if name in keep or not _KEY_RE.fullmatch(name):
      continue
    folder = storage.join(cache_dir, name)
    done = _completed_at(folder)
    if done is None or done >= newest_kept:
      continue
    # Multi-host hazard: only process 0 gets here, and the others do not wait for it, so a failure must
    # not stop it alone (the others would hang in the next collective): cleanup is best effort.
    try:
      storage.remove(storage.join(folder, "index.json"))
      storage.remove(folder, recursive=True)
    except Exception as e:  # noqa: BLE001 - OSError locally, gcsfs' HttpError etc. on a bucket
      log.warning("tokenized data: could not remove the stale cache %s: %s", folder, e)
      continue
    removed.append(name)
    log.info("tokenized data: removed the stale cache %s", folder)
  if not storage.is_remote(cache_dir):
    now = time.time()
    for k in keep:
      for name in storage.listdir(storage.join(cache_dir, k)):
        path = storage.join(cache_dir, k, name)
        if ".tmp-" in name and now - _mtime(path) > _TMP_AGE_S:
          with contextlib.suppress(OSError):
            os.remove(path)
  return removed


def _error_from_message(message: str) -> DataError:
  """A DataError carrying another process's one-line message (``file:line: ...``) as is."""
  return DataError(None, None, message)


def _load(folder: str, key: str, paths: list[str], pad_id: int, dataset_cls):
  index = json.loads(storage.read_text(storage.join(folder, "index.json")))
  names = index["parts"]
  metas = [json.loads(storage.read_text(storage.join(folder, f"{n}.json"))) for n in names]
  offsets = [np.load(io.BytesIO(storage.read_bytes(storage.join(folder, f"{n}.offsets.npy"))), allow_pickle=False)
             for n in names]
  store = TokenStore([storage.join(folder, f"{n}.tokens") for n in names], [m["num_tokens"] for m in metas], key)
  # Chunks in file order; each chunk's pairs sit contiguously in its part.
  pieces = []
  for p, m in enumerate(metas):
    start = 0
    for c, count in zip(m["chunks"], m["pairs_per_chunk"]):
      pieces.append((c, p, start, count))
      start += count
  pieces.sort()
  table = np.concatenate([offsets[p][s:s + n] + store.bases[p] for _, p, s, n in pieces]) if pieces else \
      np.zeros((0, 4), np.int64)
  invalid = sum(m["invalid"] for m in metas)
  dropped = sum(m["dropped"] for m in metas)
  identical = sum(m.get("identical", 0) for m in metas)
  if not len(table):
    raise DataError(",".join(paths), None, f"no usable preference pairs ({invalid} invalid, {dropped} dropped by "
                                           f"truncation, {identical} with identical chosen and rejected)")
  skipped = [msg for _, msg in sorted(tuple(s) for m in metas for s in m["skipped"])][:_MAX_REPORTED]
  for msg in skipped:
    log.warning("skipping invalid record: %s", msg)
  dataset = dataset_cls(store, table, pad_id, num_skipped_invalid=invalid, num_dropped_truncated=dropped,
                        skipped_messages=skipped)
  if all("chunk_sha256" in m for m in metas):  # the content's fingerprint (caches of older versions: the key's)
    by_chunk = sorted((c, h) for m in metas for c, h in zip(m["chunks"], m["chunk_sha256"]))
    dataset._fingerprint = hashlib.sha256(json.dumps(by_chunk).encode()).hexdigest()[:16]
  dataset.num_identical_pairs = identical
  dataset.num_truncated_prompts = sum(m.get("prompts", 0) for m in metas)
  dataset.num_truncated_responses = sum(m.get("responses", 0) for m in metas)
  return dataset
