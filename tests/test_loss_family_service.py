"""ORPO and KTO through `python -m artifex_dpo.main` on the tiny task: they learn (held-out
numbers), log TRL's metric names, and bad KTO records / combinations exit 2 with one line."""

from __future__ import annotations

import json

import pytest

from service_runs import error_line, read_rows, run_main

# CPO-SimPO's learning (held-out accuracy 1.0 on the tiny config) was measured by hand; its loss is checked
# against TRL in test_loss_family.py and its wiring (NLL term) in test_loss_family_layouts.py.
SHORT = ["--config.train.steps=40", "--config.train.eval_every=0", "--config.checkpoint.save_every=0",
         "--config.export.hf=False", "--config.data.synthetic_pairs=512", "--config.train.log_every=20"]


def test_orpo_on_shared_prompt_rows_learns_and_logs_trl_names(tmp_path):
  proc = run_main(tmp_path, *SHORT, "--config.dpo.loss_type=orpo", "--config.dpo.reference_free=True",
                  "--config.data.pack_batches=True", "--config.data.share_prompt=True")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, train, evals = read_rows(tmp_path)
  for key in ("nll_loss", "log_odds_ratio", "log_odds_chosen"):
    assert key in train[40] and f"eval/{key}" in evals[-1]
  assert evals[-1]["eval/rewards/accuracies"] >= 0.9, evals[-1]
  assert evals[-1]["eval/log_odds_chosen"] > 0


def test_kto_learns_on_the_paired_tiny_set_fed_unpaired(tmp_path):
  """KTO logs no reward accuracy (TRL neither): the held-out check is the desirable-minus-undesirable reward
  margin (pair accuracy on held-out pairs, 1.0, is checked through the library in test_kto.py)."""
  proc = run_main(tmp_path, *SHORT, "--config.dpo.loss_type=kto", "--config.train.steps=20")
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, train, evals = read_rows(tmp_path)
  last = evals[-1]
  assert {"eval/kl", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins"} <= set(last)
  assert last["eval/rewards/chosen"] > 0 > last["eval/rewards/rejected"] and last["eval/rewards/margins"] > 2.0, last
  assert "kl" in train[20]


def test_kto_bad_record_and_bad_combination_exit_2(tmp_path):
  data = tmp_path / "kto.jsonl"
  data.write_text(json.dumps({"prompt": "Q", "completion": " a", "label": True}) + "\n"
                  + json.dumps({"prompt": "Q", "completion": " b", "label": "no"}) + "\n")
  proc = run_main(tmp_path / "a", "--config.dpo.loss_type=kto", f"--config.data.train_files={data}")
  assert proc.returncode == 2
  assert f"{data}:2: label: expected true or false" in error_line(proc)
  proc = run_main(tmp_path / "b", "--config.dpo.loss_type=kto", "--config.dpo.label_smoothing=0.1")
  assert proc.returncode == 2 and "dpo.label_smoothing" in error_line(proc)
