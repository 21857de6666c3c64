"""Tests of artifex_dpo.data.packing and the packed paths of the loader and eval batches."""

from __future__ import annotations

import numpy as np
import pytest

from artifex_dpo.data import (
    DataError,
    PreferenceDataset,
    PreferenceLoader,
    default_max_pairs_per_row,
    eval_batches,
    make_batch,
    make_packed_batch,
    plan_packing,
)
from artifex_dpo.data.formats import TokenizedPair


def synthetic(n: int, seed: int = 0, max_prompt: int = 6, max_response: int = 9) -> PreferenceDataset:
  """Pair i: prompt of 0..max_prompt ids, responses of 1..max_response ids; ids encode i."""
  rng = np.random.default_rng(seed)
  pairs = []
  for i in range(n):
    p, c, r = rng.integers(0, max_prompt + 1), rng.integers(1, max_response + 1), rng.integers(1, max_response + 1)
    pairs.append(TokenizedPair(np.full(p, 10000 + i, np.int32), np.full(c, 20000 + i, np.int32),
                               np.full(r, 30000 + i, np.int32)))
  return PreferenceDataset.from_pairs(pairs, pad_id=7)


def check_plan(plan, lengths, row_length, cap):
  totals = np.asarray(lengths).sum(axis=1)
  assert np.array_equal(np.sort(plan.pair_indices), np.arange(len(totals)))
  assert plan.row_offsets[0] == 0 and plan.row_offsets[-1] == len(totals)
  for i in range(plan.num_rows):
    row = plan.row(i)
    assert 1 <= len(row) <= cap
    assert totals[row].sum() == plan.row_tokens[i] <= row_length
  assert plan.fill == pytest.approx(totals.sum() / (plan.num_rows * row_length))


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize("seed", range(4))
def test_plan_properties_on_random_lengths(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 200, size=(500, 2))
  row_length, cap = 512, 6
  plan = plan_packing(lengths, row_length, cap)
  check_plan(plan, lengths, row_length, cap)
  # Deterministic, and the same from a copy of the lengths in another dtype.
  again = plan_packing(lengths.astype(np.int32).copy(), row_length, cap)
  assert np.array_equal(plan.row_offsets, again.row_offsets)
  assert np.array_equal(plan.pair_indices, again.pair_indices)
  one_per_row = lengths.sum() / (len(lengths) * row_length)
  assert plan.fill > 1.5 * one_per_row and plan.fill > 0.8
  assert plan.num_rows < len(lengths) / 2


def naive_ffd(totals, row_length, cap):
  rows, room = [], []
  for i in sorted(range(len(totals)), key=lambda i: (-totals[i], i)):
    for r in range(len(rows)):
      if room[r] >= totals[i] and len(rows[r]) < cap:
        rows[r].append(i)
        room[r] -= totals[i]
        break
    else:
      rows.append([i])
      room.append(row_length - totals[i])
  return rows


@pytest.mark.parametrize("seed,cap", [(0, 1), (1, 2), (2, 3), (3, 64)])
def test_plan_equals_naive_first_fit_decreasing(seed, cap):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 60, size=(300, 2))
  lengths[:40] = rng.integers(40, 64, size=(40, 2))  # Some pairs over half a row.
  plan = plan_packing(lengths, 128, cap)
  expected = naive_ffd(lengths.sum(axis=1).tolist(), 128, cap)
  assert [plan.row(i).tolist() for i in range(plan.num_rows)] == expected


def test_plan_respects_max_pairs_per_row():
  lengths = np.ones((50, 2), np.int64)
  plan = plan_packing(lengths, 1000, 4)
  check_plan(plan, lengths, 1000, 4)
  assert plan.num_rows == 13 and list(plan.row_sizes) == [4] * 12 + [2]
  single = plan_packing(lengths, 1000, 1)
  assert single.num_rows == 50 and list(single.pair_indices) == list(range(50))


