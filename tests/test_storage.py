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

  from artifex_dpo.models import hf

  rng = np.random.default_rng(0)
  tensors = {"a": rng.standard_normal((64, 48)).astype(np.float32), "b": rng.standard_normal((8,)).astype(np.float32)}
  folder = gcs_emulator.fresh("st")
  storage.write_bytes(storage.join(folder, hf.SINGLE_FILE), save(tensors))
  ranges = []
  real = storage.read_range
  monkeypatch.setattr(storage, "read_range", lambda p, a, b: ranges.append(b - a) or real(p, a, b))
  reader = hf.CheckpointReader(folder)
  assert reader.shape("a") == (64, 48)
  ranges.clear()
  got = reader.read("a", (slice(16, 24), slice(8, 40)))
  np.testing.assert_array_equal(got, tensors["a"][16:24, 8:40])
  assert ranges == [8 * 48 * 4]  # rows 16..23 only, one ranged GET
  np.testing.assert_array_equal(reader.read("b", (slice(None),)), tensors["b"])
