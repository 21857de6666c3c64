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


_KILLED_DURING_SAVE = """
import os, signal, sys
import jax
from flax import nnx
from artifex_dpo.checkpoint import Checkpointer
state = nnx.state(nnx.Linear(1024, 1024, rngs=nnx.Rngs(0)))
c = Checkpointer(sys.argv[1], max_to_keep=5, async_save=True)
c.save(1, state, {"step": 1})
c.wait()
c.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})  # in the background
# Kill as soon as step 2 has objects in the bucket, saying whether Orbax had committed it by then.
from artifex_dpo import storage
while not any(n.startswith("2") for n in storage.listdir(sys.argv[1])):
  pass
print("committed" if storage.exists(storage.join(sys.argv[1], "2", "commit_success.txt")) else "partial", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_async_save_to_bucket_resumes_from_last_complete(gcs_emulator):
  import subprocess
  import sys

  import jax
  import numpy as np
  from flax import nnx

  from artifex_dpo.checkpoint import Checkpointer

  directory = storage.join(gcs_emulator.fresh("ckpt"), "checkpoints")
  proc = subprocess.run([sys.executable, "-c", _KILLED_DURING_SAVE, directory], capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert proc.stdout.strip() == "partial", proc.stdout  # killed mid-save, not after it
  assert "2" in storage.listdir(directory)  # its debris is in the bucket
  state = nnx.state(nnx.Linear(1024, 1024, rngs=nnx.Rngs(0)))
  c = Checkpointer(directory, max_to_keep=5, async_save=True)
  assert c.latest_step() == 1
  restored = c.restore(1, state, jax.tree.map(lambda x: x.sharding, state))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.save(2, state, {"step": 2})  # and the run goes on saving over the debris
  c.close()
  assert Checkpointer(directory, max_to_keep=5, async_save=True).latest_step() == 2


def test_safetensors_in_a_bucket_are_read_by_byte_range(gcs_emulator, monkeypatch):
  """A slice of a tensor in a bucket reads its rows' bytes only, and equals the local read."""
  import numpy as np
  from safetensors.numpy import save

  from artifex_dpo.models.hf_layout import SINGLE_FILE
  from artifex_dpo.models.hf_read import CheckpointReader

  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((64, 48)).astype(np.float32), "b": rng.standard_normal((8,)).astype(np.float32)}
  folder = gcs_emulator.fresh("st")
  storage.write_bytes(storage.join(folder, SINGLE_FILE), save(tensors))
  ranges = []
  real = storage.read_range
  monkeypatch.setattr(storage, "read_range", lambda p, a, b: ranges.append(b - a) or real(p, a, b))
  reader = CheckpointReader(folder)
  assert reader.shape("a") == (64, 48)
  ranges.clear()
  got = reader.read("a", (slice(16, 24), slice(8, 40)))
  np.testing.assert_array_equal(got, tensors["a"][16:24, 8:40])
  assert ranges == [8 * 48 * 4]  # rows 16..23 only, one ranged GET
  np.testing.assert_array_equal(reader.read("b", (slice(None),)), tensors["b"])


def test_workdir_lease_compare_and_swap_has_one_winner(root):
  """The lease's backend (a local file, or a bucket object with generation preconditions) swaps atomically."""
  from artifex_dpo.lease import Lease, LeaseError, backend_for

  storage.makedirs(root)
  path = storage.join(root, "lease.json")
  backend = backend_for(path)
  assert backend.read() is None
  assert backend.write_if({"host": "a", "pid": 1}, None) == 1
  assert backend.write_if({"host": "b", "pid": 2}, None) is None  # it exists now: creating again loses
  assert backend.write_if({"host": "c", "pid": 3}, 1) == 2
  assert backend.write_if({"host": "d", "pid": 4}, 1) is None  # a stale generation loses
  assert backend.read()[0]["host"] == "c"
  assert not backend.delete_if(1) and backend.delete_if(2) and backend.read() is None
  if hasattr(backend, "_read"):  # the bucket: the store's precondition, not our read, decides a race
    assert backend.write_if({"host": "e", "pid": 5}, None) == 1
    seen = backend._read()  # both writers read generation 1; the other one writes first
    assert backend.write_if({"host": "f", "pid": 6}, 1) == 2
    backend._read = lambda: seen
    assert backend.write_if({"host": "g", "pid": 7}, 1) is None
    assert not backend.delete_if(1)
    del backend._read
    assert backend.read()[0]["host"] == "f" and backend.delete_if(2)
  # A live run of this host (here: our parent process) holds it: a new run is refused at once, naming it.
  import socket

  from artifex_dpo.lease import _process_start

  holder = {"host": socket.gethostname(), "pid": os.getppid(), "pid_start": _process_start(os.getppid()),
            "start_time": "T"}
  assert backend.write_if(holder, None) == 1
  with pytest.raises(LeaseError, match=f"in use by a live run: host .* pid {os.getppid()} \\(started T\\)"):
    Lease(path, timeout_s=60).acquire()
  # Its holder gone (a pid that is not running), the lease is taken over and released at the end.
  assert backend.write_if(dict(holder, pid=2**22 + 7, pid_start=None), 1) == 2
  lease = Lease(path, timeout_s=60)
  lease.acquire()
  assert backend.read()[0]["pid"] == os.getpid()
  lease.release()
  assert backend.read() is None


def test_config_validation_takes_inputs_on_a_bucket(tmp_path):
  """Every input may be a ``gs://`` path (checked when read, not by the config check); local ones are checked."""
  from artifex_dpo import config as config_lib

  c = config_lib.default_config()
  c.model.hf_checkpoint = "gs://b/models/llama"
  c.data.train_files = "gs://b/data/*.array_record"
  c.data.eval_files = "gs://b/data/eval.jsonl"
  c.data.tokenizer = "gs://b/models/llama"
  config_lib.validate(c)
  c.data.tokenizer = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match="config key data.tokenizer: .*does not exist"):
    config_lib.validate(c)


def test_staged_write_and_local_file(root, tmp_path, monkeypatch):
  """A local temporary file to write a target through (atomic) and to read a remote file from; none is left."""
  import tempfile

  tmp_dir = tmp_path / "tmp"
  tmp_dir.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_dir))
  target = storage.join(root, "d", "x.bin")
  with storage.staged_write(target) as local:
    with open(local, "wb") as f:
      f.write(b"first")
    assert not storage.exists(target)  # nothing visible before the end
  assert storage.read_bytes(target) == b"first"
  with pytest.raises(RuntimeError, match="cut short"):
    with storage.staged_write(target) as local:
      with open(local, "wb") as f:
        f.write(b"half")
      raise RuntimeError("cut short")
  assert storage.read_bytes(target) == b"first"  # the earlier file, untouched
  with storage.local_file(target) as local:
    assert not storage.is_remote(local)
    with open(local, "rb") as f:
      assert f.read() == b"first"
  assert os.listdir(tmp_dir) == [] and [n for n in storage.listdir(storage.join(root, "d"))] == ["x.bin"]
