"""The tokenized data cache: same pairs as a plain first pass, tokenized once, split over processes."""

import json
import os
import threading

import numpy as np
import pytest

from artifex_dpo import storage
from artifex_dpo.data import PreferenceDataset, load_tokenizer
from artifex_dpo.data import cache
from artifex_dpo.data.synthetic import synthetic_records
from gcs import gcs_emulator  # noqa: F401  (fixture)

KW = dict(max_length=40, max_prompt_length=20, truncation_mode="keep_end")


def _write(path, records, bad_line=None):
  lines = [json.dumps(r) for r in records]
  if bad_line is not None:
    lines[bad_line - 1] = '{"prompt": "x", "chosen": 3}'
  storage.write_text(str(path), "\n".join(lines) + "\n")


def _pairs(ds):
  return [tuple(np.asarray(x).tolist() for x in (p.prompt_ids, p.chosen_ids, p.rejected_ids)) for p in map(ds.__getitem__, range(len(ds)))]


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  return request.getfixturevalue("gcs_emulator").fresh("cache")


def test_cache_matches_a_plain_pass_and_is_used_on_restart(where, monkeypatch):
  tok = load_tokenizer("byte")
  data = storage.join(where, "train.jsonl")
  _write(data, synthetic_records(50, seed=1) + [{"prompt": "p", "chosen": " same", "rejected": " same"}])
  expected = PreferenceDataset.from_files(data, tok, **KW)
  ds = cache.load_or_tokenize(data, tok, storage.join(where, "cache"), **KW)
  assert not isinstance(ds.tokens, np.ndarray)  # tokens are read on demand, not held
  assert _pairs(ds) == _pairs(expected)
  assert expected.num_identical_pairs == 1 and expected.num_truncated_prompts > 0
  for name in PreferenceDataset.COUNTERS:  # the same counters as a plain pass
    assert getattr(ds, name) == getattr(expected, name), name
  # A restart tokenizes nothing.
  monkeypatch.setattr(cache, "tokenize_pairs", lambda *a: pytest.fail("tokenized again"))
  again = cache.load_or_tokenize(data, tok, storage.join(where, "cache"), **KW)
  assert _pairs(again) == _pairs(expected) and again.fingerprint() == ds.fingerprint()
  # A changed file changes the key.
  _write(data, synthetic_records(51, seed=1))
  with pytest.raises(pytest.fail.Exception, match="tokenized again"):
    cache.load_or_tokenize(data, tok, storage.join(where, "cache"), **KW)


def _two_processes(monkeypatch, data, cache_dir, **kw):
  """load_or_tokenize (with ``kw``) on 'processes' 0 and 1 (threads; the barrier is a threading.Barrier).

  Returns each process's dataset, or the exception it raised.
  """
  gate = threading.Barrier(2, timeout=60)
  monkeypatch.setattr(cache, "barrier", lambda name, n: gate.wait())
  monkeypatch.setattr(cache, "CHUNK", 4)
  tok = load_tokenizer("byte")
  out = [None, None]

  def run(p):
    try:
      out[p] = cache.load_or_tokenize(data, tok, cache_dir, process_index=p, process_count=2, **KW, **kw)
    except Exception as e:  # noqa: BLE001
      out[p] = e

  threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out


def test_two_processes_each_tokenize_half(tmp_path, monkeypatch):
  data = str(tmp_path / "train.jsonl")
  _write(data, synthetic_records(37, seed=2))
  calls = []
  real = cache.tokenize_pairs
  monkeypatch.setattr(cache, "tokenize_pairs", lambda texts, tok: calls.append(len(texts)) or real(texts, tok))
  a, b = _two_processes(monkeypatch, data, str(tmp_path / "cache"))
  expected = PreferenceDataset.from_files(data, load_tokenizer("byte"), **KW)
  assert _pairs(a) == _pairs(b) == _pairs(expected)
  assert sum(calls) == 37
  metas = [json.loads(p.read_text()) for p in sorted((tmp_path / "cache").glob("*/part-*.json"))]
  assert [sum(m["pairs_per_chunk"]) + m["dropped"] for m in metas] == [20, 17]  # chunks of 4, dealt out


