"""Padded batches of preference pairs: the padded length of a global batch, and the batch arrays.

Sequences are right-padded to one length per global batch (both sides): ``max_length``, or,
with ``pad_multiple``, the longest sequence of the global batch rounded up to a multiple of it
(capped at ``max_length``), so every process builds the same shape.

Batch layout (numpy, ``b`` = local pairs, ``T`` = padded length) for ``s`` in chosen,
rejected: ``{s}_tokens`` int32 [b, T] (pad id after the sequence), ``{s}_segment_ids`` int32
[b, T] (1 real token, 0 padding), ``{s}_response_mask`` int32 [b, T] (1 where the token is a
response token, i.e. scored as predicted from the token before it; position 0 never is);
``pair_mask`` int32 [b] (0 for the filler rows of a last, partial eval batch),
``pair_indices`` int64 [b] (dataset index of each row's pair, -1 for filler). Python ints
``num_tokens`` (this batch's non-padding tokens, chosen + rejected) and
``global_num_tokens`` (the same for the whole global batch, added by the loader) ride along.

Packed batches (several pairs per row) are built by `artifex_dpo.data.packing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from artifex_dpo.data.dataset import PreferenceDataset

SIDES = ("chosen", "rejected")
BATCH_ARRAY_KEYS = tuple(
    f"{s}_{k}" for s in SIDES for k in ("tokens", "segment_ids", "response_mask")
) + ("pair_mask",)


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


