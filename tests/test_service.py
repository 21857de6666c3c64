"""The program users run: `python -m artifex_dpo.main`, end to end, in real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service_runs import error_line, read_rows, run_main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir


def test_tiny_default_reaches_held_out_accuracy(tiny_run):
  rows, train, evals = read_rows(tiny_run)
  assert sorted(train) == list(range(10, 151, 10))
  required = {"step", "time", "loss", "tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
              "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_s",
              "mfu", "data/skipped_invalid", "data/dropped_truncated", "train/nonfinite_steps"}
  for r in train.values():
    assert required <= set(r), required - set(r)
  # The seed trainer's duplicate names are the library's, not the service's outputs (TRL's names only).
  seed = {"dpo_loss", "reward_accuracy", "chosen_log_ratios", "rejected_log_ratios", "margin"}
  assert not [k for r in rows for k in r if k.removeprefix("eval/") in seed]
  assert [e["step"] for e in evals] == [50, 100, 150]
  assert evals[-1]["eval/rewards/accuracies"] >= 0.9
  assert evals[-1]["eval/rewards/margins"] > 0
  # The row's numbers mean what docs/design.md says: rewards are beta-scaled log-ratios, accuracies a fraction.
  last = train[150]
  np.testing.assert_allclose(last["rewards/margins"], last["rewards/chosen"] - last["rewards/rejected"], rtol=1e-4,
                             atol=1e-6)
  assert 0.0 <= last["rewards/accuracies"] <= 1.0
  # Warmup of 10 steps: step 1's rate would be 0, step 10's is 9/10 of the peak.
  np.testing.assert_allclose(train[10]["learning_rate"], 3e-3 * 9 / 10, rtol=1e-5)
  assert (Path(tiny_run) / "tensorboard").is_dir() and any((Path(tiny_run) / "tensorboard").iterdir())


def test_tiny_export_prefers_chosen_in_transformers(tiny_run):
  """The exported folder loads in transformers, and the trained policy ranks held-out pairs right."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from artifex_dpo.data import load_tokenizer
  from artifex_dpo.data.synthetic import synthetic_records

  model = transformers.AutoModelForCausalLM.from_pretrained(Path(tiny_run) / "export").eval()
  tok = load_tokenizer("byte")
  wins = 0
  records = synthetic_records(64, seed=999)  # prompts and words never seen in training
  for r in records:
    scores = []
    for response in (r["chosen"], r["rejected"]):
      p, y = tok.encode(r["prompt"], add_special_tokens=True), tok.encode(response) + [tok.eos_id]
      ids = torch.tensor([p + y])
      with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
      scores.append(sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(y)))
    wins += scores[0] > scores[1]
  assert wins / len(records) >= 0.9


def test_restart_resumes_and_refuses_a_changed_config(tiny_run, tmp_path):
  # A larger train.steps resumes from the last checkpoint (150) and appends.
  proc = run_main(tiny_run, "--config.train.steps=160")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows, train, _ = read_rows(tiny_run)
  assert 160 in train and "resumed from" in proc.stderr
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps[-2:] == [150, 160] or steps[-1] == 160
  assert steps.count(160) == 1 and min(s for s in steps[steps.index(150) + 1:]) > 150
  # A different batch size cannot resume from this checkpoint: exit 2, naming the key.
  proc = run_main(tiny_run, "--config.train.steps=170", "--config.train.global_batch_size=32")
  assert proc.returncode == 2
  assert "train.global_batch_size" in error_line(proc)


@pytest.mark.parametrize("overrides,needle", [
    (["--config.train.stpes=3"], "train.stpes"),
    (["--config.train.steps=abc"], "train.steps"),
    (["--config.train.global_batch_size=10", "--config.train.grad_accum_steps=3"], "train.global_batch_size"),
    (["--config.data.train_files=/nonexistent/*.jsonl"], "data.train_files"),
    (["--config.dpo.beta=0"], "dpo.beta"),
    (["--config.dpo.loss_type=sigmoid,nope"], "dpo.loss_type"),
    (["--config.model.preset=gpt5"], "model.preset"),
    (["--config.mesh.ici.fsdp=3"], "mesh"),
    (["--config=configs/does_not_exist.py"], "does_not_exist.py"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, overrides, needle):
  config = "configs/tiny.py"
  if overrides[0].startswith("--config="):
    config, overrides = overrides[0].split("=", 1)[1], overrides[1:]
  proc = run_main(tmp_path / "w", *overrides, config=config, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert needle in error_line(proc)
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


GOOD = {"prompt": "Q: abc?\nA:", "chosen": " abc", "rejected": " xyz"}


@pytest.mark.parametrize("lines,needle", [
    ([json.dumps(GOOD), "{not json", json.dumps(GOOD)], ":2:"),
    ([json.dumps(GOOD), json.dumps({"prompt": "p", "chosen": "c"})], ":2:"),
    ([json.dumps(GOOD), json.dumps(GOOD), json.dumps(dict(GOOD, chosen=5))], ":3:"),
    ([], "empty"),
])
def test_bad_data_exits_2_naming_file_and_line(tmp_path, lines, needle):
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(l + "\n" for l in lines))
  proc = run_main(tmp_path / "w", f"--config.data.train_files={path}", "--config.train.steps=2", timeout=180)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert str(path) in line and needle in line, line
  assert "Traceback" not in proc.stderr


def test_skip_invalid_counts_skipped_records(tmp_path):
  from artifex_dpo.data.synthetic import synthetic_records

  path = tmp_path / "prefs.jsonl"
  good = [json.dumps(r) for r in synthetic_records(80, seed=1)]
  bad = ["{not json", json.dumps({"prompt": "p"}), json.dumps({"prompt": "p", "chosen": ["x"], "rejected": 1})]
  path.write_text("\n".join(good[:30] + bad + good[30:]) + "\n")
  proc = run_main(tmp_path / "w", f"--config.data.train_files={path}", "--config.data.skip_invalid=True",
                  "--config.train.steps=2", "--config.train.log_every=1", "--config.export.hf=False",
                  "--config.checkpoint.save_every=0", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, train, _ = read_rows(tmp_path / "w")
  assert train[2]["data/skipped_invalid"] == 3


@pytest.mark.skipif(not (BENCH / "make_workload.py").exists(), reason="shared/bench not present")
def test_standard_workload_runs_with_overrides_only(tmp_path):
  pytest.importorskip("transformers")
  wl = tmp_path / "wl"
  proc = subprocess.run([sys.executable, str(BENCH / "make_workload.py"), str(wl)], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_main(tmp_path / "w",
                  f"--config.model.hf_checkpoint={wl}/hf_model",
                  f"--config.data.train_files={wl}/prefs.jsonl",
                  "--config.data.max_length=256", "--config.data.max_prompt_length=128",
                  "--config.data.eval_split=0.02", "--config.train.eval_batch_size=8",
                  "--config.train.steps=2", "--config.train.log_every=1", "--config.train.global_batch_size=8",
                  "--config.train.eval_every=0", "--config.checkpoint.save_every=0", "--config.export.hf=False",
                  "--config.optim.learning_rate=1e-6", "--config.optim.warmup_steps=0",
                  config="configs/tiny.py", timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  _, train, evals = read_rows(tmp_path / "w")
  assert sorted(train) == [1, 2]
  # Policy == reference at step 1: every log-ratio is zero, so the loss is exactly log 2.
  np.testing.assert_allclose(train[1]["loss"], np.log(2.0), rtol=1e-5)
  assert abs(train[1]["rewards/margins"]) < 1e-5
  assert train[1]["logps/chosen"] < 0 and evals