def test_bad_record_stops_both_processes_naming_file_and_line(tmp_path, monkeypatch):
  data = str(tmp_path / "train.jsonl")
  _write(data, synthetic_records(20, seed=3), bad_line=6)  # in process 1's chunk (records 5..8)
  a, b = _two_processes(monkeypatch, data, str(tmp_path / "cache"))
  for e in (a, b):
    assert isinstance(e, Exception) and str(e).startswith(f"{data}:6: ") and "chosen" in str(e), e


def test_fingerprint_is_the_content_not_the_path_or_the_process_count(tmp_path, monkeypatch):
  # A copied workdir (another path to the same data) or another process count must resume; other data must not.
  records = synthetic_records(37, seed=2)
  a, b = str(tmp_path / "a" / "train.jsonl"), str(tmp_path / "b" / "train.jsonl")
  _write(a, records)
  _write(b, records)
  monkeypatch.setattr(cache, "CHUNK", 4)
  one = cache.load_or_tokenize(a, load_tokenizer("byte"), str(tmp_path / "a" / "cache"), **KW)
  c = str(tmp_path / "c" / "train.jsonl")
  _write(c, records[:-1] + [dict(records[-1], chosen=records[-1]["chosen"] + "x")])
  other = cache.load_or_tokenize(c, load_tokenizer("byte"), str(tmp_path / "c" / "cache"), **KW)
  two, _ = _two_processes(monkeypatch, b, str(tmp_path / "b" / "cache"))
  assert one.fingerprint() == two.fingerprint()
  assert other.fingerprint() != one.fingerprint()


def _set_completed_at(cache_dir, key, when):
  path = storage.join(cache_dir, key, "index.json")
  index = json.loads(storage.read_text(path))
  storage.write_text(path, json.dumps(dict(index, completed_at=when)))


def test_stale_keys_are_removed_but_not_ours_newer_or_incomplete_ones(where, monkeypatch):
  tok = load_tokenizer("byte")
  cache_dir = storage.join(where, "cache")
  train, evals = storage.join(where, "train.jsonl"), storage.join(where, "eval.jsonl")
  _write(train, synthetic_records(20, seed=4))
  _write(evals, synthetic_records(8, seed=5))
  old = cache.load_or_tokenize(train, tok, cache_dir, **KW).cache_key
  ev = cache.load_or_tokenize(evals, tok, cache_dir, **KW).cache_key  # the eval set's key: unchanged data
  _write(train, synthetic_records(21, seed=4))  # changed training data: a new key
  new_ds = cache.load_or_tokenize(train, tok, cache_dir, **KW)
  new = new_ds.cache_key
  assert len({old, ev, new}) == 3
  # Another job's newer key (completed after every key we read), an older one completed between our two
  # keys (an earlier eval set, say), and a key being written (no index yet).
  newer, between, writing = "a" * 20, "c" * 20, "b" * 20
  for key in (newer, between):
    for name in ("index.json", "part-00000-of-00001.json"):
      storage.write_bytes(storage.join(cache_dir, key, name), storage.read_bytes(storage.join(cache_dir, new, name)))
  storage.write_text(storage.join(cache_dir, writing, "part-00000-of-00002.json"), "{}")
  storage.write_text(storage.join(cache_dir, "notes.txt"), "not a key")
  for key, when in ((old, 100.0), (ev, 200.0), (between, 250.0), (new, 300.0), (newer, 350.0)):
    _set_completed_at(cache_dir, key, when)
  stale_tmp = None
  if not storage.is_remote(where):  # a part writer killed mid-write left its temporary file
    stale_tmp = storage.join(cache_dir, new, "part-00000-of-00001.tokens.tmp-deadbeef")
    fresh_tmp = storage.join(cache_dir, new, "part-00000-of-00001.tokens.tmp-0123abcd")
    for p in (stale_tmp, fresh_tmp):
      storage.write_text(p, "x")
    os.utime(stale_tmp, (0, 0))
  before = set(storage.listdir(cache_dir))
  assert cache.remove_stale_keys(cache_dir, [new, ev], process_index=1) == []  # only process 0 deletes
  assert set(storage.listdir(cache_dir)) == before
  assert sorted(cache.remove_stale_keys(cache_dir, [new, ev])) == sorted([old, between])
  assert set(storage.listdir(cache_dir)) == before - {old, between}
  assert not storage.exists(storage.join(cache_dir, old, "index.json"))
  if stale_tmp:
    assert not storage.exists(stale_tmp) and storage.exists(fresh_tmp)
  # What we keep still loads without tokenizing.
  monkeypatch.setattr(cache, "tokenize_pairs", lambda *a: pytest.fail("tokenized again"))
  assert _pairs(cache.load_or_tokenize(train, tok, cache_dir, **KW)) == _pairs(new_ds)
  cache.load_or_tokenize(evals, tok, cache_dir, **KW)
  # A key of ours that is not complete: nothing is removed.
  assert cache.remove_stale_keys(cache_dir, [new, writing]) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lines_of_other_processes_are_counted_not_parsed(tmp_path, monkeypatch, suffix):
  # Each process JSON-decodes only its own lines; line numbers (byte order mark, blank and whitespace
  # lines skipped), skipped records and counters stay those of a plain pass over every line.
  lines = [json.dumps(r) for r in synthetic_records(30, seed=6)]
  lines[0] = "\ufeff" + lines[0]
  lines[3] = "{not json"  # process 0's chunk (records 1-4)
  lines[5] = '"a string"'  # process 1's chunk (records 5-8)
  lines.insert(6, "")
  lines.insert(12, "  \t ")
  data = tmp_path / f"train{suffix}"
  data.write_text("\n".join(lines) + "\n", encoding="utf-8")
  expected = PreferenceDataset.from_files(str(data), load_tokenizer("byte"), skip_invalid=True, **KW)
  parsed = []
  real = cache._parse_or_error
  monkeypatch.setattr(cache, "_parse_or_error", lambda *a: parsed.append(a[1]) or real(*a))
  a, b = _two_processes(monkeypatch, str(data), str(tmp_path / "cache"), skip_invalid=True)
  assert _pairs(a) == _pairs(b) == _pairs(expected)
  for name in PreferenceDataset.COUNTERS:
    assert getattr(a, name) == getattr(expected, name), name
  assert a.skipped_messages == expected.skipped_messages and len(a.skipped_messages) == 2
  assert a.skipped_messages[0].startswith(f"{data}:4: ")
  assert len(parsed) == 30  # each line decoded once, by one of the two processes


