"""Tests of the preference data path: the dataset (data.dataset), global order and eval split
(data.order), batches (data.batches), the loader (data.loader) and build_datasets (data.train_eval_sets)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import test_data_util as util
from artifex_dpo.data import (
    BATCH_ARRAY_KEYS,
    DataError,
    PreferenceDataset,
    PreferenceLoader,
    batch_indices,
    eval_batches,
    eval_split,
    global_batch_indices,
    global_order,
    load_tokenizer,
    make_batch,
    pad_length,
)
from artifex_dpo.data.formats import TokenizedPair


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return load_tokenizer(util.write_hf_folder(tmp_path_factory.mktemp("hf")))


def synthetic(n: int, seed: int = 0) -> PreferenceDataset:
  """Pair i: prompt of 1..6 ids, responses of 1..9 ids; ids encode i for checking."""
  rng = np.random.default_rng(seed)
  pairs = []
  for i in range(n):
    p, c, r = rng.integers(1, 7), rng.integers(1, 10), rng.integers(1, 10)
    pairs.append(TokenizedPair(np.full(p, 1000 + i, np.int32), np.full(c, 2000 + i, np.int32),
                               np.full(r, 3000 + i, np.int32)))
  return PreferenceDataset.from_pairs(pairs, pad_id=0)


def test_from_files_mixed_sources(tmp_path, tok):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  from array_record.python import array_record_module

  records = util.explicit_records(9)
  util.write_jsonl(tmp_path / "a.jsonl", records[:3])
  pq.write_table(pa.Table.from_pylist(records[3:6]), str(tmp_path / "b.parquet"))
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / "c.array_record"), "group_size:1")
  for r in records[6:]:
    writer.write(json.dumps(r).encode())
  writer.close()
  ds = PreferenceDataset.from_files(f"{tmp_path}/*.jsonl,{tmp_path}/*.parquet,{tmp_path}/*.array_record", tok)
  assert len(ds) == 9 and ds.num_skipped_invalid == 0 and ds.num_dropped_truncated == 0
  for i, r in enumerate(records):
    pair = ds[i]
    assert pair.prompt_ids.tolist() == [tok.bos_id] + tok.encode(r["prompt"])
    assert pair.chosen_ids.tolist() == tok.encode(r["chosen"]) + [tok.eos_id]
    assert ds.lengths[i].tolist() == [len(pair.prompt_ids) + len(pair.chosen_ids),
                                      len(pair.prompt_ids) + len(pair.rejected_ids)]
  assert ds.tokens.dtype == np.int32 and ds.tokens.ndim == 1


def test_invalid_records_raise_or_skip(tmp_path, tok):
  good = util.explicit_records(4)
  lines = [good[0], "{broken", good[1], {"prompt": "a", "chosen": "", "rejected": "b"}, good[2], "[1]", good[3]]
  path = util.write_jsonl(tmp_path / "d.jsonl", lines)
  with pytest.raises(DataError) as info:
    PreferenceDataset.from_files(path, tok)
  assert str(info.value).startswith(f"{path}:2: malformed JSON")
  ds = PreferenceDataset.from_files(path, tok, skip_invalid=True)
  assert len(ds) == 4 and ds.num_skipped_invalid == 3
  assert [m.split(": ")[0] for m in ds.skipped_messages] == [f"{path}:2", f"{path}:4", f"{path}:6"]
  assert ds[3].prompt_ids.tolist() == [tok.bos_id] + tok.encode(good[3]["prompt"])


def test_truncation_drops_are_counted(tmp_path, tok):
  records = [{"prompt": "hello " * 6, "chosen": "ab", "rejected": "cd"},  # Prompt alone too long.
             {"prompt": "q", "chosen": "ab", "rejected": "cd"}]
  path = util.write_jsonl(tmp_path / "d.jsonl", records)
  ds = PreferenceDataset.from_files(path, tok, max_length=8)
  assert len(ds) == 1 and ds.num_dropped_truncated == 1
  assert ds.max_sequence_length <= 8
  with pytest.raises(DataError, match=r"no usable preference pairs \(0 invalid, 2 dropped by truncation, 0 with "
                                      r"identical chosen and rejected\)"):
    PreferenceDataset.from_files(path, tok, max_length=2)


def test_all_invalid_is_an_error(tmp_path, tok):
  path = util.write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
  with pytest.raises(DataError, match=r"no usable preference pairs \(1 invalid"):
    PreferenceDataset.from_files(path, tok, skip_invalid=True)
  with pytest.raises(DataError, match=r"d\.jsonl:1: chosen: missing"):
    PreferenceDataset.from_files(path, tok)


def test_subset_eval_split_and_save_load(tmp_path):
  ds = synthetic(50)
  train, held = eval_split(ds, 0.2, seed=3)
  assert len(train) == 40 and len(held) == 10
  ids = sorted([int(train[i].chosen_ids[0]) for i in range(40)] + [int(held[i].chosen_ids[0]) for i in range(10)])
  assert ids == [2000 + i for i in range(50)]
  again, held_again = eval_split(ds, 0.2, seed=3)
  assert held_again.fingerprint() == held.fingerprint() and again.fingerprint() == train.fingerprint()
  assert eval_split(ds, 0.2, seed=4)[1].fingerprint() != held.fingerprint()
  assert eval_split(ds, 0.0) == (ds, None)
  with pytest.raises(DataError, match="data.eval_split"):
    eval_split(synthetic(1), 0.5)
  sub = ds.subset([7, 2])
  assert sub[0].rejected_ids.tolist() == ds[7].rejected_ids.tolist()
  assert sub.lengths.tolist() == ds.lengths[[7, 2]].tolist()
  ds.save(str(tmp_path / "cache.npz"))
  loaded = PreferenceDataset.load(str(tmp_path / "cache.npz"))
  assert loaded.fingerprint() == ds.fingerprint() and loaded.pad_id == 0


def test_global_order_depends_on_seed_and_epoch_only():
  a = global_order(100, seed=1, epoch=0)
  assert sorted(a.tolist()) == list(range(100))
  assert np.array_equal(a, global_order(100, seed=1, epoch=0))
  assert not np.array_equal(a, global_order(100, seed=1, epoch=1))
  assert not np.array_equal(a, global_order(100, seed=2, epoch=0))
  assert global_order(5, seed=1, epoch=3, shuffle=False).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n, gbs", [(37, 8), (8, 8), (5, 12)])
def test_process_slices_union_is_global_batch(n, gbs):
  for step in range(60):
    full = batch_indices(step, gbs, 0, 1, num_examples=n, seed=7)
    assert np.array_equal(full, global_batch_indices(step, gbs, n, seed=7))
    for count in (2, 4):
      parts = [batch_indices(step, gbs, p, count, num_examples=n, seed=7) for p in range(count)]
      assert np.array_equal(np.concatenate(parts), full)
  # Every epoch visits each example exactly once (batches straddle epochs).
  stream = np.concatenate([global_batch_indices(s, gbs, n, seed=7) for s in range(60)])
  for epoch in range(len(stream) // n):
    assert sorted(stream[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert np.array_equal(stream[epoch * n:(epoch + 1) * n], global_order(n, 7, epoch))
  assert not np.array_equal(stream, np.concatenate([global_batch_indices(s, gbs, n, seed=8) for s in range(60)]))
  with pytest.raises(DataError, match="train.global_batch_size: 8 is not divisible"):
    batch_indices(0, 8, 0, 3, num_examples=n, seed=7)


def test_pad_length():
  assert pad_length(70, 256, 64) == 128
  assert pad_length(64, 256, 64) == 64
  assert pad_length(250, 200, 64) == 200
  assert pad_length(5, 256, None) == 256
  assert pad_length(0, None, 8) == 8


def test_make_batch_layout():
  pairs = [TokenizedPair(np.array([5, 6], np.int32), np.array([7, 8, 9], np.int32), np.array([4], np.int32)),
           TokenizedPair(np.array([], np.int32), np.array([3, 2], np.int32), np.array([1, 1, 1], np.int32))]
  ds = PreferenceDataset.from_pairs(pairs, pad_id=99)
  b = make_batch(ds, [0, 1], 6)
  assert set(BATCH_ARRAY_KEYS) <= set(b)
  assert b["chosen_tokens"].tolist() == [[5, 6, 7, 8, 9, 99], [3, 2, 99, 99, 99, 99]]
  assert b["chosen_segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
  assert b["chosen_response_mask"].tolist() == [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]]
  assert b["rejected_tokens"].tolist() == [[5, 6, 4, 99, 99, 99], [1, 1, 1, 99, 99, 99]]
  assert b["rejected_response_mask"].tolist() == [[0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
  assert b["num_tokens"] == 5 + 2 + 3 + 3
  for key in BATCH_ARRAY_KEYS:
    assert b[key].dtype == np.int32
  with pytest.raises(ValueError, match="more than the padded length"):
    make_batch(ds, [0], 4)


def test_loader_bucketing_same_shape_on_every_process():
  ds = synthetic(40)
  loaders = [PreferenceLoader(ds, 8, seed=1, process_index=p, process_count=2, pad_multiple=4,
                              max_length=16, num_steps=30) for p in range(2)]
  single = PreferenceLoader(ds, 8, seed=1, pad_multiple=4, max_length=16, num_steps=30)
  shapes = set()
  for (s0, b0), (s1, b1), (s, full) in zip(*loaders, single):
    assert s0 == s1 == s
    g = global_batch_indices(s, 8, 40, seed=1)
    expected = min(16, math.ceil(ds.lengths[g].max() / 4) * 4)
    for key in BATCH_ARRAY_KEYS[:-1]:
      assert b0[key].shape == b1[key].shape == (4, expected)
      assert np.array_equal(np.concatenate([b0[key], b1[key]]), full[key])
    assert b0["num_tokens"] + b1["num_tokens"] == full["num_tokens"] == b0["global_num_tokens"]
    shapes.add(expected)
  assert s == 29 and len(shapes) > 1  # Bucketing produced several lengths, all equal across processes.
  assert loaders[0].position == 30
  fixed = PreferenceLoader(ds, 8, max_length=20)
  assert next(fixed)[1]["chosen_tokens"].shape == (8, 20)
  with pytest.raises(DataError, match="data.max_length: 4 is shorter"):
    PreferenceLoader(ds, 8, max_length=4)


def test_loader_resume_from_step():
  ds = synthetic(23)
  first = PreferenceLoader(ds, 4, seed=5, pad_multiple=8, num_steps=20)
  batches = {s: b for s, b in first}
  resumed = PreferenceLoader(ds, 4, seed=5, pad_multiple=8, start_step=13, num_steps=20)
  got = list(resumed)
  assert [s for s, _ in got] == list(range(13, 20))
  for s, b in got:
    for key in BATCH_ARRAY_KEYS:
      assert np.array_equal(b[key], batches[s][key])
  # On two processes the resumed global batch is the same.
  p1 = PreferenceLoader(ds, 4, seed=5, pad_multiple=8, start_step=13, process_index=1, process_count=2)
  step, b = next(p1)
  assert step == 13 and np.array_equal(b["chosen_tokens"], batches[13]["chosen_tokens"][2:])
  p1.seek(3)
  assert next(p1)[0] == 3


def test_loader_unshuffled_order():
  ds = synthetic(6)
  loader = PreferenceLoader(ds, 4, shuffle=False, max_length=20)
  order = []
  for _ in range(3):
    b = next(loader)[1]
    order.append([int(row[mask == 1][0]) - 2000 for row, mask in
                  zip(b["chosen_tokens"], b["chosen_response_mask"])])
  assert order == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
  assert [loader.batch_indices(s).tolist() for s in range(3)] == order


def test_eval_batches_cover_each_pair_once():
  ds = synthetic(11)
  seen = []
  for p in range(2):
    for b in eval_batches(ds, 4, process_index=p, process_count=2, pad_multiple=8):
      assert b["chosen_tokens"].shape[0] == 2
      for row in range(2):
        if b["pair_mask"][row]:
          seen.append(int(b["chosen_tokens"][row][b["chosen_response_mask"][row] == 1][0]) - 2000)
        else:
          assert b["chosen_segment_ids"][row].sum() == 0
  assert sorted(seen) == list(range(11))


def test_standard_workload_end_to_end(tmp_path, monkeypatch):
  import importlib.util
  import os
  import sys

  path = "/work/shared/bench/make_workload.py"
  if not os.path.isfile(path):
    pytest.skip("no standard workload script")
  try:
    spec = importlib.util.spec_from_file_location("make_workload_for_pipeline_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "torch", None)
    module.main(str(tmp_path), n_pairs=64)
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"make_workload.py failed: {e}")
  tok = load_tokenizer(str(tmp_path))
  ds = PreferenceDataset.from_files(str(tmp_path / "prefs.jsonl"), tok, max_length=256)
  assert len(ds) + ds.num_dropped_truncated == 64
  record = json.loads(open(tmp_path / "prefs.jsonl").readline())
  assert ds[0].prompt_ids.tolist() == tok.encode(record["prompt"])
  assert ds[0].chosen_ids.tolist() == tok.encode(record["chosen"]) + [2]
  step, batch = next(PreferenceLoader(ds, 8, max_length=256, pad_multiple=64))
  assert step == 0 and batch["chosen_tokens"].shape[0] == 8 and batch["chosen_tokens"].shape[1] % 64 == 0


def test_build_datasets_from_config(tmp_path, tok):
  """The one build_datasets (train's): files, eval files or a held-out split, else the synthetic set."""
  from artifex_dpo import config as config_lib

  util.write_jsonl(tmp_path / "train.jsonl", util.explicit_records(20) + ["{bad"])
  util.write_jsonl(tmp_path / "eval.jsonl", util.explicit_records(3, seed=1))
  config = config_lib.default_config()
  config.data.update(train_files=str(tmp_path / "train.jsonl"), max_length=64, max_prompt_length=32,
                     skip_invalid=True, eval_split=0.1, seed=0)
  train, held = util_build(config, tok, tmp_path / "run1")
  assert (len(train), len(held), train.num_skipped_invalid) == (18, 2, 1)
  config.data.eval_files = str(tmp_path / "eval.jsonl")
  train, held = util_build(config, tok, tmp_path / "run1")
  assert (len(train), len(held)) == (20, 3)
  config.data.update(train_files=str(tmp_path / "eval.jsonl"), eval_files=None, eval_split=0.0)
  train, held = util_build(config, tok, tmp_path / "run1")
  assert (len(train), held) == (3, None)
  config.data.update(train_files=None, synthetic_pairs=40, eval_split=0.1)  # the synthetic fallback
  train, held = util_build(config, tok, tmp_path / "run2")
  assert (len(train), len(held)) == (36, 4)
  assert (tmp_path / "run2" / "synthetic" / "train.jsonl").read_text().count("\n") == 40


def util_build(config, tok, workdir):
  from artifex_dpo.data import build_datasets

  return build_datasets(config, tok, str(workdir))
