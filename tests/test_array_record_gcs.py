"""ArrayRecord training data read straight from a (real, emulated) GCS bucket, without a FUSE mount."""

import json
import os
import tempfile

import numpy as np
import pytest

from artifex_dpo import storage
from artifex_dpo.data import DataError, PreferenceDataset, load_tokenizer
from artifex_dpo.data import cache
from artifex_dpo.data.sources import expand_files, read_records_lenient
from artifex_dpo.data.synthetic import synthetic_records
from gcs import gcs_emulator  # noqa: F401  (fixture)

array_record_module = pytest.importorskip("array_record.python.array_record_module")

KW = dict(max_length=40, max_prompt_length=20, truncation_mode="keep_end")


def _write(local_path, payloads, group_size=16):
  writer = array_record_module.ArrayRecordWriter(str(local_path), f"group_size:{group_size}")
  for p in payloads:
    writer.write(p if isinstance(p, bytes) else json.dumps(p).encode())
  writer.close()
  return str(local_path)


def _upload(local_path, uri):
  with open(local_path, "rb") as f:
    storage.write_bytes(uri, f.read())
  return uri


def _pairs(ds):
  return [tuple(np.asarray(x).tolist() for x in (p.prompt_ids, p.chosen_ids, p.rejected_ids))
          for p in map(ds.__getitem__, range(len(ds)))]


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
  """``tempfile``'s folder for this test only, to see that no temporary copy is left behind."""
  folder = tmp_path / "tmpdir"
  folder.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  return folder


def test_a_bucket_glob_gives_the_same_dataset_as_the_local_files(gcs_emulator, tmp_path, private_tmp, monkeypatch):
  local_dir = tmp_path / "local"
  local_dir.mkdir()
  records = synthetic_records(70, seed=3)
  _write(local_dir / "a.array_record", records[:40])
  _write(local_dir / "b.array_record", records[40:])
  bucket = gcs_emulator.fresh("ar")
  for name in ("a.array_record", "b.array_record"):
    _upload(local_dir / name, storage.join(bucket, "data", name))
  storage.write_text(storage.join(bucket, "data", "notes.txt"), "not data")
  tok = load_tokenizer("byte")

  # The glob expands on the bucket, to the .array_record objects only.
  assert expand_files(storage.join(bucket, "data", "*.array_record")) == [
      storage.join(bucket, "data", "a.array_record"), storage.join(bucket, "data", "b.array_record")]

  # A plain first pass: the same tokens, offsets and fingerprint as from the local files.
  local = PreferenceDataset.from_files(f"{local_dir}/*.array_record", tok, **KW)
  remote = PreferenceDataset.from_files(storage.join(bucket, "data", "*.array_record"), tok, **KW)
  assert len(remote) == len(local) == 70
  np.testing.assert_array_equal(remote.tokens, local.tokens)
  np.testing.assert_array_equal(remote.offsets, local.offsets)
  assert remote.fingerprint() == local.fingerprint()

  # The tokenize-once cache (in the bucket too): the same pairs and content fingerprint; a restart
  # tokenizes nothing and downloads nothing.
  cached_local = cache.load_or_tokenize(f"{local_dir}/*.array_record", tok, str(tmp_path / "cache"), **KW)
  cached = cache.load_or_tokenize(storage.join(bucket, "data", "*.array_record"), tok,
                                  storage.join(bucket, "cache"), **KW)
  assert _pairs(cached) == _pairs(local)
  assert cached.fingerprint() == cached_local.fingerprint()
  monkeypatch.setattr(storage, "local_file", lambda *a, **k: pytest.fail("downloaded again"))
  again = cache.load_or_tokenize(storage.join(bucket, "data", "*.array_record"), tok,
                                 storage.join(bucket, "cache"), **KW)
  assert again.fingerprint() == cached.fingerprint()
  assert os.listdir(private_tmp) == []  # the temporary copies are gone


