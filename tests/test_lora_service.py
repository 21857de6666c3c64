"""LoRA through `python -m artifex_dpo.main`: learning, adapter-only checkpoints, bitwise resume, 2 processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from processes import start, wait
from service_runs import assert_identical, final_rows, stop_with_sigterm

STEPS = 150
# The tiny default's task and optimizer, rank-16 adapters; a constant schedule after warmup so a
# shorter run takes the same first steps.
ARGS = ["--config.lora.rank=16", "--config.lora.base_dtype=float32", "--config.optim.schedule=constant",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.save_every=0",
        "--config.export.format=peft"]


def _run(workdir, *extra, processes=1):
  return wait(start(workdir, *ARGS, *extra, processes=processes))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("lora")
  (code, err), = _run(d, f"--config.train.steps={STEPS}")
  assert code == 0, err[-3000:]
  return d


def _saved_arrays(workdir, step):
  from artifex_dpo import checkpoint as ckpt_lib

  ck = ckpt_lib.Checkpointer(str(Path(workdir) / "checkpoints"), max_to_keep=3, async_save=False)
  try:
    saved = ck._manager.item_metadata(step)["state"]  # noqa: SLF001 - test-only inspection
    return [k for k, _ in ckpt_lib._flatten(getattr(saved, "tree", saved))]  # noqa: SLF001
  finally:
    ck.close()


def test_lora_learns_held_out_preferences(lora_run):
  train, evals = final_rows(lora_run)
  assert sorted(train) == list(range(1, STEPS + 1))
  assert evals[STEPS]["eval/rewards/accuracies"] >= 0.95
  assert evals[STEPS]["eval/rewards/margins"] > 0
  # Step 1 runs the untouched base: the policy equals the reference, so every reward is 0 (exactly on padded
  # and unshared packed rows; on the default shared-prompt rows the policy's and the reference's compiled
  # forwards round the rejected branch differently, by one float32 ulp of its log-prob sum: 1e-7 measured).
  # A non-zero B at the start (the bug this guards against) gives rewards orders of magnitude larger.
  assert abs(train[1]["rewards/chosen"]) < 1e-6 and abs(train[1]["rewards/rejected"]) < 1e-6


def test_checkpoint_holds_adapters_not_the_base(lora_run):
  keys = _saved_arrays(lora_run, STEPS)
  assert any("q_proj_lora_a" in k for k in keys) and any("down_proj_lora_b" in k for k in keys)
  base = [k for k in keys if k.split("/")[-1] in ("embed", "lm_head", "final_norm", "q_proj", "input_norm")
          or k.endswith("/q_proj/value") or "embed" in k.split("/")]
  assert not base, base[:5]
  exported = load_file(Path(lora_run) / "export" / "adapter_model.safetensors")
  assert set(k.split(".lora_")[0].rsplit(".", 1)[-1] for k in exported) == {
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_sigterm_resume_is_bitwise(lora_run, tmp_path):
  d = tmp_path / "run"
  stopped = stop_with_sigterm(d, start(d, *ARGS, f"--config.train.steps={STEPS}"), STEPS)
  (code, err), = _run(d, f"--config.train.steps={STEPS}")
  assert code == 0, err[-3000:]
  assert f"resumed from {d / 'checkpoints'}/{stopped}" in err
  assert_identical(lora_run, d, STEPS)


def test_lora_two_processes_match_one(lora_run, tmp_path):
  """2 processes = 1; the 2-process run also precomputes the reference (the base) instead of running it live."""
  steps = 6
  for code, err in _run(tmp_path / "two", f"--config.train.steps={steps}", "--config.export.hf=False",
                        "--config.dpo.precompute_ref_logps=True", processes=2):
    assert code == 0, err[-4000:]
  one, _ = final_rows(lora_run)
  two, _ = final_rows(tmp_path / "two")
  assert sorted(two) == list(range(1, steps + 1))
  assert list((tmp_path / "two" / "ref_logps").glob("train-*.npz"))
  for s in two:
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "tokens"):
      np.testing.assert_allclose(two[s][key], one[s][key], rtol=1e-5, atol=1e-6, err_msg=f"{key}@{s}")
