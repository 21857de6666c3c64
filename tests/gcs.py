"""A real GCS emulator for tests: `gcp-storage-emulator` on a loopback port.

Reusable by any test module::

  from gcs import gcs_emulator  # noqa: F401  (the module-scoped fixture)

  def test_x(gcs_emulator):
    bucket = gcs_emulator.bucket          # "gs://testbucket"
    env = gcs_emulator.env                # for subprocesses: dict(os.environ, **env)

The fixture starts the emulator (in memory; with object generations and preconditions added, see
gcs_emulator_main.py) as a subprocess, points gcsfs (``STORAGE_EMULATOR_HOST``)
and tensorstore (``TENSORSTORE_GCS_HTTP_URL``) of this process and of the subprocesses it
starts at it, and stops it at the end. Credentials are anonymous; the Google metadata server
(which google-auth and tensorstore would otherwise probe for credentials) is pointed at a closed
loopback port, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BUCKET = "testbucket"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(port: int) -> dict[str, str]:
  url = f"http://127.0.0.1:{port}"
  closed = f"127.0.0.1:{free_port()}"  # nothing listens there: credential probes fail at once
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage)
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (Orbax)
      "FSSPEC_GS_TOKEN": "anon",  # gcsfs instances made by fsspec.filesystem("gs"), e.g. etils.epath's
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe (needs real credentials)
      "GOOGLE_CLOUD_PROJECT": "test",
      "GCE_METADATA_HOST": closed,
      "GCE_METADATA_IP": closed,
      "GCE_METADATA_ROOT": closed,
  }


@dataclasses.dataclass
class Emulator:
  port: int
  env: dict[str, str]
  bucket: str = f"gs://{BUCKET}"

  def fresh(self, name: str = "run") -> str:
    """A new, empty prefix in the bucket."""
    return f"{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"


def start_emulator() -> tuple[subprocess.Popen, Emulator]:
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, str(Path(__file__).with_name("gcs_emulator_main.py")), "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
      break
    except OSError:
      if proc.poll() is not None or time.time() > deadline:
        proc.kill()
        raise RuntimeError("the GCS emulator did not start")
      time.sleep(0.1)
  return proc, Emulator(port, emulator_env(port))


def _apply_env(env: dict[str, str]) -> dict[str, str | None]:
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  import fsspec.config

  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  fsspec.AbstractFileSystem.clear_instance_cache()
  try:  # gcsfs reads the emulator host when a file system is made; drop cached ones
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass
  return old


def _restore_env(old: dict[str, str | None]) -> None:
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope="module")
def gcs_emulator():
  proc, emu = start_emulator()
  old = _apply_env(emu.env)
  try:
    yield emu
  finally:
    _restore_env(old)
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
