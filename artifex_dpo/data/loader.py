"""The Grain loader of global batches for training, and the eval batches (every pair once).

`PreferenceLoader` turns global step numbers into per-process batches with a Grain
``MapDataset`` (prefetched in threads): the pairs of a step come from `artifex_dpo.data.order`
(global order, process slice), the padded arrays from `artifex_dpo.data.batches`. The loader's
position is just the step number (what the checkpoint saves), so a run may resume on any number
of processes.

With ``packing`` (see `artifex_dpo.data.packing`), whole pairs are packed into rows of
``row_length`` tokens by a plan made once from the token lengths; the loader then orders,
shuffles and slices ROWS exactly as above (``global_batch_size`` counts rows) and yields the
packed layout (``tokens``, ``segment_ids``, ``response_mask`` [r, L], ``pair_mask`` [r, K],
``num_tokens``, ``num_pairs``) plus ``global_num_tokens`` and ``global_num_pairs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from artifex_dpo.data.batches import make_batch, pad_length
from artifex_dpo.data.dataset import PreferenceDataset
from artifex_dpo.data.errors import DataError
from artifex_dpo.data.order import global_batch_indices, process_slice
from artifex_dpo.data.packing import (PackingPlan, default_max_pairs_per_row, ffd_row_counts, make_packed_batch,
                                     packed_lengths, plan_packing, round_up, row_budget_bound)


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
