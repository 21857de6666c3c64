"""The storage layer behaves alike on local disk and on a (real, emulated) GCS bucket."""

import os

import pytest

from artifex_dpo import storage
from gcs import gcs_emulator  # noqa: F401  (fixture)


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" folder would appear here
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_emulator").fresh("storage")


def test_files_round_trip(root):
  f = storage.join(root, "a", "b.txt")
  assert not storage.exists(f)
  storage.makedirs(storage.dirname(f))
  storage.write_text(f, "hello\n")
  assert storage.read_text(f) == "hello\n" and storage.isfile(f) and storage.isdir(storage.join(root, "a"))
  # Appending adds bytes without losing earlier ones (on a bucket: GCS compose of a part object).
  storage.append(f, b"world\n")
  storage.append(f, b"!\n")
  assert storage.read_text(f) == "hello\nworld\n!\n"
  assert storage.listdir(storage.join(root, "a")) == ["b.txt"]  # no part objects left behind
  assert storage.read_range(f, 6, 11) == b"world"
  path, size, version = storage.identity(f)
  assert size == 14
  storage.write_text(f, "changed")
  assert storage.identity(f)[2] != version
  storage.write_bytes(storage.join(root, "a", "c.bin"), b"\x00\x01")
  assert storage.glob(storage.join(root, "*", "*.bin")) == [storage.join(root, "a", "c.bin")]
  storage.rename(storage.join(root, "a"), storage.join(root, "z"))
  assert storage.listdir(storage.join(root, "z")) == ["b.txt", "c.bin"] and not storage.exists(f)
  storage.remove(storage.join(root, "z"), recursive=True)
  assert not storage.exists(storage.join(root, "z", "b.txt"))
  assert not os.path.exists("gs:")