def test_a_run_removes_the_caches_of_its_earlier_data(tmp_path):
  # build_datasets (the service's first pass) keeps the keys it reads (training and eval sets) and
  # removes the earlier training data's key.
  from artifex_dpo.config import default_config
  from artifex_dpo.data import build_datasets

  train, evals = str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
  _write(train, synthetic_records(20, seed=7))
  _write(evals, synthetic_records(8, seed=8))
  c = default_config()
  c.data.train_files, c.data.eval_files = train, evals
  tok = load_tokenizer("byte")
  workdir = str(tmp_path / "w")
  first = build_datasets(c, tok, workdir)
  _write(train, synthetic_records(21, seed=7))
  second = build_datasets(c, tok, workdir)
  assert first[1].cache_key == second[1].cache_key != second[0].cache_key != first[0].cache_key
  assert storage.listdir(storage.join(workdir, "data_cache")) == sorted([second[0].cache_key, second[1].cache_key])


def test_a_first_run_cut_short_leaves_no_part_behind(tmp_path, monkeypatch):
  # The tokens stream into a temporary file: a failure (or SIGTERM) mid-way removes it, and the key stays
  # incomplete (no part marker, no index), so the next run tokenizes it again.
  data = str(tmp_path / "train.jsonl")
  _write(data, synthetic_records(12, seed=9))
  monkeypatch.setattr(cache, "CHUNK", 4)
  real, calls = cache.tokenize_pairs, []

  def fail_on_the_second_chunk(texts, tok):
    calls.append(len(texts))
    if len(calls) == 2:
      raise KeyboardInterrupt
    return real(texts, tok)

  monkeypatch.setattr(cache, "tokenize_pairs", fail_on_the_second_chunk)
  with pytest.raises(KeyboardInterrupt):
    cache.load_or_tokenize(data, load_tokenizer("byte"), str(tmp_path / "cache"), **KW)
  (key,) = storage.listdir(str(tmp_path / "cache"))
  assert storage.listdir(str(tmp_path / "cache" / key)) == []
  monkeypatch.setattr(cache, "tokenize_pairs", real)
  ds = cache.load_or_tokenize(data, load_tokenizer("byte"), str(tmp_path / "cache"), **KW)
  assert _pairs(ds) == _pairs(PreferenceDataset.from_files(data, load_tokenizer("byte"), **KW))
