"""Tests of artifex_dpo.data.sources and artifex_dpo.data.errors."""

from __future__ import annotations

import json
import pickle

import pytest

import test_data_util as util
from artifex_dpo.data import DataError, expand_files, read_records
from artifex_dpo.data.sources import read_records_lenient

RECORDS = [{"prompt": "p1", "chosen": "c1", "rejected": "r1"},
           {"prompt": "p2", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "r2"}]


def write_parquet(path, records):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=1)
  return str(path)


def write_array_record(path, payloads):
  module = pytest.importorskip("array_record.python.array_record_module")
  writer = module.ArrayRecordWriter(str(path), "group_size:1")
  for p in payloads:
    writer.write(p if isinstance(p, bytes) else json.dumps(p).encode())
  writer.close()
  return str(path)


def test_data_error_format():
  assert str(DataError("a.jsonl", 3, "bad", field="chosen")) == "a.jsonl:3: chosen: bad"
  assert str(DataError("a.jsonl", None, "empty\nfile")) == "a.jsonl: empty file"
  assert isinstance(DataError("f", 1, "x"), ValueError)
  again = pickle.loads(pickle.dumps(DataError("f", 2, "x", "prompt")))
  assert str(again) == "f:2: prompt: x" and again.line == 2


def test_expand_files(tmp_path):
  for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("{}\n")
  got = expand_files(f"{tmp_path}/*.jsonl, {tmp_path}/a.jsonl")
  assert got == [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl"]
  assert expand_files([f"{tmp_path}/**/*.jsonl"]) == sorted(
      [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl", f"{tmp_path}/sub/c.jsonl"])
  with pytest.raises(DataError, match=r"/nothing\*\.jsonl: no file matches this glob"):
    expand_files(f"{tmp_path}/*.jsonl,{tmp_path}/nothing*.jsonl")
  with pytest.raises(DataError, match="missing.jsonl: no such file"):
    expand_files(str(tmp_path / "missing.jsonl"))
  with pytest.raises(DataError, match="no data files"):
    expand_files(" , ")


def test_jsonl(tmp_path):
  path = util.write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], "", RECORDS[1]])
  assert list(read_records(path)) == [(1, RECORDS[0]), (3, RECORDS[1])]


def test_json_array_and_json_lines(tmp_path):
  path = tmp_path / "d.json"
  path.write_text(json.dumps(RECORDS))
  assert list(read_records(str(path))) == [(1, RECORDS[0]), (2, RECORDS[1])]
  path.write_text(json.dumps([RECORDS[0], 5]))
  with pytest.raises(DataError, match=r"d\.json:2: expected a JSON object, got a number"):
    list(read_records(str(path)))
  lines = util.write_jsonl(tmp_path / "e.json", RECORDS)
  assert [r for _, r in read_records(lines)] == RECORDS


def test_parquet(tmp_path):
  path = write_parquet(tmp_path / "d.parquet", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(5)])
  got = list(read_records(path))
  assert [n for n, _ in got] == [1, 2, 3, 4, 5]
  assert got[3][1] == {"prompt": "p3", "chosen": "c", "rejected": "r"}


def test_parquet_messages_round_trip(tmp_path):
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  path = write_parquet(tmp_path / "m.parquet", [{"chosen": messages, "rejected": messages}])
  assert list(read_records(path)) == [(1, {"chosen": messages, "rejected": messages})]


def test_array_record_and_format_override(tmp_path):
  path = write_array_record(tmp_path / "d.array_record", RECORDS)
  assert list(read_records(path)) == [(1, RECORDS[0]), (2, RECORDS[1])]
  other = tmp_path / "data.bin"
  (tmp_path / "d.array_record").rename(other)
  with pytest.raises(DataError, match="cannot tell the format"):
    list(read_records(str(other)))
  assert len(list(read_records(str(other), format="array_record"))) == 2
  jsonl = util.write_jsonl(tmp_path / "auto.jsonl", RECORDS)
  assert len(list(read_records(jsonl, format="auto"))) == 2  # config.py's default means "by extension".
  with pytest.raises(DataError, match="unknown data.format 'xml'"):
    list(read_records(str(other), format="xml"))


def test_array_record_bad_record(tmp_path):
  path = write_array_record(tmp_path / "d.array_record", [RECORDS[0], b"\x80\x03pickle", b"[1]"])
  with pytest.raises(DataError, match=r"d\.array_record:2: not valid UTF-8"):
    list(read_records(path))
  lenient = list(read_records_lenient(path))
  assert isinstance(lenient[1][1], DataError)
  assert str(lenient[2][1]).endswith("d.array_record:3: expected a JSON object, got an array")


def test_array_record_that_is_not_one_names_the_file(tmp_path):
  pytest.importorskip("array_record.python.array_record_module")
  junk = tmp_path / "junk.array_record"
  junk.write_bytes(b"this is not an ArrayRecord file")
  with pytest.raises(DataError, match=f"^{junk}: cannot read ArrayRecord: .*64KB"):
    list(read_records(str(junk)))
  with pytest.raises(DataError, match=f"^{tmp_path}/missing.array_record: cannot open: no such file$"):
    list(read_records(str(tmp_path / "missing.array_record")))


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        (['{"a": 1}', '{"a": '], 2, "malformed JSON"),
        (['{"a": 1}', "", "[1, 2]"], 3, "expected a JSON object, got an array"),
        (['"text"'], 1, "expected a JSON object, got a string"),
        (["null"], 1, "expected a JSON object, got null"),
        (["{'single': 'quotes'}"], 1, "malformed JSON"),
    ],
)
def test_jsonl_bad_lines(tmp_path, lines, line_no, message):
  path = util.write_jsonl(tmp_path / "bad.jsonl", lines)
  with pytest.raises(DataError) as info:
    list(read_records(path))
  assert str(info.value).startswith(f"{path}:{line_no}: {message}")


def test_bad_utf8_and_empty_files(tmp_path):
  path = tmp_path / "u.jsonl"
  path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
  with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
    list(read_records(str(path)))
  empty = tmp_path / "e.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(DataError, match=r"e\.jsonl: empty file \(no records\)$"):
    list(read_records(str(empty)))
  empty_parquet = write_parquet(tmp_path / "e.parquet", [])
  with pytest.raises(DataError, match=r"e\.parquet: "):
    list(read_records(empty_parquet))
  bad_parquet = tmp_path / "bad.parquet"
  bad_parquet.write_bytes(b"not parquet at all")
  with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
    list(read_records(str(bad_parquet)))
