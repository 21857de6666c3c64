"""Packing of whole preference pairs into fixed-length rows (padding-free batches).

A packed row of ``row_length`` tokens holds several whole pairs. The ``j``-th pair of a row
(``j = 0, 1, ...``) contributes its chosen sequence (prompt + chosen response) with segment
id ``2*j + 1``, immediately followed by its rejected sequence (prompt + rejected response)
with segment id ``2*j + 2``; the rest of the row is padding (segment id 0, right padding
only). Inside jit a token's slot in its row is ``(seg - 1) // 2`` and its side
``(seg - 1) % 2`` (0 chosen, 1 rejected). A row holds at most ``max_pairs_per_row`` pairs.

`plan_packing` assigns pairs to rows once, from the token lengths only (first-fit
decreasing), so every process and every resumed run sees the same rows; the loader then
shuffles and batches ROWS exactly as it does pairs without packing.

Packed batch layout (numpy, ``r`` = rows, ``L`` = row length, ``K`` = max pairs per row):
``tokens`` int32 [r, L] (pad id after the last segment), ``segment_ids`` int32 [r, L] (as
above), ``response_mask`` int32 [r, L] (1 at response tokens, scored as predicted from the
token before; the first token of every segment never is), ``pair_mask`` int32 [r, K] (1
for the slots holding a pair), ``pair_indices`` int64 [r, K] (the dataset index of each
slot's pair, -1 for empty slots), and python ints ``num_tokens`` (non-padding tokens) and
``num_pairs``.

Shared prompts (``share_prompt=True``): a pair's prompt is run once instead of twice. Its
first ``P - 1`` prompt tokens get segment id ``3*j + 1``; the chosen branch (segment
``3*j + 2``) is the last prompt token followed by the chosen response, the rejected branch
(``3*j + 3``) the last prompt token again followed by the rejected response. Both branches
attend to their own tokens and to the shared prompt (``prefix_ids`` holds ``3*j + 1`` on
branch tokens), never to each other, and their ``positions`` continue the prompt's, so every
response token sees exactly the context it has in its own sequence, and the repeated last prompt
token predicts each response's first token as in the unshared layout. A pair costs
``P + C + R + 1`` tokens instead of ``2P + C + R``. The batch then also holds ``positions``
and ``prefix_ids`` int32 [r, L], and a token's slot is ``(seg - 1) // 3``, its side
``(seg - 1) % 3 - 1`` (-1 prompt, 0 chosen, 1 rejected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from artifex_dpo.data.errors import DataError

if TYPE_CHECKING:
  from artifex_dpo.data.dataset import PreferenceDataset

TOKENS_PER_PAIR_SLOT = 32


def packed_lengths(offsets: np.ndarray, share_prompt: bool) -> np.ndarray:
  """int64 ``[N, 2]`` whose row sums are each pair's tokens in a packed row (what plans pack).

  Unshared: the chosen and rejected sequence lengths. Shared: ``(P + C, R + 1)`` (the prompt
  once, the last prompt token repeated; ``(C, R)`` for an empty prompt).

  Args:
    offsets: int ``[N, 4]`` per pair: starts of prompt, chosen, rejected, and the end.
    share_prompt: the layout.
  """
  o = np.asarray(offsets, np.int64)
  p, c, r = o[:, 1] - o[:, 0], o[:, 2] - o[:, 1], o[:, 3] - o[:, 2]
  if share_prompt:
    return np.stack([p + c, r + np.minimum(p, 1)], axis=1)
  return np.stack([p + c, p + r], axis=1)


def default_max_pairs_per_row(row_length: int) -> int:
  """The default cap on pairs per row: one per ``TOKENS_PER_PAIR_SLOT`` tokens (at least 1)."""
  return max(1, int(row_length) // TOKENS_PER_PAIR_SLOT)


@dataclasses.dataclass(frozen=True)
class PackingPlan:
  """Which pairs go into which packed row.

  Row ``i`` holds the pairs ``pair_indices[row_offsets[i]:row_offsets[i + 1]]``, in that
  order (slot 0 first).

  Attributes:
    row_offsets: int64 [num_rows + 1], starts of the rows in ``pair_indices``.
    pair_indices: int64 [N], every pair index exactly once.
    row_tokens: int64 [num_rows], non-padding tokens of each row.
    row_length: Tokens per row.
    max_pairs_per_row: Cap on pairs per row.
    fill: Fraction of non-padding tokens over all rows (0 for an empty plan).
  """

  row_offsets: np.ndarray
  pair_indices: np.ndarray
  row_tokens: np.ndarray
  row_length: int
  max_pairs_per_row: int
  fill: float

  @property
  def num_rows(self) -> int:
    """Number of packed rows."""
    return len(self.row_offsets) - 1

  @property
  def num_pairs(self) -> int:
    """Number of pairs in the plan."""
    return len(self.pair_indices)

  @property
  def row_sizes(self) -> np.ndarray:
    """int64 [num_rows]: pairs in each row."""
    return np.diff(self.row_offsets)

  def row(self, i: int) -> np.ndarray:
    """The pair indices of row ``i`` (slot order)."""
    if not 0 <= i < self.num_rows:
      raise IndexError(f"row {i} out of range [0, {self.num_rows})")
    return self.pair_indices[self.row_offsets[i] : self.row_offsets[i + 1]]

  def __len__(self) -> int:
    return self.num_rows


def _readonly(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False
  return a


def plan_packing(lengths: np.ndarray, row_length: int, max_pairs_per_row: int) -> PackingPlan:
  """First-fit-decreasing packing of pairs into rows (a pure function of its arguments).

  Pairs are taken by decreasing total length (chosen + rejected; ties by index) and each
  goes into the first (lowest-numbered) open row with room for its tokens and fewer than
  ``max_pairs_per_row`` pairs, or else opens a new row. Rows are numbered in opening order
  and keep their pairs in insertion order.

  Args:
    lengths: int [N, 2]: sequence lengths (prompt + response) of chosen and rejected.
    row_length: Tokens per row.
    max_pairs_per_row: Cap on pairs per row.

  Returns:
    The plan.

  Raises:
    DataError: A pair does not fit in one row, or a bad setting.
  """
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
  row_length, cap = int(row_length), int(max_pairs_per_row)
  if row_length <= 0:
    raise DataError("data.pack_length", None, f"must be positive, got {row_length}")
  if cap <= 0:
    raise DataError("data.max_pairs_per_row", None, f"must be positive, got {cap}")
  if (lengths < 0).any():
    raise ValueError("negative sequence length")
  totals = lengths.sum(axis=1)
  n = len(totals)
  too_long = np.flatnonzero(totals > row_length)
  if len(too_long):
    i = int(too_long[0])
    raise DataError(
        "data.max_length",
        None,
        f"pair {i} has {int(lengths[i, 0])} + {int(lengths[i, 1])} = {int(totals[i])} tokens "
        f"(chosen + rejected), more than the packed row length {row_length} "
        f"({len(too_long)} such pairs)",
    )
  if n == 0:
    empty = np.zeros((0,), np.int64)
    return PackingPlan(_readonly(np.zeros((1,), np.int64)), _readonly(empty), _readonly(empty.copy()),
                       row_length, cap, 0.0)

  order = np.lexsort((np.arange(n), -totals))  # Decreasing total, ties by index.
  sizes = totals[order]
  bins = np.empty(n, np.int64)

  # Pairs longer than half a row never share a row with each other: each opens the next row.
  big = int(np.count_nonzero(2 * sizes > row_length))
  bins[:big] = np.arange(big)

  # Segment tree over (at most n) rows of the room left, -1 once a row holds `cap` pairs;
  # unopened rows have the full room, so the leftmost fit is an open row or the next new one.
  size = 1
  while size < n:
    size *= 2
  room = np.full(size, row_length, np.int64)
  room[:big] = -1 if cap == 1 else row_length - sizes[:big]
  tree = np.empty(2 * size, np.int64)
  tree[size:] = room
  level = size
  while level > 1:
    tree[level // 2 : level] = np.maximum(tree[level : 2 * level : 2], tree[level + 1 : 2 * level : 2])
    level //= 2
  t = tree.tolist()
  counts = [0] * size
  for k in range(big):
    counts[k] = 1
  for k, s in enumerate(sizes[big:].tolist(), start=big):
    i = 1
    while i < size:
      i *= 2
      if t[i] < s:
        i += 1
    b = i - size
    bins[k] = b
    counts[b] += 1
    t[i] = -1 if counts[b] >= cap else t[i] - s
    i //= 2
    while i:
      m = t[2 * i] if t[2 * i] >= t[2 * i + 1] else t[2 * i + 1]
      if t[i] == m:
        break
      t[i] = m
      i //= 2

  by_row = np.argsort(bins, kind="stable")  # Rows in opening order, pairs in insertion order.
  num_rows = int(bins.max()) + 1
  row_sizes = np.bincount(bins, minlength=num_rows)
  row_offsets = np.concatenate([[0], np.cumsum(row_sizes)]).astype(np.int64)
  row_tokens = np.bincount(bins, weights=sizes, minlength=num_rows).astype(np.int64)
  fill = float(totals.sum()) / float(num_rows * row_length)
  return PackingPlan(
      row_offsets=_readonly(row_offsets),
      pair_indices=_readonly(order[by_row].astype(np.int64)),
      row_tokens=_readonly(row_tokens),
      row_length=row_length,
      max_pairs_per_row=cap,
      fill=fill,
  )


def make_packed_batch(
    dataset: PreferenceDataset,
    plan: PackingPlan,
    row_ids: Sequence[int] | np.ndarray,
    row_length: int | None = None,
    max_pairs_per_row: int | None = None,
    share_prompt: bool = False,
) -> dict[str, Any]:
  """Builds the packed numpy batch of the given rows (layout: see the module docstring).

  Args:
    dataset: The dataset the plan was made for.
    plan: The packing plan.
    row_ids: Plan rows to build, in batch order; a negative id gives an empty row (all
      padding), e.g. the filler rows of a last, partial eval batch.
    row_length: Row length L of the batch (default: the plan's); every row must fit.
    max_pairs_per_row: Slots K of ``pair_mask`` (default: the plan's); every row must fit.
    share_prompt: the shared-prompt layout (the plan must be made from
      ``packed_lengths(offsets, True)``).

  Returns:
    The batch dict.
  """
  L = plan.row_length if row_length is None else int(row_length)
  K = plan.max_pairs_per_row if max_pairs_per_row is None else int(max_pairs_per_row)
  row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
  r = len(row_ids)
  if (row_ids >= plan.num_rows).any():
    raise IndexError(f"row id out of range [0, {plan.num_rows}): {row_ids.max()}")
  real = row_ids >= 0
  counts = np.zeros(r, np.int64)
  counts[real] = plan.row_sizes[row_ids[real]]
  if r and counts.max() > K:
    raise ValueError(f"a row holds {counts.max()} pairs, more than max_pairs_per_row={K}")

  # The pairs of the rows, in row then slot order.
  first = np.zeros(r, np.int64)
  first[real] = plan.row_offsets[row_ids[real]]
  num_pairs = int(counts.sum())
  before = np.cumsum(counts) - counts
  pair_row = np.repeat(np.arange(r, dtype=np.int64), counts)
  slot = np.arange(num_pairs, dtype=np.int64) - before[pair_row]
  pairs = plan.pair_indices[first[pair_row] + slot]

  o = dataset.offsets[pairs]
  p_len, c_len, r_len = o[:, 1] - o[:, 0], o[:, 2] - o[:, 1], o[:, 3] - o[:, 2]
  zero = np.zeros_like(p_len)
  if share_prompt:
    # Five pieces: prompt head, last prompt token + chosen response, last prompt token + rejected.
    dup = np.minimum(p_len, 1)
    head = p_len - dup
    src_start = np.stack([o[:, 0], o[:, 0] + head, o[:, 1], o[:, 0] + head, o[:, 2]], axis=1)
    piece_len = np.stack([head, dup, c_len, dup, r_len], axis=1)
    seg = 3 * slot[:, None] + np.array([1, 2, 2, 3, 3], np.int64)
    prefix = (3 * slot[:, None] + 1) * np.array([0, 1, 1, 1, 1], np.int64)  # branches see the prompt
    is_resp = np.array([0, 0, 1, 0, 1], np.int32)
    pos_start = np.stack([zero, head, p_len, head, p_len], axis=1)
    seq_pieces = [[0], [1, 2], [3, 4]]  # pieces making up each segment
  else:
    # Four pieces: prompt, chosen response, prompt, rejected response.
    src_start = np.stack([o[:, 0], o[:, 1], o[:, 0], o[:, 2]], axis=1)
    piece_len = np.stack([p_len, c_len, p_len, r_len], axis=1)
    seg = 2 * slot[:, None] + np.array([1, 1, 2, 2], np.int64)
    prefix = np.zeros_like(seg)
    is_resp = np.array([0, 1, 0, 1], np.int32)
    pos_start = np.stack([zero, p_len, zero, p_len], axis=1)
    seq_pieces = [[0, 1], [2, 3]]
  pieces = piece_len.shape[1]
  src_start, piece_len, seg, prefix, pos_start = (x.reshape(-1) for x in (src_start, piece_len, seg, prefix, pos_start))
  is_resp = np.tile(is_resp, num_pairs)
  piece_row = np.repeat(pair_row, pieces)
  row_total = np.bincount(piece_row, weights=piece_len, minlength=r).astype(np.int64)
  if r and row_total.max() > L:
    raise ValueError(f"a row holds {row_total.max()} tokens, more than the row length {L}")
  # Each row is a contiguous run of the flat stream of its pieces, from the row's start.
  excl = np.cumsum(piece_len) - piece_len  # Start of each piece in the stream.
  n_tok = int(piece_len.sum())
  within = np.arange(n_tok, dtype=np.int64) - np.repeat(excl, piece_len)
  src = np.repeat(src_start, piece_len) + within
  stream_resp = np.repeat(is_resp, piece_len)
  # The first token of each (non-empty) segment has nothing before it in the segment to be predicted
  # from (only possible for a response when the prompt is empty).
  by_pair = lambda x: x.reshape(num_pairs, pieces)
  for group in seq_pieces:
    seq_start = by_pair(excl)[:, group[0]]
    seq_len = by_pair(piece_len)[:, group].sum(axis=1)
    stream_resp[seq_start[seq_len > 0]] = 0
  real_tokens = np.arange(L, dtype=np.int64)[None, :] < row_total[:, None]  # Row-major = stream order.
  tokens = np.full((r, L), dataset.pad_id, np.int32)
  segment_ids = np.zeros((r, L), np.int32)
  response = np.zeros((r, L), np.int32)
  tokens[real_tokens] = dataset.tokens[src]
  segment_ids[real_tokens] = np.repeat(seg.astype(np.int32), piece_len)
  response[real_tokens] = stream_resp
  pair_mask = np.zeros((r, K), np.int32)
  pair_mask[pair_row, slot] = 1
  pair_indices = np.full((r, K), -1, np.int64)
  pair_indices[pair_row, slot] = pairs
  extra = {}
  if share_prompt:
    positions = np.zeros((r, L), np.int32)
    prefix_ids = np.zeros((r, L), np.int32)
    positions[real_tokens] = np.repeat(pos_start, piece_len) + within
    prefix_ids[real_tokens] = np.repeat(prefix.astype(np.int32), piece_len)
    extra = {"positions": positions, "prefix_ids": prefix_ids}
  return {
      "pair_indices": pair_indices,
      "tokens": tokens,
      "segment_ids": segment_ids,
      "response_mask": response,
      "pair_mask": pair_mask,
      "num_tokens": n_tok,
      "num_pairs": num_pairs,
      **extra,
  }


# --------------------------------------------------------------------------- the layout default and the row budget


def resolve_layout(pack_batches: bool | None, share_prompt: bool | None, packing: bool,
                   unpaired: bool) -> tuple[bool, bool]:
  """The ``(data.pack_batches, data.share_prompt)`` a run uses; an explicit value is kept as given.

  Unset (None), the fastest exact layout is chosen: paired data gets per-batch packed rows with
  shared prompts (the same pairs per step and the same losses as padded batches); unpaired data
  (KTO; ``apo_zero_unpaired`` has no packed layout) gets padded batches, and ``data.packing`` (whose
  data-set plan the prompt sharing would change) no sharing. Packed KTO batches, when asked for,
  share each example's prompt with its KL row.

  Args:
    pack_batches: ``data.pack_batches`` (None: unset).
    share_prompt: ``data.share_prompt`` (None: unset).
    packing: ``data.packing``.
    unpaired: the loss takes unpaired examples (``DPOConfig.unpaired``).

  Returns:
    The two settings as booleans.
  """
  if pack_batches is None:
    pack_batches = not unpaired and not packing
  if share_prompt is None:
    share_prompt = bool(pack_batches) and not packing
  return bool(pack_batches), bool(share_prompt)


def guaranteed_pairs_per_row(max_length: int, row_length: int, max_pairs_per_row: int) -> int:
  """Pairs that first-fit packing puts in every row before it opens another, whatever the pairs.

  A pair takes at most ``2 * max_length`` tokens (either layout: shared, ``P + C + R + 1 <=
  2 * max_length``), so ``m = row_length // (2 * max_length)`` of any pairs fit in one row. A row
  holding fewer than ``min(m, max_pairs_per_row)`` pairs has room for any further pair, so first
  fit opens a new row only when every open row holds at least that many.
  """
  return max(1, min(int(max_pairs_per_row), int(row_length) // (2 * int(max_length))))


def round_up(rows: int, multiple: int) -> int:
  """``rows`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
  multiple = max(1, int(multiple))
  return max(1, -(-int(rows) // multiple)) * multiple


def row_budget_bound(global_batch_size: int, max_length: int, row_length: int, max_pairs_per_row: int,
                     row_multiple: int) -> int:
  """Rows per step that hold ANY global batch (``data.pack_batches``), from the config alone.

  ``ceil(global_batch_size / guaranteed_pairs_per_row)`` rounded up to ``row_multiple`` (the
  batch shards x ``train.grad_accum_steps``): what the AOT compile uses, since it has no data. It
  is the worst case (every pair ``2 * max_length`` tokens), the same tokens as padded batches at
  ``max_length``; a run's own budget (`ffd_row_counts` over its steps) is at most this.

  Args:
    global_batch_size: ``train.global_batch_size`` (pairs).
    max_length: ``data.max_length``.
    row_length: tokens per row (``data.pack_length``, or ``2 * max_length``).
    max_pairs_per_row: ``data.max_pairs_per_row`` (or its default).
    row_multiple: rows per step are a multiple of this.
  """
  per_row = guaranteed_pairs_per_row(max_length, row_length, max_pairs_per_row)
  return round_up(-(-int(global_batch_size) // per_row), row_multiple)


def ffd_row_counts(totals: np.ndarray, row_length: int, max_pairs_per_row: int) -> np.ndarray:
  """Rows `plan_packing` opens for each of many batches at once (vectorised over the batches).

  First fit decreasing, as `plan_packing`: each pair, largest first, goes into the lowest-numbered
  row with room for its tokens and fewer than ``max_pairs_per_row`` pairs (a new row has both), so
  the count is the plan's ``num_rows`` (ties between equal totals do not change it).

  Args:
    totals: int ``[S, B]``: the tokens of each pair (``packed_lengths(...).sum(1)``) of S batches.
    row_length: tokens per row.
    max_pairs_per_row: cap on pairs per row.

  Returns:
    int64 ``[S]``.

  Raises:
    DataError: A pair longer than a row.
  """
  sizes = -np.sort(-np.asarray(totals, np.int64).reshape(len(totals), -1), axis=1)
  s_count, b = sizes.shape
  if b and sizes.size and sizes[:, 0].max() > row_length:
    raise DataError("data.max_length", None, f"a pair has {int(sizes[:, 0].max())} tokens, more than the packed "
                                             f"row length {row_length}")
  room = np.full((s_count, 1), int(row_length), np.int64)
  count = np.zeros((s_count, 1), np.int64)
  opened = np.zeros(s_count, np.int64)
  every = np.arange(s_count)
  for k in range(b):
    if s_count and opened.max() == room.shape[1]:  # keep one never-opened row (room for anything) per batch
      room = np.concatenate([room, np.full((s_count, room.shape[1]), int(row_length), np.int64)], axis=1)
      count = np.concatenate([count, np.zeros_like(count)], axis=1)
    size = sizes[:, k]
    row = ((room >= size[:, None]) & (count < max_pairs_per_row)).argmax(axis=1)
    room[every, row] -= size
    count[every, row] += 1
    opened = np.maximum(opened, row + 1)
  return opened
