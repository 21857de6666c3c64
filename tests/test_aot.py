"""`python -m artifex_dpo.aot`: the real step compiled for a TPU topology on this CPU machine (libtpu)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifex_dpo.models import count_params, forward_flops_per_token, get_preset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[tpu]')")


def _aot(*args):
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)  # the TPU compiler plugin must be loadable
  return subprocess.run([sys.executable, "-m", "artifex_dpo.aot", "--config=configs/tiny.py", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_llama_tiny_compiles_for_v5e_2x2():
  proc = _aot("--topology=v5e:2x2", "--config.train.global_batch_size=8", "--config.data.max_length=64")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["topology"] == "v5e:2x2" and report["devices"] == 4
  # model.attention_impl=auto compiles the Pallas splash kernel (Mosaic custom calls) for the TPU.
  assert report["attention"] == "splash" and report["kernel_calls"] > 0
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert report["hbm_bytes"] == 16 * 2**30 and report["fits"] is True
  # At least this device's shard of the policy, two Adam moments and the reference (float32).
  cfg = get_preset("llama-tiny")
  assert report["per_device_bytes"] >= 4 * 4 * count_params(cfg) / 4
  assert report["per_device_bytes"] >= report["argument_bytes"] > 0
  tokens = 2 * 8 * 64
  assert report["tokens_per_step"] == tokens
  # Policy forward + backward (3x) and reference forward (1x), from the architecture.
  assert report["model_flops_per_step"] == pytest.approx(tokens * forward_flops_per_token(cfg, 64) * 4, rel=1e-9)
  assert report["flops_per_device"] > 0
  assert report["roofline_step_s"] >= report["model_flops_per_step"] / (4 * 197e12)


def test_mesh_that_does_not_match_the_topology_exits_2():
  proc = _aot("--topology=v5e:2x2", "--config.mesh.ici.fsdp=3")
  assert proc.returncode == 2
  assert "mesh" in proc.stderr.strip().splitlines()[-1]


def test_default_compiles_packed_rows_at_the_config_budget_and_padded_stays_selectable():
  """The default layout (per-batch packed, shared prompts) compiles `row_budget_bound` rows, the shape every
  global batch fits; data.pack_batches=False compiles the padded batches."""
  from artifex_dpo.data.packing import row_budget_bound

  common = ("--topology=v5e:2x2", "--config.train.global_batch_size=8", "--config.data.max_length=64",
            "--config.data.pack_length=256")
  reports = {}
  for name, extra in (("packed", ()), ("padded", ("--config.data.pack_batches=False",))):
    proc = _aot(*common, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports[name] = json.loads(proc.stdout.strip().splitlines()[-1])
  packed, padded = reports["packed"], reports["padded"]
  assert packed["layout"] == "pack_batches+share_prompt"
  # 2 pairs of 2 x 64 tokens always fit a 256-token row: 4 rows, a multiple of the 4 batch shards.
  assert packed["rows_per_step"] == row_budget_bound(8, 64, 256, 8, row_multiple=4) == 4
  assert (packed["row_length"], packed["pairs_per_row"]) == (256, 8)
  assert (padded["layout"], padded["rows_per_step"], padded["row_length"]) == ("padded", 16, 64)
  for r in (packed, padded):
    assert r["fits"] is True and r["kernel_calls"] > 0 and r["tokens_per_step"] == 2 * 8 * 64
  # Shared-prompt rows run the attention kernel in two passes.
  assert packed["kernel_calls"] > padded["kernel_calls"]
