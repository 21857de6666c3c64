"""KTO through `python -m artifex_dpo.main`: `data.skip_invalid` and the truncation counters reach
metrics.jsonl, out-of-vocabulary pre-tokenized ids exit 2 naming file:line, and two real processes
on 127.0.0.1 give the single-process per-step losses (the KL rows rotate over the global batch)."""

from __future__ import annotations

import json

import numpy as np

from processes import start, wait
from service_runs import error_line, read_rows, run_main

QUICK = ["--config.train.eval_every=0", "--config.checkpoint.save_every=0", "--config.export.hf=False",
         "--config.train.log_every=1", "--config.dpo.loss_type=kto", "--config.train.global_batch_size=8",
         "--config.train.eval_batch_size=16"]


def _kto_file(path, n_good=40):
  """n_good valid records (every 5th with a 40-char prompt: BOS + 40 > data.max_prompt_length=32; every 7th with
  a 70-char completion: cut to fit data.max_length=64), then 3 bad ones; returns the hand counts."""
  lines, long_prompts, long_completions = [], 0, 0
  for i in range(n_good):
    prompt = f"Q{i}: " + ("p" * 36 if i % 5 == 0 else "short?") + "\nA:"
    completion = " " + ("c" * 70 if i % 7 == 0 else "ok" * (1 + i % 3))
    long_prompts += i % 5 == 0
    long_completions += i % 7 == 0
    lines.append(json.dumps({"prompt": prompt, "completion": completion, "label": i % 2 == 0}))
  lines += [json.dumps({"prompt": "x", "completion": " y"}),                     # no label
            "[1, 2",                                                              # malformed JSON
            json.dumps({"prompt_ids": [1], "completion_ids": [2, 259], "label": True})]  # id >= 259 (llama-tiny)
  path.write_text("\n".join(lines) + "\n")
  return long_prompts, long_completions


def test_kto_skip_invalid_counts_bad_records_and_truncation(tmp_path):
  data = tmp_path / "kto.jsonl"
  long_prompts, long_completions = _kto_file(data)
  assert (long_prompts, long_completions) == (8, 6)
  # Without skip_invalid the first bad record stops the run.
  proc = run_main(tmp_path / "strict", *QUICK, "--config.train.steps=1", f"--config.data.train_files={data}")
  assert proc.returncode == 2 and f"{data}:41: label: missing" in error_line(proc)
  proc = run_main(tmp_path / "run", *QUICK, "--config.train.steps=2", f"--config.data.train_files={data}",
                  "--config.data.skip_invalid=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, train, _ = read_rows(tmp_path / "run")
  row = train[2]
  assert row["data/skipped_invalid"] == 3
  # i % 5 == 0 and i % 7 == 0 (i = 0, 35): both cut; nothing is dropped (a cut completion keeps 64 - 32 tokens).
  assert row["data/truncated_prompts"] == long_prompts
  assert row["data/truncated_responses"] == long_completions
  assert row["data/dropped_truncated"] == 0 and row["data/identical_pairs"] == 0
  assert f"skipping invalid record: {data}:42: malformed JSON" in proc.stderr
  assert f"{data}:43: completion_ids: token id 259 is outside [0, 259)" in proc.stderr


def test_kto_pretokenized_ids_outside_the_model_vocabulary_exit_2(tmp_path):
  data = tmp_path / "ids.jsonl"
  data.write_text(json.dumps({"prompt_ids": [1, 2], "completion_ids": [3, 4], "label": True}) + "\n"
                  + json.dumps({"prompt_ids": [1, -3], "completion_ids": [3, 4], "label": False}) + "\n")
  proc = run_main(tmp_path / "a", *QUICK, "--config.train.steps=1", f"--config.data.train_files={data}")
  assert proc.returncode == 2
  assert error_line(proc).endswith(f"{data}:2: prompt_ids: token id -3 is outside [0, 259)")
  # A paired pre-tokenized record fed to KTO is checked the same way.
  data.write_text(json.dumps({"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [259]}) + "\n")
  proc = run_main(tmp_path / "b", *QUICK, "--config.train.steps=1", f"--config.data.train_files={data}")
  assert proc.returncode == 2
  assert error_line(proc).endswith(f"{data}:1: rejected_ids: token id 259 is outside [0, 259)")


TWO = [*QUICK, "--config.train.steps=6", "--config.data.synthetic_pairs=128", "--config.train.eval_every=6",
       "--config.optim.warmup_steps=0"]


def test_kto_two_processes_match_one(tmp_path):
  """Every process builds the whole global batch (KL rows rotated over it) and keeps its half: the per-step
  losses, KL points and rewards of 2 processes x 1 device equal those of 1 process x 1 device."""
  single = wait(start(tmp_path / "one", *TWO, processes=1))
  assert single[0][0] == 0, single[0][1][-3000:]
  outs = wait(start(tmp_path / "two", *TWO, processes=2))
  for code, err in outs:
    assert code == 0, err[-4000:]
  _, one, eval_one = read_rows(tmp_path / "one")
  _, two, eval_two = read_rows(tmp_path / "two")
  assert sorted(one) == sorted(two) == list(range(1, 7))
  for step in one:
    assert two[step]["tokens"] == one[step]["tokens"] and two[step]["pairs"] == one[step]["pairs"] == 8
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, atol=1e-6, err_msg=f"{key}@{step}")
    # Log-ratios are differences of ~-90-nat float32 sums whose reduction order differs with the layout (measured:
    # |logps| differ by up to 8e-6): an absolute tolerance in nats. A per-host KL rotation misses by > 0.01.
    for key in ("kl", "rewards/chosen", "rewards/rejected"):
      np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, atol=5e-5, err_msg=f"{key}@{step}")
  assert one[6]["loss"] != one[1]["loss"]  # the steps trained (the comparison is not of six copies)
  assert sum(one[s]["kl"] > 0.05 for s in one) >= 3  # the KL point is live (not clamped to 0) in several steps
  np.testing.assert_allclose(eval_two[-1]["eval/loss"], eval_one[-1]["eval/loss"], rtol=1e-5, atol=1e-6)
  for key in ("eval/kl", "eval/rewards/margins"):
    np.testing.assert_allclose(eval_two[-1][key], eval_one[-1][key], rtol=1e-5, atol=5e-5, err_msg=key)
