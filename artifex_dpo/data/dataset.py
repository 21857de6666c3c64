"""The preference dataset: tokenized pairs in memory, and the first pass that builds it from files.

`PreferenceDataset.from_files` reads every record once, validates, tokenizes and truncates it,
and keeps the token ids in one flat int32 buffer with offsets (or, built by
`artifex_dpo.data.cache`, a token store read on demand). The global order, batches and the
loader over it live in `order`, `batches` and `loader`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from artifex_dpo.data.errors import DataError
from artifex_dpo.data.formats import (
    PairTexts,
    TokenizedPair,
    TruncationSettings,
    parse_record,
    tokenize_pairs,
    truncate_pair,
)
from artifex_dpo.data.sources import expand_files, read_records_lenient
from artifex_dpo.data.tokenizer import Tokenizer

_CHUNK = 1024
_SAVE_PAIRS = 4096  # pairs read and written at a time by `save`
_MAX_REPORTED = 10

log = logging.getLogger(__name__)


class PreferenceDataset:
  """Tokenized preference pairs in memory.

  Pair ``i`` is ``tokens[offsets[i, 0]:offsets[i, 1]]`` (prompt),
  ``tokens[offsets[i, 1]:offsets[i, 2]]`` (chosen response),
  ``tokens[offsets[i, 2]:offsets[i, 3]]`` (rejected response).

  Attributes:
    tokens: int32 [total] flat buffer.
    offsets: int64 [N, 4].
    lengths: int32 [N, 2]: full sequence lengths (prompt + response) of chosen, rejected.
    pad_id: Padding id of the tokenizer.
    num_skipped_invalid: Records skipped as invalid (``skip_invalid=True``).
    num_dropped_truncated: Pairs dropped because truncation emptied a response.
    skipped_messages: The first few skip messages (``file:line: ...``).
    num_identical_pairs: Pairs dropped because chosen and rejected were the same tokens (after
      truncation): they carry no preference.
    num_truncated_prompts: Kept pairs whose prompt ``data.max_prompt_length`` cut.
    num_truncated_responses: Responses (chosen and rejected each count) of kept pairs that
      ``data.max_length`` cut.
  """

  num_identical_pairs = 0
  num_truncated_prompts = 0
  num_truncated_responses = 0
  UNIT = "pairs"  # what one item is called in messages
  RESPONSES_PER_EXAMPLE = 2  # chosen and rejected (the truncation log's denominator)
  COUNTERS = ("num_skipped_invalid", "num_dropped_truncated", "num_identical_pairs", "num_truncated_prompts",
              "num_truncated_responses")

  def __init__(
      self,
      tokens: np.ndarray,
      offsets: np.ndarray,
      pad_id: int,
      num_skipped_invalid: int = 0,
      num_dropped_truncated: int = 0,
      skipped_messages: Sequence[str] = (),
  ):
    # A flat array, or a TokenStore (data/cache.py) that reads token ranges on demand.
    self.tokens = tokens if hasattr(tokens, "fingerprint") else np.asarray(tokens, dtype=np.int32)
    self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 4)
    self.pad_id = int(pad_id)
    self.num_skipped_invalid = num_skipped_invalid
    self.num_dropped_truncated = num_dropped_truncated
    self.skipped_messages = list(skipped_messages)
    o = self.offsets
    prompt = o[:, 1] - o[:, 0]
    self.prompt_lengths = prompt.astype(np.int32)
    self.lengths = np.stack([prompt + o[:, 2] - o[:, 1], prompt + o[:, 3] - o[:, 2]], axis=1).astype(
        np.int32
    )

  # ----------------------------------------------------------------- construction

  @classmethod
  def from_pairs(cls, pairs: Sequence[TokenizedPair], pad_id: int, **counters: Any) -> PreferenceDataset:
    """Builds a dataset from token pairs (kept in order).

    Args:
      pairs: The pairs.
      pad_id: Padding id.
      **counters: ``num_skipped_invalid``, ``num_dropped_truncated``, ``skipped_messages``.
    """
    parts, offsets, pos = [], np.zeros((len(pairs), 4), np.int64), 0
    for i, pair in enumerate(pairs):
      offsets[i, 0] = pos
      for j, ids in enumerate((pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)):
        parts.append(np.asarray(ids, dtype=np.int32))
        pos += len(ids)
        offsets[i, j + 1] = pos
    tokens = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return cls(tokens, offsets, pad_id, **counters)

  @classmethod
  def from_files(
      cls,
      files: str | Sequence[str],
      tokenizer: Tokenizer,
      *,
      format: str | None = None,
      max_length: int | None = None,
      max_prompt_length: int | None = None,
      truncation_mode: str = "keep_end",
      skip_invalid: bool = False,
      id_limit: int | None = None,
  ) -> PreferenceDataset:
    """First pass: reads, validates, tokenizes and truncates every record.

    Pairs whose chosen and rejected tokens are identical (after truncation) are dropped and
    counted; truncated prompts and responses are counted (see the class's attributes).

    Args:
      files: Globs (``data.train_files``: comma-separated string or list).
      tokenizer: The tokenizer.
      format: ``data.format`` override (None: from each file's extension).
      max_length: ``data.max_length``.
      max_prompt_length: ``data.max_prompt_length``.
      truncation_mode: ``data.truncation_mode``.
      skip_invalid: ``data.skip_invalid``: skip and count bad records instead of failing.
      id_limit: pre-tokenized ids must lie in ``[0, id_limit)`` (the model's vocabulary); None:
        the tokenizer's.

    Returns:
      The dataset, records in file order (files sorted).

    Raises:
      DataError: A bad record (unless skipped), a file-level problem, or no usable pair.
    """
    settings = TruncationSettings(max_length, max_prompt_length, truncation_mode)
    paths = expand_files(files)
    pairs: list[TokenizedPair] = []
    skipped: list[str] = []
    counts = {"invalid": 0, "dropped": 0, "identical": 0, "prompts": 0, "responses": 0}
    pending: list[tuple[str, int, PairTexts | TokenizedPair]] = []

    def flush():
      texts = [p for _, _, p in pending if isinstance(p, PairTexts)]
      tokenized = iter(tokenize_pairs(texts, tokenizer))
      for _, _, parsed in pending:
        pair = next(tokenized) if isinstance(parsed, PairTexts) else parsed
        cut, reason = truncate_pair(pair, settings, tokenizer.bos_id)
        if cut is None:
          counts["dropped"] += 1
        elif np.array_equal(cut.chosen_ids, cut.rejected_ids):
          counts["identical"] += 1
        else:
          counts["prompts"] += len(cut.prompt_ids) < len(pair.prompt_ids)
          counts["responses"] += (len(cut.chosen_ids) < len(pair.chosen_ids)) + (
              len(cut.rejected_ids) < len(pair.rejected_ids))
          pairs.append(cut)
      pending.clear()

    for path in paths:
      for line, record in read_records_lenient(path, format):
        try:
          if isinstance(record, DataError):
            raise record
          pending.append((path, line, parse_record(record, tokenizer, path, line, id_limit)))
        except DataError as e:
          if not skip_invalid:
            raise
          counts["invalid"] += 1
          if len(skipped) < _MAX_REPORTED:
            skipped.append(str(e))
            log.warning("skipping invalid record: %s", e)
        if len(pending) >= _CHUNK:
          flush()
    flush()
    if not pairs:
      raise DataError(
          ",".join(paths),
          None,
          f"no usable preference pairs ({counts['invalid']} invalid, "
          f"{counts['dropped']} dropped by truncation, {counts['identical']} with identical chosen and "
          "rejected)",
      )
    dataset = cls.from_pairs(
        pairs,
        tokenizer.pad_id,
        num_skipped_invalid=counts["invalid"],
        num_dropped_truncated=counts["dropped"],
        skipped_messages=skipped,
    )
    dataset.num_identical_pairs = counts["identical"]
    dataset.num_truncated_prompts = counts["prompts"]
    dataset.num_truncated_responses = counts["responses"]
    return dataset

  # ----------------------------------------------------------------- access

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, i: int) -> TokenizedPair:
    o = self.offsets[i]
    t = self.tokens
    return TokenizedPair(t[o[0] : o[1]], t[o[1] : o[2]], t[o[2] : o[3]])

  @property
  def scored_lengths(self) -> np.ndarray:
    """int64 [N, 2]: the scored (response) tokens of chosen, rejected, as `make_batch` masks them.

    A response's first token is scored unless the prompt is empty (position 0 has no context).
    """
    o = self.offsets
    empty_prompt = (o[:, 1] == o[:, 0]).astype(np.int64)
    return np.stack([o[:, 2] - o[:, 1], o[:, 3] - o[:, 2]], axis=1) - empty_prompt[:, None]

  @property
  def max_sequence_length(self) -> int:
    """The longest prompt + response of either side."""
    return int(self.lengths.max()) if len(self) else 0

  def subset(self, indices: Sequence[int] | np.ndarray) -> PreferenceDataset:
    """A new dataset holding the given pairs, in the given order (counters not copied)."""
    indices = np.asarray(indices, dtype=np.int64)
    if not isinstance(self.tokens, np.ndarray):  # on-demand tokens: share them, select the table rows
      sub = PreferenceDataset(self.tokens, self.offsets[indices], self.pad_id)
      sub._fingerprint = _digest(self.fingerprint(), indices)
      return sub
    o = self.offsets[indices]
    sizes = o[:, 3] - o[:, 0]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    gather = np.repeat(o[:, 0] - starts, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)
    new_offsets = o - o[:, :1] + starts[:, None]
    return PreferenceDataset(self.tokens[gather], new_offsets, self.pad_id)

  def fingerprint(self) -> str:
    """A hash of the tokens and their layout (to check that a resumed run sees the same data)."""
    if getattr(self, "_fingerprint", None):
      return self._fingerprint
    if not isinstance(self.tokens, np.ndarray):  # the cache key names the tokens; never read them all
      return _digest(self.tokens.fingerprint, self.offsets)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(self.offsets).tobytes())
    h.update(np.ascontiguousarray(self.tokens).tobytes())
    return h.hexdigest()[:16]

  def save(self, path: str) -> None:
    """Saves the dataset as an ``.npz`` file (tokens, offsets, counters, fingerprint), atomically.

    Only the pairs' own tokens are written, compacted in pair order, and read range by range: a
    dataset from the tokenize-once cache (tokens read on demand, maybe from a bucket), or a subset
    of one, is never materialised whole in memory; the file is streamed. ``load`` gives back the
    same pairs, counters and `fingerprint`.

    Args:
      path: A local path or a ``gs://`` URI (written through a local temporary file, then renamed
        or uploaded: the target is complete or absent, never half-written).
    """
    import zipfile

    from artifex_dpo import storage

    o = self.offsets
    sizes = o[:, 3] - o[:, 0]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    counters = np.asarray([self.pad_id] + [int(getattr(self, name)) for name in self.COUNTERS], np.int64)
    arrays = {
        "offsets": o - o[:, :1] + starts[:, None],
        "meta": counters,
        "fingerprint": np.asarray(self.fingerprint()),
        "skipped_messages": np.asarray(self.skipped_messages, dtype=str),
    }
    with storage.staged_write(path, suffix=".npz") as tmp:
      with zipfile.ZipFile(tmp, "w", allowZip64=True) as z:
        for name, array in arrays.items():
          with z.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, array, allow_pickle=False)
        with z.open("tokens.npy", "w", force_zip64=True) as f:
          total = int(sizes.sum())
          np.lib.format.write_array_header_2_0(
              f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False,
                  "shape": (total,)})
          for a in range(0, len(o), _SAVE_PAIRS):  # a block of pairs at a time
            block_sizes = sizes[a:a + _SAVE_PAIRS]
            count = int(block_sizes.sum())
            block_starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]]).astype(np.int64)
            gather = np.repeat(o[a:a + _SAVE_PAIRS, 0] - block_starts, block_sizes) + np.arange(count, dtype=np.int64)
            f.write(np.ascontiguousarray(self.tokens[gather], np.int32).tobytes())

  @classmethod
  def load(cls, path: str) -> PreferenceDataset:
    """Loads a dataset written by `save` (no pickle), from a local path or a ``gs://`` URI.

    Raises:
      DataError: Not a dataset file (names the file).
    """
    import zipfile

    from artifex_dpo import storage

    try:
      with storage.local_file(path) as local, np.load(local, allow_pickle=False) as z:
        meta = [int(x) for x in z["meta"]]
        dataset = cls(z["tokens"], z["offsets"], meta[0], meta[1], meta[2],
                      skipped_messages=[str(m) for m in z["skipped_messages"]] if "skipped_messages" in z else ())
        for name, value in zip(cls.COUNTERS[2:], meta[3:]):
          setattr(dataset, name, value)
        if "fingerprint" in z:
          dataset._fingerprint = str(z["fingerprint"].reshape(-1)[0])
    except FileNotFoundError:
      raise DataError(path, None, "cannot open: no such file") from None
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as e:
      raise DataError(path, None, f"not a saved preference dataset: {' '.join(str(e).split())}") from None
    return dataset


def _digest(base: str, array: np.ndarray) -> str:
  h = hashlib.sha256(base.encode())
  h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()[:16]
