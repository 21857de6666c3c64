"""PreferenceDataset.save / load: from the tokenize-once cache (tokens read on demand), locally and on a bucket."""

import json
import os
import tempfile

import numpy as np
import pytest

from artifex_dpo import storage
from artifex_dpo.data import DataError, PreferenceDataset, load_tokenizer
from artifex_dpo.data import cache
from artifex_dpo.data import dataset as dataset_module
from artifex_dpo.data.synthetic import synthetic_records
from gcs import gcs_emulator  # noqa: F401  (fixture)

KW = dict(max_length=40, max_prompt_length=20, truncation_mode="keep_end")


@pytest.fixture(params=["local", "gs"])
def where(request, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" folder would appear here
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # temporary copies: none may be left
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_emulator").fresh("save")


def _pairs(ds):
  return [tuple(np.asarray(x).tolist() for x in (p.prompt_ids, p.chosen_ids, p.rejected_ids))
          for p in map(ds.__getitem__, range(len(ds)))]


class _Recorder:
  """Wraps a TokenStore: records the size of every read (a whole-buffer read or a per-token one shows)."""

  def __init__(self, store):
    self.store, self.reads = store, []
    self.fingerprint = store.fingerprint

  def __len__(self):
    return len(self.store)

  def __getitem__(self, key):
    out = self.store[key]
    self.reads.append(np.size(out))
    return out


def _cached(where):
  records = synthetic_records(60, seed=2)
  lines = [json.dumps(r) for r in records]
  lines[4] = '{"prompt": "x", "chosen": 3}'  # skipped: counted, its message kept
  data = storage.join(where, "train.jsonl")
  storage.write_text(data, "\n".join(lines) + "\n")
  tok = load_tokenizer("byte")
  plain = PreferenceDataset.from_files(data, tok, skip_invalid=True, **KW)
  ds = cache.load_or_tokenize(data, tok, storage.join(where, "cache"), skip_invalid=True, **KW)
  assert not isinstance(ds.tokens, np.ndarray) and _pairs(ds) == _pairs(plain)
  return ds, plain


def test_a_cached_dataset_saves_and_loads_the_same_pairs_counters_and_fingerprint(where, tmp_path, monkeypatch):
  ds, plain = _cached(where)
  monkeypatch.setattr(dataset_module, "_SAVE_PAIRS", 8)
  ds.tokens = _Recorder(ds.tokens)
  path = storage.join(where, "out", "train.npz")
  ds.save(path)
  # Read range by range, a block of 8 pairs at a time: never the whole buffer, never token by token.
  assert len(ds.tokens.reads) == -(-len(ds) // 8) and max(ds.tokens.reads) < len(ds.tokens) // 4
  loaded = PreferenceDataset.load(path)
  assert isinstance(loaded.tokens, np.ndarray)
  assert len(loaded.tokens) == int((ds.offsets[:, 3] - ds.offsets[:, 0]).sum())
  assert _pairs(loaded) == _pairs(plain)
  assert loaded.fingerprint() == ds.fingerprint()
  for name in PreferenceDataset.COUNTERS:
    assert getattr(loaded, name) == getattr(plain, name), name
  assert loaded.num_skipped_invalid == 1 and loaded.skipped_messages == plain.skipped_messages
  assert loaded.skipped_messages[0].endswith("train.jsonl:5: chosen: expected a string, got int")
  assert [n for n in os.listdir(tmp_path) if n.startswith((".artifex-", "artifex-"))] == []


def test_a_subset_of_a_cached_dataset_saves_only_its_own_tokens(where):
  ds, _ = _cached(where)
  sub = ds.subset([7, 2, 30])
  path = storage.join(where, "sub.npz")
  sub.save(path)
  loaded = PreferenceDataset.load(path)
  assert _pairs(loaded) == _pairs(sub) and loaded.fingerprint() == sub.fingerprint()
  assert len(loaded.tokens) == sum(len(x) for p in _pairs(sub) for x in p)


def test_a_save_cut_short_leaves_the_earlier_file(where, tmp_path, monkeypatch):
  ds, _ = _cached(where)
  path = storage.join(where, "train.npz")
  ds.save(path)
  before = storage.read_bytes(path)
  monkeypatch.setattr(dataset_module, "_SAVE_PAIRS", 8)
  store, calls = ds.tokens, []

  class Failing(_Recorder):
    def __getitem__(self, key):
      calls.append(1)
      if len(calls) == 3:
        raise OSError("disk full")
      return store[key]

  ds.tokens = Failing(store)
  with pytest.raises(OSError, match="disk full"):
    ds.save(path)
  assert storage.read_bytes(path) == before  # complete or absent, never half-written
  assert [n for n in os.listdir(tmp_path) if n.startswith((".artifex-", "artifex-"))] == []
  assert [n for n in storage.listdir(storage.dirname(path)) if "artifex" in n] == []


def test_load_of_a_bad_file_names_it(where):
  junk = storage.join(where, "junk.npz")
  storage.write_bytes(junk, b"not a zip file")
  with pytest.raises(DataError, match=f"^{junk}: not a saved preference dataset: "):
    PreferenceDataset.load(junk)
  missing = storage.join(where, "missing.npz")
  with pytest.raises(DataError, match=f"^{missing}: cannot open: no such file$"):
    PreferenceDataset.load(missing)
