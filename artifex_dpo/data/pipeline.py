"""Preference dataset (first pass, in memory) and the Grain loader of global batches.

`PreferenceDataset` reads every record once, validates, tokenizes and truncates it, and keeps
the token ids in one flat int32 buffer with offsets. `PreferenceLoader` then turns global
step numbers into per-process batches with a Grain ``MapDataset`` (prefetched in threads):

* the global order of examples is a permutation that depends only on (seed, epoch);
* global step ``s`` covers positions ``s*B .. s*B+B-1`` of the endless sequence of epochs
  (a batch may straddle two epochs); each of P processes loads the contiguous slice
  ``[p*B/P, (p+1)*B/P)`` of it, so the union is the global batch for any P;
* sequences are right-padded to one length per global batch (both sides): ``max_length``,
  or, with ``pad_multiple``, the longest sequence of the global batch rounded up to a
  multiple of it (capped at ``max_length``), so every process builds the same shape.

The loader's position is just the step number (what the checkpoint saves), so a run may
resume on any number of processes.

Batch layout (numpy, ``b`` = local pairs, ``T`` = padded length) for ``s`` in chosen,
rejected: ``{s}_tokens`` int32 [b, T] (pad id after the sequence), ``{s}_segment_ids`` int32
[b, T] (1 real token, 0 padding), ``{s}_response_mask`` int32 [b, T] (1 where the token is a
response token, i.e. scored as predicted from the token before it; position 0 never is);
``pair_mask`` int32 [b] (0 for the filler rows of a last, partial eval batch),
``pair_indices`` int64 [b] (dataset index of each row's pair, -1 for filler). Python ints
``num_tokens`` (this batch's non-padding tokens, chosen + rejected) and
``global_num_tokens`` (the same for the whole global batch) ride along.

With ``packing`` (see `artifex_dpo.data.packing`), whole pairs are packed into rows of
``row_length`` tokens by a plan made once from the token lengths; the loader then orders,
shuffles and slices ROWS exactly as above (``global_batch_size`` counts rows) and yields the
packed layout (``tokens``, ``segment_ids``, ``response_mask`` [r, L], ``pair_mask`` [r, K],
``num_tokens``, ``num_pairs``) plus ``global_num_tokens`` and ``global_num_pairs``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from artifex_dpo.data.errors import DataError
from artifex_dpo.data.packing import (PackingPlan, default_max_pairs_per_row, ffd_row_counts, make_packed_batch,
                                     packed_lengths, plan_packing, round_up, row_budget_bound)
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

SIDES = ("chosen", "rejected")
BATCH_ARRAY_KEYS = tuple(
    f"{s}_{k}" for s in SIDES for k in ("tokens", "segment_ids", "response_mask")
) + ("pair_mask",)
_CHUNK = 1024
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
    """Saves the dataset (tokens, offsets, counters) as an ``.npz`` cache."""
    with open(path, "wb") as f:
      np.savez(
          f,
          tokens=self.tokens,
          offsets=self.offsets,
          meta=np.asarray([self.pad_id, self.num_skipped_invalid, self.num_dropped_truncated]),
      )

  @classmethod
  def load(cls, path: str) -> PreferenceDataset:
    """Loads a dataset written by `save` (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
      pad_id, skipped, dropped = (int(x) for x in z["meta"])
      return cls(z["tokens"], z["offsets"], pad_id, skipped, dropped)


def _digest(base: str, array: np.ndarray) -> str:
  h = hashlib.sha256(base.encode())
  h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()[:16]


def eval_split(
    dataset: PreferenceDataset, fraction: float, seed: int = 0
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
  """Holds out a fraction of the pairs for evaluation (``data.eval_split``).

  The held-out pairs are the first ``round(fraction * N)`` (at least 1) of a permutation
  seeded by ``seed``; both parts keep the original order.

  Args:
    dataset: The full dataset.
    fraction: In [0, 1); 0 holds out nothing.
    seed: Seed of the permutation.

  Returns:
    (train dataset, eval dataset or None).

  Raises:
    DataError: A bad fraction, or nothing would be left to train on.
  """
  if not 0.0 <= fraction < 1.0:
    raise DataError("data.eval_split", None, f"must be in [0, 1), got {fraction}")
  if fraction == 0.0:
    return dataset, None
  n = len(dataset)
  n_eval = max(1, int(round(fraction * n)))
  if n_eval >= n:
    raise DataError("data.eval_split", None, f"holding out {n_eval} of {n} pairs leaves none to train on")
  perm = np.random.default_rng(np.random.SeedSequence([abs(int(seed)), 0x5EED])).permutation(n)
  held = np.zeros(n, bool)
  held[perm[:n_eval]] = True
  train, evaluation = dataset.subset(np.flatnonzero(~held)), dataset.subset(np.flatnonzero(held))
  for name in PreferenceDataset.COUNTERS:
    setattr(train, name, getattr(dataset, name))
  return train, evaluation


def _setting(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping) or hasattr(config, "get"):
    value = config.get(key, default)
  else:
    value = getattr(config, key, default)
  return default if value is None else value


def build_datasets(
    data_config: Any, tokenizer: Tokenizer
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
  """Train and eval datasets from the ``data.*`` settings.

  Reads ``train_files``, ``eval_files``, ``format``, ``max_length``, ``max_prompt_length``,
  ``truncation_mode``, ``skip_invalid``, ``eval_split`` and ``seed`` from ``data_config``
  (a ConfigDict, dict or any object with those attributes; missing ones take defaults).
  Without ``eval_files``, ``eval_split`` (default 0) of the train pairs is held out.

  Returns:
    (train dataset, eval dataset or None).
  """
  kwargs = dict(
      tokenizer=tokenizer,
      format=_setting(data_config, "format") or None,
      max_length=_setting(data_config, "max_length"),
      max_prompt_length=_setting(data_config, "max_prompt_length"),
      truncation_mode=_setting(data_config, "truncation_mode", "keep_end"),
      skip_invalid=bool(_setting(data_config, "skip_invalid", False)),
  )
  train_files = _setting(data_config, "train_files")
  if not train_files:
    raise DataError("data.train_files", None, "not set")
  train = PreferenceDataset.from_files(train_files, **kwargs)
  eval_files = _setting(data_config, "eval_files")
  if eval_files:
    return train, PreferenceDataset.from_files(eval_files, **kwargs)
  return eval_split(train, float(_setting(data_config, "eval_split", 0.0)), int(_setting(data_config, "seed", 0)))


# --------------------------------------------------------------------------- global order


@functools.lru_cache(maxsize=3)
def _order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  dtype = np.int32 if num_examples < 2**31 else np.int64
  if not shuffle:
    order = np.arange(num_examples, dtype=dtype)
  else:
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)]
    order = np.random.default_rng(np.random.SeedSequence(entropy)).permutation(num_examples).astype(dtype)
  order.flags.writeable = False
  return order


def global_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order of the examples in one epoch: a function of (num_examples, seed, epoch) only.

  Returns:
    A read-only permutation of ``range(num_examples)`` (identity when not shuffling).
  """
  return _order(int(num_examples), int(seed), int(epoch), bool(shuffle))


def global_batch_indices(
    step: int, global_batch_size: int, num_examples: int, seed: int, shuffle: bool = True
) -> np.ndarray:
  """The dataset indices of global step ``step`` (0-based; epochs follow each other).

  Position ``k = step * global_batch_size + j`` is example ``global_order(epoch=k // N)[k % N]``.
  """
  if num_examples <= 0:
    raise DataError(None, None, "empty dataset")
  positions = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
  epochs, within = np.divmod(positions, num_examples)
  out = np.empty(global_batch_size, np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = global_order(num_examples, seed, int(epoch), shuffle)[within[sel]]
  return out


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The contiguous rows of a global batch that process ``process_index`` loads."""
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
  if global_batch_size % process_count:
    raise DataError(
        "train.global_batch_size",
        None,
        f"{global_batch_size} is not divisible by the number of processes {process_count}",
    )
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def batch_indices(
    step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    *,
    num_examples: int,
    seed: int,
    shuffle: bool = True,
) -> np.ndarray:
  """The dataset indices this process loads for global step ``step``."""
  g = global_batch_indices(step, global_batch_size, num_examples, seed, shuffle)
  return g[process_slice(global_batch_size, process_index, process_count)]


# --------------------------------------------------------------------------- batches


def pad_length(longest: int, max_length: int | None, pad_multiple: int | None) -> int:
  """The padded length for a global batch whose longest sequence is ``longest``.

  Fixed (``pad_multiple`` falsy): ``max_length``. Bucketed: ``longest`` rounded up to a
  multiple of ``pad_multiple``, capped at ``max_length`` (when set).
  """
  if not pad_multiple:
    if max_length is None:
      raise ValueError("fixed padding needs max_length")
    return int(max_length)
  length = max(1, math.ceil(longest / pad_multiple)) * pad_multiple
  return int(min(length, max_length)) if max_length is not None else int(length)


def make_batch(
    dataset: PreferenceDataset,
    indices: Sequence[int] | np.ndarray,
    length: int,
    pair_mask: np.ndarray | None = None,
) -> dict[str, Any]:
  """Builds the padded numpy batch of the given pairs (layout: see the module docstring).

  Args:
    dataset: The dataset.
    indices: Dataset indices of the rows.
    length: Padded length T (must hold every row).
    pair_mask: int32 [b]; rows with 0 are left empty (all padding). None: all ones.

  Returns:
    The batch dict.
  """
  indices = np.asarray(indices, dtype=np.int64)
  b = len(indices)
  mask = np.ones(b, np.int32) if pair_mask is None else np.asarray(pair_mask, np.int32)
  batch: dict[str, Any] = {"pair_mask": mask, "pair_indices": np.where(mask == 1, indices, -1)}
  num_tokens = 0
  toks, offs = dataset.tokens, dataset.offsets
  for j, side in enumerate(SIDES):
    tokens = np.full((b, length), dataset.pad_id, np.int32)
    segments = np.zeros((b, length), np.int32)
    response = np.zeros((b, length), np.int32)
    for row, i in enumerate(indices):
      if not mask[row]:
        continue
      o = offs[i]
      prompt = toks[o[0] : o[1]]
      resp = toks[o[1 + j] : o[2 + j]]
      n_p, n = len(prompt), len(prompt) + len(resp)
      if n > length:
        raise ValueError(f"pair {i} ({side}) has {n} tokens, more than the padded length {length}")
      tokens[row, :n_p] = prompt
      tokens[row, n_p:n] = resp
      segments[row, :n] = 1
      response[row, max(n_p, 1) : n] = 1
      num_tokens += n
    batch[f"{side}_tokens"] = tokens
    batch[f"{side}_segment_ids"] = segments
    batch[f"{side}_response_mask"] = response
  batch["num_tokens"] = int(num_tokens)
  return batch


class PreferenceLoader:
  """Iterator of ``(step, local_batch)`` from ``start_step`` on, prefetched by Grain.

  Args:
    dataset: The dataset.
    global_batch_size: Pairs per global step (``train.global_batch_size``).
    seed: ``data.seed``.
    shuffle: ``data.shuffle``.
    process_index: This process (``jax.process_index()``).
    process_count: Number of processes (``jax.process_count()``).
    pad_multiple: Bucketed padding to multiples of this; None/0: pad to ``max_length``.
    max_length: Padded length cap (``data.max_length``); None: the dataset's longest.
    start_step: The first step to yield (the checkpoint's step when resuming).
    num_steps: Stop before this step; None: endless.
    num_threads: Grain threads preparing batches.
    prefetch: Batches prepared ahead.
    packing: Pack whole pairs into rows (``global_batch_size`` then counts rows per step;
      ``pad_multiple`` is ignored).
    row_length: Tokens per packed row; None: ``2 * max_length``.
    max_pairs_per_row: Cap on pairs per packed row; None: ``row_length // 32`` (at least 1).
    plan: A ready packing plan of ``dataset`` (None: made here from the lengths).
    pack_batches: Lay each global batch's pairs out padding-free (the same pairs per step as
      without it).
    row_multiple: Packed rows per step are a multiple of this times the process count.
    row_budget: Packed rows of every step with ``pack_batches`` (one shape, one compile). None: the
      most rows any step ``0 .. num_steps - 1`` needs (rounded up to the row multiple), or without
      ``num_steps`` the config's bound `row_budget_bound`, which holds any batch.
    share_prompt: Packed rows run each pair's prompt once (see `artifex_dpo.data.packing`).
      ``global_num_tokens`` still counts both sequences of every pair in full (what a trainer
      without prompt sharing processes); ``global_computed_tokens`` counts what the model runs.
  """

  def __init__(
      self,
      dataset: PreferenceDataset,
      global_batch_size: int,
      seed: int = 0,
      shuffle: bool = True,
      process_index: int = 0,
      process_count: int = 1,
      pad_multiple: int | None = None,
      max_length: int | None = None,
      start_step: int = 0,
      num_steps: int | None = None,
      num_threads: int = 2,
      prefetch: int = 4,
      packing: bool = False,
      row_length: int | None = None,
      max_pairs_per_row: int | None = None,
      plan: PackingPlan | None = None,
      pack_batches: bool = False,
      row_multiple: int = 1,
      share_prompt: bool = False,
      row_budget: int | None = None,
  ):
    if len(dataset) == 0:
      raise DataError(None, None, "empty dataset")
    if global_batch_size <= 0:
      raise DataError("train.global_batch_size", None, f"must be positive, got {global_batch_size}")
    self.dataset = dataset
    self.global_batch_size = int(global_batch_size)
    self.seed, self.shuffle = int(seed), bool(shuffle)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self._slice = process_slice(self.global_batch_size, self.process_index, self.process_count)
    self.pad_multiple = int(pad_multiple) if pad_multiple else None
    longest = dataset.max_sequence_length
    self.max_length = int(max_length) if max_length is not None else longest
    if longest > self.max_length:
      raise DataError(
          "data.max_length", None, f"{self.max_length} is shorter than the dataset's longest pair ({longest})"
      )
    self.packing = bool(packing)
    self.share_prompt = bool(share_prompt)
    self.plan = None
    if self.packing:
      self.plan = _packing_plan(dataset, self.max_length, row_length, max_pairs_per_row, plan, self.share_prompt)
    # Per-batch packing: the same pairs per step as padded batches, laid out padding-free.
    self.pack_batches = bool(pack_batches) and not self.packing
    self._row_length = int(row_length) if row_length else 2 * self.max_length
    self._max_pairs_per_row = int(max_pairs_per_row) if max_pairs_per_row else default_max_pairs_per_row(
        self._row_length)
    self._row_multiple = max(1, int(row_multiple)) * self.process_count
    self.num_steps = num_steps
    self.row_budget = None
    if self.pack_batches:
      self.row_budget = round_up(row_budget, self._row_multiple) if row_budget else self._run_row_budget()
    self._num_threads, self._prefetch = int(num_threads), int(prefetch)
    self._position = int(start_step)
    self._iter = None

  @property
  def position(self) -> int:
    """The next step this loader yields (save it; pass it back as ``start_step``)."""
    return self._position

  @property
  def num_examples(self) -> int:
    """What the global order shuffles: pairs, or packed rows with packing."""
    return self.plan.num_rows if self.plan is not None else len(self.dataset)

  @property
  def steps_per_epoch(self) -> float:
    """Global steps per pass over the data."""
    return self.num_examples / self.global_batch_size

  def global_indices(self, step: int) -> np.ndarray:
    """Dataset indices (plan row ids with packing) of the whole global batch of ``step``."""
    return global_batch_indices(step, self.global_batch_size, self.num_examples, self.seed, self.shuffle)

  def batch_indices(self, step: int) -> np.ndarray:
    """Dataset indices (plan row ids with packing) this process loads for ``step``."""
    return self.global_indices(step)[self._slice]

  def load(self, step: int) -> dict[str, Any]:
    """Builds this process's batch of ``step`` (what the iterator yields, without prefetch)."""
    g = self.global_indices(step)
    if self.plan is not None:
      batch = make_packed_batch(self.dataset, self.plan, g[self._slice], share_prompt=self.share_prompt)
      pairs = np.concatenate([self.plan.row(i) for i in g])
      batch["global_num_tokens"] = int(self.dataset.lengths[pairs].sum())
      batch["global_computed_tokens"] = int(self.plan.row_tokens[g].sum())
      batch["global_num_pairs"] = len(pairs)
      return batch
    lengths = self.dataset.lengths[g]
    if self.pack_batches:
      return self._load_packed_batch(g)
    length = pad_length(int(lengths.max()), self.max_length, self.pad_multiple)
    batch = make_batch(self.dataset, g[self._slice], length)
    batch["global_num_tokens"] = int(lengths.sum())
    return batch

  def _run_row_budget(self) -> int:
    """The most packed rows a step of the run needs (steps ``0 .. num_steps - 1``), rounded up.

    Every process computes it from the per-pair lengths and the global order alone, so all agree;
    it does not depend on the start step, so a resumed run compiles the same shape.
    """
    if self.num_steps is None:
      return row_budget_bound(self.global_batch_size, self.max_length, self._row_length, self._max_pairs_per_row,
                              self._row_multiple)
    totals = packed_lengths(self.dataset.offsets, self.share_prompt).sum(axis=1)
    most = 1
    for start in range(0, int(self.num_steps), 1024):
      steps = range(start, min(start + 1024, int(self.num_steps)))
      indices = np.stack([self.global_indices(s) for s in steps])
      most = max(most, int(ffd_row_counts(totals[indices], self._row_length, self._max_pairs_per_row).max()))
    return round_up(most, self._row_multiple)

  def _load_packed_batch(self, g: np.ndarray) -> dict[str, Any]:
    """The global batch's pairs packed (FFD) into ``row_budget`` rows; this process's share of the rows.

    Every step has the same number of rows (the budget, a multiple of ``row_multiple`` x
    processes, so rows divide over devices and processes), filled up with empty rows; every
    process computes the same plan from the global batch.
    """
    local_plan = plan_packing(packed_lengths(self.dataset.offsets[g], self.share_prompt), self._row_length,
                              self._max_pairs_per_row)
    plan = dataclasses.replace(local_plan, pair_indices=g[local_plan.pair_indices])
    rows = self.row_budget
    if plan.num_rows > rows:
      raise DataError("train.global_batch_size", None, f"the {len(g)} pairs of a step need {plan.num_rows} packed "
                                                       f"rows, more than the row budget of {rows}")
    row_ids = np.where(np.arange(rows) < plan.num_rows, np.arange(rows), -1)
    per_process = rows // self.process_count
    mine = row_ids[self.process_index * per_process:(self.process_index + 1) * per_process]
    batch = make_packed_batch(self.dataset, plan, mine, self._row_length, self._max_pairs_per_row,
                              share_prompt=self.share_prompt)
    batch["global_num_tokens"] = int(self.dataset.lengths[g].sum())
    batch["global_computed_tokens"] = int(plan.row_tokens.sum())
    batch["global_num_pairs"] = len(g)
    return batch

  def _load_with_step(self, step: int) -> tuple[int, dict[str, Any]]:
    return int(step), self.load(int(step))

  def _grain_iter(self):
    import grain

    stop = self.num_steps if self.num_steps is not None else 2**62
    ds = grain.MapDataset.range(self._position, max(stop, self._position)).map(self._load_with_step)
    options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=self._prefetch)
    return iter(ds.to_iter_dataset(options))

  def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
    return self

  def __next__(self) -> tuple[int, dict[str, Any]]:
    if self._iter is None:
      self._iter = self._grain_iter()
    step, batch = next(self._iter)
    self._position = step + 1
    return step, batch

  def seek(self, step: int) -> None:
    """Moves the loader so that the next batch is the one of ``step``."""
    self._iter = None
    self._position = int(step)


def _packing_plan(
    dataset: PreferenceDataset,
    max_length: int,
    row_length: int | None,
    max_pairs_per_row: int | None,
    plan: PackingPlan | None,
    share_prompt: bool = False,
) -> PackingPlan:
  """The given plan (checked against the settings) or a new one from the dataset's lengths."""
  if plan is not None:
    if plan.num_pairs != len(dataset):
      raise ValueError(f"packing plan of {plan.num_pairs} pairs for a dataset of {len(dataset)}")
    if row_length is not None and int(row_length) != plan.row_length:
      raise ValueError(f"row_length={row_length} differs from the plan's {plan.row_length}")
    if max_pairs_per_row is not None and int(max_pairs_per_row) != plan.max_pairs_per_row:
      raise ValueError(f"max_pairs_per_row={max_pairs_per_row} differs from the plan's {plan.max_pairs_per_row}")
    return plan
  length = int(row_length) if row_length is not None else 2 * int(max_length)
  pairs = int(max_pairs_per_row) if max_pairs_per_row is not None else default_max_pairs_per_row(length)
  return plan_packing(packed_lengths(dataset.offsets, share_prompt), length, pairs)


def eval_batches(
    dataset: PreferenceDataset,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    pad_multiple: int | None = None,
    max_length: int | None = None,
    packing: bool = False,
    row_length: int | None = None,
    max_pairs_per_row: int | None = None,
    plan: PackingPlan | None = None,
    share_prompt: bool = False,
) -> Iterator[dict[str, Any]]:
  """Every pair once, in order, in global batches; this process's slice of each.

  The last global batch is filled up with empty rows whose ``pair_mask`` is 0, so every
  batch has the same number of rows. Padding follows the same policy as `PreferenceLoader`.
  With ``packing`` (arguments as for `PreferenceLoader`), the batches hold the plan's rows
  in plan order (``global_batch_size`` rows each), filled up with all-padding rows, and
  carry ``global_num_tokens`` and ``global_num_pairs``.
  """
  n = len(dataset)
  sl = process_slice(global_batch_size, process_index, process_count)
  cap = max_length if max_length is not None else dataset.max_sequence_length
  if packing:
    plan = _packing_plan(dataset, cap, row_length, max_pairs_per_row, plan, share_prompt)
    for start in range(0, plan.num_rows, global_batch_size):
      g = np.arange(start, start + global_batch_size, dtype=np.int64)
      g = np.where(g < plan.num_rows, g, -1)
      real = g[g >= 0]
      batch = make_packed_batch(dataset, plan, g[sl], share_prompt=share_prompt)
      batch["global_num_tokens"] = int(plan.row_tokens[real].sum())
      batch["global_num_pairs"] = int(plan.row_sizes[real].sum())
      yield batch
    return
  for start in range(0, n, global_batch_size):
    g = np.arange(start, start + global_batch_size, dtype=np.int64)
    real = (g < n).astype(np.int32)
    g = np.where(real == 1, g, 0)
    lengths = dataset.lengths[g[real == 1]]
    length = pad_length(int(lengths.max()), cap, pad_multiple)
    batch = make_batch(dataset, g[sl], length, pair_mask=real[sl])
    batch["global_num_tokens"] = int(lengths.sum())
    yield batch