def test_a_bad_record_on_the_bucket_names_the_object_and_record(gcs_emulator, tmp_path, private_tmp):
  good = synthetic_records(3, seed=1)
  local = _write(tmp_path / "bad.array_record", [good[0], good[1], b"\x80\x03pickle", b"[1]", good[2]])
  uri = _upload(local, storage.join(gcs_emulator.fresh("ar"), "bad.array_record"))
  tok = load_tokenizer("byte")
  with pytest.raises(DataError) as e:
    PreferenceDataset.from_files(uri, tok, **KW)
  assert str(e.value) == f"{uri}:3: not valid UTF-8 (invalid start byte at byte 0)"
  lenient = list(read_records_lenient(uri))
  assert [n for n, _ in lenient] == [1, 2, 3, 4, 5]
  assert str(lenient[3][1]) == f"{uri}:4: expected a JSON object, got an array"
  skipped = PreferenceDataset.from_files(uri, tok, skip_invalid=True, **KW)
  assert len(skipped) == 3 and skipped.num_skipped_invalid == 2
  assert os.listdir(private_tmp) == []  # also after an error stopped the reading midway


def test_bucket_file_errors_name_the_object(gcs_emulator, tmp_path, private_tmp):
  root = gcs_emulator.fresh("ar")
  missing = storage.join(root, "missing.array_record")
  with pytest.raises(DataError, match=f"^{missing}: cannot open: no such file$"):
    list(read_records_lenient(missing))
  junk = storage.join(root, "junk.array_record")
  storage.write_bytes(junk, b"this is not an ArrayRecord file")
  with pytest.raises(DataError) as e:
    list(read_records_lenient(junk))
  message = str(e.value)
  assert message.startswith(f"{junk}: cannot read ArrayRecord: ") and "\n" not in message
  assert str(private_tmp) not in message  # the user's name for the file, not the temporary copy's
  empty = _upload(_write(tmp_path / "empty.array_record", []), storage.join(root, "empty.array_record"))
  with pytest.raises(DataError, match=f"^{empty}: empty file"):
    list(read_records_lenient(empty))
  assert os.listdir(private_tmp) == []


def test_two_processes_each_read_and_parse_only_their_records(gcs_emulator, tmp_path, private_tmp, monkeypatch):
  import threading

  from artifex_dpo.data import sources

  records = synthetic_records(30, seed=6)
  payloads = [json.dumps(r).encode() for r in records]
  payloads[3] = b"{not json"  # process 0's chunk (records 1-4)
  payloads[5] = b'"a string"'  # process 1's chunk (records 5-8)
  local = _write(tmp_path / "train.array_record", payloads, group_size=1)
  uri = _upload(local, storage.join(gcs_emulator.fresh("ar"), "train.array_record"))
  tok = load_tokenizer("byte")
  expected = PreferenceDataset.from_files(local, tok, skip_invalid=True, **KW)
  parsed, read = [], []
  real_parse, real_reader = sources._parse_or_error, array_record_module.ArrayRecordReader

  class CountingReader:
    def __init__(self, *a, **k):
      self._reader = real_reader(*a, **k)

    def read(self, *a):
      out = self._reader.read(*a)
      read.append(len(out))
      return out

    def __getattr__(self, name):
      return getattr(self._reader, name)

  monkeypatch.setattr(sources, "_parse_or_error", lambda *a: parsed.append(a[1]) or real_parse(*a))
  monkeypatch.setattr(array_record_module, "ArrayRecordReader", CountingReader)
  monkeypatch.setattr(sources, "_ARRAY_RECORD_CHUNK", 4)  # windows of the cache's chunk size
  gate = threading.Barrier(2, timeout=60)
  monkeypatch.setattr(cache, "barrier", lambda name, n: gate.wait())
  monkeypatch.setattr(cache, "CHUNK", 4)
  out, cache_dir = [None, None], gcs_emulator.fresh("cache")

  def run(p):
    out[p] = cache.load_or_tokenize(uri, tok, cache_dir, process_index=p,
                                    process_count=2, skip_invalid=True, **KW)

  threads = [threading.Thread(target=run, args=(p,)) for p in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  a, b = out
  assert _pairs(a) == _pairs(b) == _pairs(expected)
  for name in PreferenceDataset.COUNTERS:
    assert getattr(a, name) == getattr(expected, name), name
  assert a.skipped_messages[0] == f"{uri}:4: malformed JSON: Expecting property name enclosed in double quotes " \
                                  "(column 2)"
  assert sorted(parsed) == list(range(1, 31))  # each record parsed once, by one of the two processes
  assert sum(read) == 30  # and read (decompressed) once
  assert os.listdir(private_tmp) == []
