"""The one TPU chip table: device kinds map to the right chip, and the launchers need no JAX."""

import subprocess
import sys
from pathlib import Path

import pytest

from artifex_dpo import tpu_chips

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),   # a v5e, although "TPU v5" (a v5p spelling) is a substring of it
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("cpu", None),
])
def test_peak_flops_of_device_kind(kind, peak):
  assert tpu_chips.peak_flops_of_device_kind(kind) == peak


def test_aliases_and_hbm():
  assert tpu_chips.canonical_name("V5LitePod") == "v5e"
  assert tpu_chips.CHIPS["v5e"].hbm_bytes == 16 * 1024**3 and tpu_chips.CHIPS["v5p"].hbm_bytes == 95 * 1024**3


def test_launchers_import_without_jax():
  code = ("import sys; sys.modules['jax'] = None\n"  # any 'import jax' now fails
          "from launch import gke, xm_launch\n"
          "assert gke.parse_slice('v5p-32').generation.gke_accelerator == 'tpu-v5p-slice'\n"
          "assert xm_launch.EXECUTORS")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