def test_plan_first_fit_decreasing_hand_example():
  # Totals 3, 8, 5, 4, 2, 5 into rows of 10. Decreasing (ties by index): 8(1) 5(2) 5(5) 4(3) 3(0) 2(4).
  # 8 -> row 0; 5 -> row 1; 5 -> row 1 (full); 4 -> row 2; 3 -> row 2; 2 -> row 0 (first fit).
  lengths = np.array([[1, 2], [4, 4], [2, 3], [2, 2], [1, 1], [3, 2]])
  plan = plan_packing(lengths, 10, 3)
  assert [list(plan.row(i)) for i in range(plan.num_rows)] == [[1, 4], [2, 5], [3, 0]]
  assert list(plan.row_tokens) == [10, 10, 7]
  assert plan.fill == pytest.approx(27 / 30)
  # One pair per row: every pair opens its own row, in decreasing order.
  capped = plan_packing(lengths, 10, 1)
  assert [list(capped.row(i)) for i in range(capped.num_rows)] == [[1], [2], [5], [3], [0], [4]]
  with pytest.raises(IndexError):
    plan.row(3)


def test_plan_edge_cases():
  empty = plan_packing(np.zeros((0, 2)), 16, 2)
  assert empty.num_rows == 0 and empty.num_pairs == 0 and empty.fill == 0.0
  exact = plan_packing(np.array([[8, 8]]), 16, 2)
  assert exact.num_rows == 1 and exact.fill == 1.0
  with pytest.raises(DataError, match=r"data\.max_length: pair 1 has 9 \+ 8 = 17 tokens"):
    plan_packing(np.array([[1, 1], [9, 8]]), 16, 2)
  with pytest.raises(DataError):
    plan_packing(np.array([[1, 1]]), 16, 0)
  assert default_max_pairs_per_row(2048) == 64 and default_max_pairs_per_row(8) == 1


# --------------------------------------------------------------------------- batches


def test_packed_batch_matches_unpacked_rows():
  pairs = [
      TokenizedPair(np.array([11, 12], np.int32), np.array([13, 14, 15], np.int32), np.array([16], np.int32)),
      TokenizedPair(np.array([], np.int32), np.array([21, 22], np.int32), np.array([23, 24, 25], np.int32)),
      TokenizedPair(np.array([31], np.int32), np.array([32], np.int32), np.array([33, 34], np.int32)),
  ]
  ds = PreferenceDataset.from_pairs(pairs, pad_id=0)
  plan = plan_packing(ds.lengths, 16, 4)  # Totals 7, 5, 5: row 0 = [0, 1], row 1 = [2].
  assert [list(plan.row(i)) for i in range(plan.num_rows)] == [[0, 1], [2]]
  b = make_packed_batch(ds, plan, [1, -1, 0])
  assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (3, 16)
  assert b["tokens"].tolist() == [
      [31, 32, 31, 33, 34] + [0] * 11,
      [0] * 16,
      [11, 12, 13, 14, 15, 11, 12, 16, 21, 22, 23, 24, 25] + [0] * 3,
  ]
  assert b["segment_ids"].tolist() == [
      [1, 1, 2, 2, 2] + [0] * 11,
      [0] * 16,
      [1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4] + [0] * 3,
  ]
  assert b["response_mask"].tolist() == [
      [0, 1, 0, 1, 1] + [0] * 11,
      [0] * 16,
      [0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1] + [0] * 3,
  ]
  assert b["pair_mask"].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
  assert b["num_tokens"] == 18 and b["num_pairs"] == 3


