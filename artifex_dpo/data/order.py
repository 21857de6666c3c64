"""Which pairs a step holds: the global order, each process's slice, and the eval split.

* the global order of examples is a permutation that depends only on (seed, epoch);
* global step ``s`` covers positions ``s*B .. s*B+B-1`` of the endless sequence of epochs
  (a batch may straddle two epochs); each of P processes loads the contiguous slice
  ``[p*B/P, (p+1)*B/P)`` of it, so the union is the global batch for any P.

The position in the data is just the step number (what the checkpoint saves), so a run may
resume on any number of processes.
"""

from __future__ import annotations

import functools

import numpy as np

from artifex_dpo.data.dataset import PreferenceDataset
from artifex_dpo.data.errors import DataError


def eval_split(
    dataset: PreferenceDataset, fraction: float, seed: int = 0
) -> tuple[PreferenceDataset, PreferenceDataset | None]:
  """Holds out a fraction of the pairs (or KTO examples) for evaluation (``data.eval_split``).

  The held-out pairs are the first ``round(fraction * N)`` (at least 1) of a permutation
  seeded by ``seed``; both parts keep the original order.

  Args:
    dataset: The full dataset: a `PreferenceDataset`, or any dataset with ``subset``, ``COUNTERS``
      and ``UNIT`` (the KTO `UnpairedDataset`).
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
    raise DataError("data.eval_split", None, f"holding out {n_eval} of {n} {dataset.UNIT} leaves none to train on")
  perm = np.random.default_rng(np.random.SeedSequence([abs(int(seed)), 0x5EED])).permutation(n)
  held = np.zeros(n, bool)
  held[perm[:n_eval]] = True
  train, evaluation = dataset.subset(np.flatnonzero(~held)), dataset.subset(np.flatnonzero(held))
  for name in dataset.COUNTERS:  # the counters stay with the training part
    setattr(train, name, getattr(dataset, name))
  return train, evaluation


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

