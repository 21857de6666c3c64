"""`python -m artifex_dpo.aot` for the unpaired (KTO) losses: the real KTO step compiled for a TPU topology on
this CPU machine (libtpu), checked against the paired step's compile and the analytic FLOPs."""

import importlib.util
import json

import pytest

from artifex_dpo.models import forward_flops_per_token, get_preset
from test_aot import _aot

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu not installed (pip install -e '.[tpu]')")
B, L = 8, 64


def _report(loss_type):
  proc = _aot("--topology=v5e:2x2", f"--config.train.global_batch_size={B}", f"--config.data.max_length={L}",
              f"--config.dpo.loss_type={loss_type}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kto_and_apo_zero_unpaired_compile_for_v5e_2x2():
  paired, kto, apo = _report("sigmoid"), _report("kto"), _report("apo_zero_unpaired")
  per_token = forward_flops_per_token(get_preset("llama-tiny"), L)
  # KTO: each example's completion and its KL row go through the policy (fwd + bwd, 3x) and the reference (1x):
  # the paired step's shapes (chosen + rejected), so XLA counts the same work up to the loss's few ops.
  assert kto["tokens_per_step"] == paired["tokens_per_step"] == 2 * B * L
  assert kto["model_flops_per_step"] == pytest.approx(2 * B * L * per_token * 4, rel=1e-9)
  assert kto["flops_per_device"] == pytest.approx(paired["flops_per_device"], rel=0.01)
  # apo_zero_unpaired has no KL rows: half the sequences, half the work.
  assert apo["tokens_per_step"] == B * L
  assert apo["model_flops_per_step"] == pytest.approx(B * L * per_token * 4, rel=1e-9)
  assert apo["flops_per_device"] == pytest.approx(kto["flops_per_device"] / 2, rel=0.02)
  for r in (kto, apo):
    assert r["devices"] == 4 and r["fits"] is True and r["attention"] == "splash" and r["kernel_calls"] > 0
    assert r["per_device_bytes"] >= r["argument_bytes"] > 0
  assert apo["per_device_bytes"] < kto["per_device_bytes"]
