"""The tokenized data cache: same pairs as a plain first pass, tokenized once, split over processes."""

import json
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


def _two_processes(monkeypatch, data, cache_dir):
  """load_or_tokenize on 'processes' 0 and 1 (threads; the barrier is a threading.Barrier)."""
  gate = threading.Barrier(2, timeout=60)
  monkeypatch.setattr(cache, "barrier", lambda name, n: gate.wait())
  monkeypatch.setattr(cache, "CHUNK", 4)
  tok = load_tokenizer("byte")
  out = [None, None]

  def run(p):
    try:
      out[p] = cache.load_or_tokenize(data, tok, cache_dir, process_index=p, process_count=2, **KW)
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
