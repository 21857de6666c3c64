"""KTO data for the training service: the unpaired dataset, its loader and eval batches.

They mirror ``PreferenceDataset`` / ``PreferenceLoader`` / ``eval_batches`` for labelled single
completions. Multi-host: every process reads every record in the first pass, so each one builds
the whole global batch (KL rows rotated over the global batch, in the global order) and keeps its
own rows: the batch, and so the KL estimate, does not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from artifex_dpo.data.errors import DataError
from artifex_dpo.data.formats import TruncationSettings
from artifex_dpo.data.batches import pad_length
from artifex_dpo.data.order import global_batch_indices, process_slice
from artifex_dpo.data.packing import default_max_pairs_per_row
from artifex_dpo.data.tokenizer import Tokenizer
from artifex_dpo.data.unpaired import (UnpairedCounts, UnpairedExample, make_packed_unpaired_batch,
                                      make_planned_unpaired_batch, make_unpaired_batch, plan_unpaired_packing,
                                      read_unpaired_files, row_kl_partners)


class UnpairedDataset:
  """Labelled completions (``UnpairedExample``) with the counters of the first pass.

  The counters have the paired dataset's names (the service logs them under the same keys):
  ``num_skipped_invalid`` (records), ``num_dropped_truncated`` (examples whose completion
  truncation left empty), ``num_truncated_prompts`` (kept examples with a cut prompt) and
  ``num_truncated_responses`` (kept examples with a cut completion: one response per example,
  ``RESPONSES_PER_EXAMPLE``); ``num_identical_pairs`` stays 0 (a paired record whose chosen and
  rejected are the same gives two examples with opposite labels, as TRL's unpairing does).
  """

  RESPONSES_PER_EXAMPLE = 1  # a paired dataset scores 2 per pair (chosen and rejected)

  def __init__(self, examples: Sequence[UnpairedExample], pad_id: int, *, num_skipped_invalid: int = 0,
               num_dropped_truncated: int = 0, num_truncated_prompts: int = 0, num_truncated_responses: int = 0,
               skipped_messages: Sequence[str] = ()):
    self.examples = list(examples)
    self.pad_id = pad_id
    self.num_skipped_invalid = num_skipped_invalid
    self.num_dropped_truncated = num_dropped_truncated
    self.num_truncated_prompts = num_truncated_prompts
    self.num_truncated_responses = num_truncated_responses
    self.skipped_messages = list(skipped_messages)
    self.num_identical_pairs = 0
    self.lengths = np.asarray([len(e.prompt_ids) + len(e.completion_ids) for e in self.examples], np.int64)

  UNIT = "examples"  # what one item is called in messages
  COUNTERS = ("num_skipped_invalid", "num_dropped_truncated", "num_truncated_prompts", "num_truncated_responses",
              "skipped_messages")

  @classmethod
  def from_files(cls, files, tokenizer: Tokenizer, *, format: str | None = None, max_length: int | None = None,
                 max_prompt_length: int | None = None, truncation_mode: str = "keep_end", skip_invalid: bool = False,
                 id_limit: int | None = None) -> "UnpairedDataset":
    """First pass over KTO data: every record read, validated, tokenized, truncated and counted.

    Args:
      files: Globs (``data.train_files``).
      tokenizer: The tokenizer.
      format: ``data.format`` override (None: from each file's extension).
      max_length: ``data.max_length``.
      max_prompt_length: ``data.max_prompt_length``.
      truncation_mode: ``data.truncation_mode``.
      skip_invalid: ``data.skip_invalid``: skip and count bad records instead of failing.
      id_limit: Pre-tokenized ids must lie in ``[0, id_limit)`` (the model's vocabulary); None: the
        tokenizer's.

    Raises:
      DataError: A bad record (unless skipped), a file-level problem, or no usable example.
    """
    settings = TruncationSettings(max_length, max_prompt_length, truncation_mode)
    counts = UnpairedCounts()
    examples, dropped = read_unpaired_files(files, tokenizer, settings, format, skip_invalid=skip_invalid,
                                            id_limit=id_limit, counts=counts)
    return cls(examples, tokenizer.pad_id, num_skipped_invalid=counts.invalid, num_dropped_truncated=dropped,
               num_truncated_prompts=counts.truncated_prompts, num_truncated_responses=counts.truncated_completions,
               skipped_messages=counts.skipped_messages)

  def __len__(self) -> int:
    return len(self.examples)

  def subset(self, indices) -> "UnpairedDataset":
    return UnpairedDataset([self.examples[int(i)] for i in indices], self.pad_id)

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for e in self.examples:
      h.update(np.asarray(e.prompt_ids, np.int32).tobytes() + b"|" + np.asarray(e.completion_ids, np.int32).tobytes()
               + (b"+" if e.label else b"-"))
    return h.hexdigest()[:20]


@dataclasses.dataclass
class UnpairedReference:
  """Precomputed reference log-prob sums of KTO's rows (``dpo.precompute_ref_logps``).

  Attributes:
    completions: float32 ``[N]``: example i's completion after its prompt (the order plays no part).
    kl: The KL rows' sums, which depend on the batch order: training, float32 ``[S, B]`` (step s,
      position j of the global batch: prompt j after the completion of position j-1, the first
      taking the last, as :func:`train_kl_partners` says, for the steps ``0 .. S-1``); eval, float32
      ``[N]`` (example i's KL row in the eval batches, :func:`eval_kl_partners`). None without KL rows
      (``apo_zero_unpaired``).
  """

  completions: np.ndarray
  kl: np.ndarray | None = None


def train_kl_partners(step: int, global_batch_size: int, num_examples: int, seed: int,
                      shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
  """The examples of training step ``step`` and the example whose completion each one's KL row holds.

  Returns:
    ``(g, partners)``: int64 ``[B]`` dataset indices; ``partners[j] = g[j - 1]`` (TRL's rotation by
    one, over the global batch in the training order), as :func:`make_unpaired_batch` lays it out.
  """
  g = global_batch_indices(step, global_batch_size, num_examples, seed, shuffle)
  return g, np.roll(g, 1)


def eval_kl_partners(num_examples: int, global_batch_size: int) -> np.ndarray:
  """int64 ``[N]``: the example whose completion example i's KL row holds in :func:`unpaired_eval_batches`.

  Each eval batch rotates over its real examples; a last batch of one example pairs it with itself.
  """
  partners = np.empty(num_examples, np.int64)
  for start in range(0, num_examples, global_batch_size):
    g = np.arange(start, min(start + global_batch_size, num_examples), dtype=np.int64)
    partners[g] = np.roll(g, 1)
  return partners


def _planned_token_counts(dataset: UnpairedDataset, partners: np.ndarray, max_length: int | None,
                          share_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
  """Per example under ``data.packing``: tokens of its completion + KL row as the padded layout counts them
  (a shared prompt twice), and the tokens its slot takes in a packed row."""
  p = np.asarray([len(e.prompt_ids) for e in dataset.examples], np.int64)
  c = np.asarray([len(e.completion_ids) for e in dataset.examples], np.int64)
  kl = p + c[partners]
  if max_length is not None:
    kl = np.minimum(kl, max_length)
  padded = p + c + kl
  return padded, (padded - p + np.minimum(p, 1)) if share_prompt else padded


def _with_reference(local: dict[str, Any], completions: np.ndarray, kl: np.ndarray | None, sl: slice,
                    rows: int) -> None:
  """Adds the (filled-up) precomputed sums of the local rows: ``completion_ref_logps`` / ``kl_ref_logps``."""
  for key, values in (("completion_ref_logps", completions), ("kl_ref_logps", kl)):
    if values is not None:
      full = np.zeros(rows, np.float32)
      full[:len(values)] = values
      local[key] = full[sl]


def _local(dataset: UnpairedDataset, g: np.ndarray, sl: slice, *, with_kl: bool, pad_multiple, max_length,
           num_rows: int | None = None, min_examples: int = 2,
           reference: tuple[np.ndarray, np.ndarray | None] | None = None) -> dict[str, Any]:
  examples = [dataset.examples[int(i)] for i in g]
  batch = make_unpaired_batch(examples, pad_id=dataset.pad_id, with_kl=with_kl, pad_multiple=pad_multiple,
                              max_length=max_length, num_rows=num_rows, min_examples=min_examples)
  tokens = int(batch["completion_segment_ids"].sum() + (batch["kl_segment_ids"].sum() if with_kl else 0))
  local = {k: v[sl] for k, v in batch.items()}
  rows = len(batch["labels"])
  indices = np.full(rows, -1, np.int64)
  indices[:len(g)] = g
  local.update(pair_indices=indices[sl], global_num_tokens=tokens, global_num_pairs=len(g))
  if reference is not None:
    _with_reference(local, *reference, sl, rows)
  return local


class UnpairedLoader:
  """``(step_index, local batch)`` for steps ``start_step, ...``: the KTO twin of ``PreferenceLoader``.

  ``pack_batches`` (``data.pack_batches``, KTO only): each global batch's examples, each with its KL
  row, packed padding-free (``make_packed_unpaired_batch``) into a number of rows rounded up to
  ``row_multiple`` x the process count; every process builds the same rows and keeps its share.

  ``reference`` (``dpo.precompute_ref_logps``): the precomputed sums (its ``kl`` by step and batch
  position, covering every step loaded); each batch then carries its rows' reference sums
  (``completion_ref_logps`` / ``kl_ref_logps``, or ``ref_logps`` ``[R, K, 2]`` packed).
  """

  def __init__(self, dataset: UnpairedDataset, global_batch_size: int, *, seed: int, shuffle: bool,
               process_index: int, process_count: int, pad_multiple: int | None, max_length: int | None,
               with_kl: bool, start_step: int = 0, num_steps: int | None = None, pack_batches: bool = False,
               row_length: int | None = None, max_pairs_per_row: int | None = None, share_prompt: bool = False,
               row_multiple: int = 1, reference: UnpairedReference | None = None, packing: bool = False):
    self.dataset, self.global_batch_size, self.seed, self.shuffle = dataset, global_batch_size, seed, shuffle
    self.reference = reference
    want = (len(dataset),) if packing else (None, global_batch_size)
    if reference is not None and with_kl and (reference.kl is None or reference.kl.ndim != len(want)
                                              or reference.kl.shape[-1] != want[-1]):
      raise ValueError(f"UnpairedLoader: reference.kl must be {'[N] (by example)' if packing else '[steps, global_batch_size] (by step and position)'}")
    self._slice = process_slice(global_batch_size, process_index, process_count)
    self.pad_multiple, self.max_length, self.with_kl = pad_multiple, max_length, with_kl
    self.step, self.end = start_step, None if num_steps is None else num_steps
    self.plan = None
    if pack_batches and not with_kl:
      raise ValueError("pack_batches packs each example with its KL row: it needs loss 'kto'")
    self.pack_batches, self.share_prompt = bool(pack_batches), bool(share_prompt)
    self.process_index, self.process_count = process_index, process_count
    longest = int(dataset.lengths.max()) if len(dataset) else 0
    self.row_length = int(row_length) if row_length else 2 * (max_length or longest)
    self.max_pairs_per_row = int(max_pairs_per_row) if max_pairs_per_row else default_max_pairs_per_row(
        self.row_length)
    self.row_multiple = max(1, int(row_multiple)) * process_count
    self.packing = bool(packing)
    if self.packing:  # data.packing: rows planned once; global_batch_size counts rows; KL rows rotate in a row
      if not with_kl:
        raise ValueError("packing packs each example with its KL row: it needs loss 'kto'")
      if not row_length:
        self.row_length = 4 * (max_length or longest)
      if not max_pairs_per_row:
        self.max_pairs_per_row = default_max_pairs_per_row(self.row_length)
      self.plan = plan_unpaired_packing(dataset.examples, self.row_length, self.max_pairs_per_row, self.share_prompt)
      self.kl_partners = row_kl_partners(self.plan)
      self._counts = _planned_token_counts(dataset, self.kl_partners, max_length, self.share_prompt)
      self.pack_batches = False

  def load(self, step: int) -> dict[str, Any]:
    if self.packing:
      return self._load_planned(step)
    g, _ = train_kl_partners(step, self.global_batch_size, len(self.dataset), self.seed, self.shuffle)
    reference = None
    if self.reference is not None:
      kl = None
      if self.with_kl:
        if step >= len(self.reference.kl):
          raise ValueError(f"the precomputed KL reference sums cover steps < {len(self.reference.kl)}, not {step}")
        kl = self.reference.kl[step]
      reference = (self.reference.completions[g].astype(np.float32), kl)
    if self.pack_batches:
      return self._load_packed(g, reference)
    return _local(self.dataset, g, self._slice, with_kl=self.with_kl, pad_multiple=self.pad_multiple,
                  max_length=self.max_length, reference=reference)

  def _load_packed(self, g: np.ndarray, reference=None) -> dict[str, Any]:
    batch = make_packed_unpaired_batch([self.dataset.examples[int(i)] for i in g], pad_id=self.dataset.pad_id,
                                       row_length=self.row_length, max_pairs_per_row=self.max_pairs_per_row,
                                       max_length=self.max_length, share_prompt=self.share_prompt,
                                       row_multiple=self.row_multiple)
    rows = batch["tokens"].shape[0] // self.process_count
    sl = slice(self.process_index * rows, (self.process_index + 1) * rows)
    local = {k: batch[k][sl] for k in ("tokens", "segment_ids", "response_mask", "pair_mask", "labels",
                                       "positions", "prefix_ids") if k in batch}
    idx = batch["pair_indices"][sl]
    local.update(pair_indices=np.where(idx >= 0, g[np.maximum(idx, 0)], -1), global_num_tokens=batch["num_tokens"],
                 global_computed_tokens=int((batch["segment_ids"] > 0).sum()), global_num_pairs=len(g))
    if reference is not None:  # slot (r, k) holds batch position idx: its completion's and its KL row's sums
      sums = np.stack(reference, axis=-1)[np.maximum(idx, 0)]
      local["ref_logps"] = np.where(idx[..., None] >= 0, sums, 0.0).astype(np.float32)
    return local

  def _load_planned(self, step: int) -> dict[str, Any]:
    g = global_batch_indices(step, self.global_batch_size, self.plan.num_rows, self.seed, self.shuffle)
    mine = g[self._slice]
    batch = make_planned_unpaired_batch(self.dataset.examples, self.plan, mine, pad_id=self.dataset.pad_id,
                                        max_length=self.max_length, share_prompt=self.share_prompt)
    local = {k: batch[k] for k in ("tokens", "segment_ids", "response_mask", "pair_mask", "labels", "positions",
                                   "prefix_ids", "pair_indices") if k in batch}
    examples = np.concatenate([self.plan.row(int(r)) for r in g])
    padded, computed = self._counts
    local.update(global_num_tokens=int(padded[examples].sum()), global_computed_tokens=int(computed[examples].sum()),
                 global_num_pairs=len(examples))
    if self.reference is not None:  # KL sums by example: the partners are fixed by the plan
      idx, kl = batch["pair_indices"], self.reference.kl
      sums = np.stack([self.reference.completions[np.maximum(idx, 0)], kl[np.maximum(idx, 0)]], axis=-1)
      local["ref_logps"] = np.where(idx[..., None] >= 0, sums, 0.0).astype(np.float32)
    return local

  def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
    while self.end is None or self.step < self.end:
      step = self.step
      self.step += 1
      yield step, self.load(step)


def unpaired_eval_batches(dataset: UnpairedDataset, global_batch_size: int, process_index: int = 0,
                          process_count: int = 1, pad_multiple: int | None = None, max_length: int | None = None,
                          with_kl: bool = True,
                          reference: UnpairedReference | None = None) -> Iterator[dict[str, Any]]:
  """Every example once, in order; the last global batch filled up with empty rows (``example_mask`` 0).

  A last batch with a single real example pairs it with itself for its KL row (nothing else to mismatch).
  ``reference``: precomputed sums by example (its ``kl`` as :func:`eval_kl_partners` pairs them); each
  batch then carries ``completion_ref_logps`` / ``kl_ref_logps``.
  """
  sl = process_slice(global_batch_size, process_index, process_count)
  n = len(dataset)
  for start in range(0, n, global_batch_size):
    g = np.arange(start, min(start + global_batch_size, n), dtype=np.int64)
    ref = None
    if reference is not None:
      ref = (reference.completions[g], reference.kl[g] if with_kl else None)
    yield _local(dataset, g, sl, with_kl=with_kl, pad_multiple=pad_multiple, max_length=max_length,
                 num_rows=global_batch_size, min_examples=1, reference=ref)
