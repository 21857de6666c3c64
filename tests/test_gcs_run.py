"""`python -m artifex_dpo.main` with everything in a (real, emulated) GCS bucket: the workdir, the
data, the tokenizer and a small HF Llama. Compared with the same run on local disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from artifex_dpo import storage
from gcs import gcs_emulator  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60  # enough that the SIGTERM sent after step 2 lands mid-run, however fast the machine
ARGS = [f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.checkpoint.save_every=0", "--config.train.global_batch_size=8", "--config.train.eval_batch_size=16",
        "--config.data.max_length=96", "--config.data.max_prompt_length=48", "--config.optim.warmup_steps=0",
        "--config.dpo.precompute_ref_logps=True", "--config.export.hf=True"]


def _tiny_hf_llama(folder: Path, records: list[dict]) -> None:
  """A BPE tokenizer trained on the data and a 2-layer HF Llama using it (transformers' own files)."""
  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  texts = [r[k] for r in records for k in ("prompt", "chosen", "rejected")]
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  folder.mkdir(parents=True)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
  import torch

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)


def _upload(local: Path, uri: str) -> None:
  for p in local.rglob("*"):
    if p.is_file():
      storage.write_bytes(storage.join(uri, *p.relative_to(local).parts), p.read_bytes())


def _download(uri: str, local: Path) -> None:
  local.mkdir(parents=True)
  for name in storage.listdir(uri):
    (local / name).write_bytes(storage.read_bytes(storage.join(uri, name)))


def _start(workdir, inputs, env, extra=()):
  cmd = [sys.executable, "-m", "artifex_dpo.main", "--config=configs/tiny.py", f"--workdir={workdir}", *ARGS, *extra,
         f"--config.data.train_files={inputs}/data/train.jsonl", f"--config.model.hf_checkpoint={inputs}/llama",
         "--config.data.tokenizer=", "--config.model.preset=", "--config.data.pad_multiple=16"]
  return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _rows(workdir: str) -> dict[int, dict]:
  rows = [json.loads(line) for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()]
  return {r["step"]: r for r in rows if "loss" in r}  # a step logged twice: the later row counts


@pytest.fixture(scope="module")
def inputs(gcs_emulator, tmp_path_factory):
  from artifex_dpo.data.synthetic import synthetic_records

  local = tmp_path_factory.mktemp("inputs")
  records = synthetic_records(96, seed=3)
  (local / "data").mkdir()
  (local / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  _tiny_hf_llama(local / "llama", records)
  bucket = gcs_emulator.fresh("inputs")
  _upload(local, bucket)
  return local, bucket


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory, gcs_emulator):
  workdir = tmp_path_factory.mktemp("local") / "run"
  proc = _start(workdir, inputs[0], {})
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-4000:]
  return str(workdir)


def test_bucket_run_preempted_and_resumed_matches_local_disk(gcs_emulator, inputs, local_run, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local "gs:" folder would appear here
  workdir = gcs_emulator.fresh("run")
  proc = _start(workdir, inputs[1], gcs_emulator.env)
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:  # SIGTERM once step 2 is logged in the bucket
    if storage.isfile(storage.join(workdir, "metrics.jsonl")) and 2 in _rows(workdir):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 75, err[-4000:]
  saved = [int(n) for n in storage.listdir(storage.join(workdir, "checkpoints")) if n.isdigit()]
  assert saved and max(saved) < STEPS
  # The rerun resumes from the bucket and finds its reference log-probs there.
  proc = _start(workdir, inputs[1], gcs_emulator.env)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-4000:]
  assert "resumed from gs://" in err and "reference log-probs: using the cache gs://" in err
  ours, local = _rows(workdir), _rows(local_run)
  assert sorted(ours) == sorted(local) == list(range(1, STEPS + 1))
  for step in local:  # bitwise: the same computation, interrupted or not, bucket or disk
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "tokens"):
      assert ours[step][key] == local[step][key], (key, step)
  assert not os.path.exists("gs:")
  # The export in the bucket records its step and loads in transformers with the local export's logits.
  export = storage.join(workdir, "export")
  assert json.loads(storage.read_text(storage.join(export, "artifex_dpo_export.json")))["step"] == STEPS
  _download(export, tmp_path / "export")
  import torch
  import transformers

  ids = torch.tensor([[1, 5, 17, 42, 99, 7, 2]])
  with torch.no_grad():
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()(ids).logits
    b = transformers.AutoModelForCausalLM.from_pretrained(Path(local_run) / "export").eval()(ids).logits
  np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert (tmp_path / "export" / "tokenizer.json").is_file()  # copied from the bucket's checkpoint folder


def test_two_processes_on_the_bucket_match_local_disk(gcs_emulator, inputs, local_run):
  """Two real processes (jax.distributed on 127.0.0.1): each tokenizes half the data into the bucket's
  cache and writes its share; the losses are the one-process, local-disk ones."""
  from processes import free_port

  workdir = gcs_emulator.fresh("two")
  port = free_port()
  procs = [_start(workdir, inputs[1], dict(gcs_emulator.env, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                  extra=[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"])
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
  ours, local = _rows(workdir), _rows(local_run)
  assert sorted(ours) == sorted(local)
  for step in local:
    for key in ("loss", "rewards/margins", "logps/chosen", "tokens"):
      np.testing.assert_allclose(ours[step][key], local[step][key], rtol=1e-5, atol=1e-6, err_msg=f"{key}@{step}")
  parts = [n for n in storage.listdir(storage.join(workdir, "data_cache", storage.listdir(
      storage.join(workdir, "data_cache"))[0])) if n.endswith(".json") and n.startswith("part-")]
  assert parts == ["part-00000-of-00002.json", "part-00001-of-00002.json"]