def test_shared_prompt_layout_by_hand():
  from artifex_dpo.data.packing import packed_lengths

  pairs = [
      TokenizedPair(np.array([11, 12], np.int32), np.array([13, 14, 15], np.int32), np.array([16], np.int32)),
      TokenizedPair(np.array([], np.int32), np.array([21, 22], np.int32), np.array([23, 24, 25], np.int32)),
  ]
  ds = PreferenceDataset.from_pairs(pairs, pad_id=0)
  lengths = packed_lengths(ds.offsets, True)
  assert lengths.sum(axis=1).tolist() == [2 + 3 + 1 + 1, 0 + 2 + 3]  # P + C + R + 1; no prompt: C + R
  plan = plan_packing(lengths, 16, 4)
  b = make_packed_batch(ds, plan, [0], share_prompt=True)
  # Pair 0: prompt head [11] (seg 1), chosen branch [12 | 13 14 15] (seg 2), rejected branch [12 | 16]
  # (seg 3), both branches continuing the prompt's positions. Pair 1 (empty prompt): [21 22], [23 24 25].
  assert b["tokens"].tolist() == [[11, 12, 13, 14, 15, 12, 16, 21, 22, 23, 24, 25] + [0] * 4]
  assert b["segment_ids"].tolist() == [[1, 2, 2, 2, 2, 3, 3, 5, 5, 6, 6, 6] + [0] * 4]
  assert b["prefix_ids"].tolist() == [[0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4] + [0] * 4]
  assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 1, 2, 0, 1, 0, 1, 2] + [0] * 4]
  assert b["response_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1] + [0] * 4]
  assert b["num_tokens"] == 12 and b["num_pairs"] == 2


@pytest.mark.parametrize("seed", range(3))
def test_packed_segments_equal_make_batch_rows(seed):
  ds = synthetic(120, seed=seed)
  plan = plan_packing(ds.lengths, 40, 5)
  rows = np.random.default_rng(seed).permutation(plan.num_rows)[:30]
  b = make_packed_batch(ds, plan, rows)
  assert b["num_pairs"] == plan.row_sizes[rows].sum() and b["num_tokens"] == plan.row_tokens[rows].sum()
  assert (b["segment_ids"] > 0).sum() == b["num_tokens"]
  for r, row_id in enumerate(rows):
    pairs = plan.row(row_id)
    ref = make_batch(ds, pairs, 15)
    seg, tok, resp = b["segment_ids"][r], b["tokens"][r], b["response_mask"][r]
    expected_tok, expected_seg, expected_resp = [], [], []
    for j in range(len(pairs)):
      for side_k, side in enumerate(("chosen", "rejected")):
        n = int(ref[f"{side}_segment_ids"][j].sum())
        expected_tok += ref[f"{side}_tokens"][j, :n].tolist()
        expected_resp += ref[f"{side}_response_mask"][j, :n].tolist()
        expected_seg += [2 * j + 1 + side_k] * n
    n = len(expected_tok)
    assert tok[:n].tolist() == expected_tok and (tok[n:] == ds.pad_id).all()
    assert seg[:n].tolist() == expected_seg and (seg[n:] == 0).all()
    assert resp[:n].tolist() == expected_resp and (resp[n:] == 0).all()
    # The first token of every segment is never scored; derived slot / side are consistent.
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
    assert (resp[starts] == 0).all()
    real = seg > 0
    assert set(((seg[real] - 1) // 2).tolist()) == set(range(len(pairs)))
    assert b["pair_mask"][r].tolist() == [1] * len(pairs) + [0] * (5 - len(pairs))


def test_packed_batch_rejects_overfull_rows():
  ds = synthetic(40)
  plan = plan_packing(ds.lengths, 40, 5)
  with pytest.raises(ValueError, match="max_pairs_per_row"):
    make_packed_batch(ds, plan, [0], max_pairs_per_row=int(plan.row_sizes[0]) - 1)
  with pytest.raises(ValueError, match="row length"):
    make_packed_batch(ds, plan, [0], row_length=int(plan.row_tokens[0]) - 1)


# --------------------------------------------------------------------------- loader


def test_packed_loader_process_slices_union_is_global_batch():
  ds = synthetic(300, seed=3)
  kwargs = dict(seed=4, max_length=15, num_steps=25, packing=True, max_pairs_per_row=4)
  single = PreferenceLoader(ds, 8, **kwargs)
  assert single.plan.row_length == 30 and single.num_examples == single.plan.num_rows < len(ds)
  loaders = [PreferenceLoader(ds, 8, process_index=p, process_count=2, **kwargs) for p in range(2)]
  epochs_rows = []
  for (s, whole), (s0, a), (s1, b) in zip(single, *loaders):
    assert s == s0 == s1
    for key in ("tokens", "segment_ids", "response_mask", "pair_mask"):
      assert a[key].shape[0] == b[key].shape[0] == 4
      assert np.array_equal(np.concatenate([a[key], b[key]]), whole[key]), key
    assert a["global_num_tokens"] == b["global_num_tokens"] == whole["global_num_tokens"] == whole["num_tokens"]
    assert a["global_num_pairs"] == b["global_num_pairs"] == whole["num_pairs"]
    assert a["num_pairs"] + b["num_pairs"] == whole["num_pairs"]
    epochs_rows.append(single.global_indices(s))
  assert s == 24 and single.position == 25
  # The first epoch's rows are a permutation of the plan (rows shuffled like pairs).
  rows = np.concatenate(epochs_rows)[: single.plan.num_rows]
  assert np.array_equal(np.sort(rows), np.arange(single.plan.num_rows))
  assert single.steps_per_epoch == single.plan.num_rows / 8


def test_packed_loader_resume_and_given_plan():
  ds = synthetic(100, seed=1)
  first = PreferenceLoader(ds, 4, seed=2, packing=True, row_length=32, num_steps=12)
  batches = dict(first)
  resumed = PreferenceLoader(ds, 4, seed=2, packing=True, plan=first.plan, start_step=9, num_steps=12)
  for step, batch in resumed:
    assert np.array_equal(batch["tokens"], batches[step]["tokens"])
  with pytest.raises(ValueError):
    PreferenceLoader(ds, 4, packing=True, plan=first.plan, row_length=64)


def test_packed_eval_batches_cover_each_pair_once():
  ds = synthetic(57, seed=5)
  plan = plan_packing(ds.lengths, 30, 3)
  assert plan.num_rows % 4  # The last global batch is partial.
  seen, num_batches = [], 0
  for p in range(2):
    for b in eval_batches(ds, 4, process_index=p, process_count=2, max_length=15, packing=True,
                          max_pairs_per_row=3):
      assert b["tokens"].shape == (2, 30) and b["pair_mask"].shape == (2, 3)
      num_batches += p == 0
      # Recover the pairs from the tokens (prompt/response ids encode the pair index).
      for r in range(2):
        for j in np.flatnonzero(b["pair_mask"][r]):
          chosen = b["tokens"][r][b["segment_ids"][r] == 2 * j + 1]
          seen.append(int(chosen[-1]) - 20000)
  assert num_batches == -(-plan.num_rows // 4)
  assert sorted(seen) == list(range(len(ds)))
  batches = list(eval_batches(ds, 4, max_length=15, packing=True, max_pairs_per_row=3))
  assert sum(b["num_pairs"] for b in batches) == len(ds)
  assert all(b["global_num_pairs"] == b["num_pairs"] for b in batches)
  assert (batches[-1]["segment_ids"][plan.num_rows % 4 :] == 0).all()


def test_pack_batches_keeps_the_global_batch_and_splits_rows_over_processes():
  """Per-batch packing: each step holds exactly the padded loader's pairs, laid out in rows."""
  from artifex_dpo.data.formats import TokenizedPair
  from artifex_dpo.data import PreferenceDataset, PreferenceLoader

  rng = np.random.default_rng(0)
  pairs = [TokenizedPair(rng.integers(0, 50, rng.integers(2, 20)), rng.integers(0, 50, rng.integers(1, 20)),
                         rng.integers(0, 50, rng.integers(1, 20))) for _ in range(40)]
  ds = PreferenceDataset.from_pairs(pairs, pad_id=0)
  padded = PreferenceLoader(ds, 8, seed=3, pad_multiple=8, max_length=40)
  for step in range(12):
    want = sorted(padded.global_indices(step).tolist())
    got, rows = [], []
    for p in range(2):
      loader = PreferenceLoader(ds, 8, seed=3, pad_multiple=8, max_length=40, process_index=p, process_count=2,
                                pack_batches=True, row_multiple=2)
      b = loader.load(step)
      rows.append(b["tokens"].shape[0])
      got += [i for i in b["pair_indices"].reshape(-1).tolist() if i >= 0]
      assert b["global_num_pairs"] == 8
      assert b["global_num_tokens"] == int(ds.lengths[padded.global_indices(step)].sum())
      # Each packed sequence is the pair's prompt + response.
      for r in range(b["tokens"].shape[0]):
        for slot, idx in enumerate(b["pair_indices"][r]):
          if idx < 0:
            continue
          pr = ds[idx]
          seq = b["tokens"][r][b["segment_ids"][r] == 2 * slot + 1]
          np.testing.assert_array_equal(seq, np.concatenate([pr.prompt_ids, pr.chosen_ids]))
    assert sorted(got) == want
    assert rows[0] == rows[1] and (2 * rows[0]) % 4 == 0
    assert 2 * rows[0] * 80 < 8 * 2 * 40 * 2  # fewer token slots than padding every pair to max_length


@pytest.mark.parametrize("row_length, cap, key", [(0, 4, "data.pack_length"), (64, 0, "data.max_pairs_per_row")])
def test_bad_plan_settings_name_the_config_key(row_length, cap, key):
  with pytest.raises(DataError, match=key.replace(".", r"\.")):
    plan_packing(np.array([[3, 4]]), row_length, cap)
