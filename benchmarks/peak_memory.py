"""Whole-process peak memory of a training run at a large vocabulary, next to the compiled step's.

    python benchmarks/peak_memory.py --workdir=/tmp/peak [--vocab=131072] [--steps=1]

The case of issue 18: a random Llama in Hugging Face format (``--vocab`` ids, hidden 64, 1 layer,
untied embeddings) with a ``tokenizer.json`` as wide as the vocabulary, 4 pre-tokenized pairs of a
1024-token prompt and 3000-token responses, and the service run on it as a user runs it:

    python -m artifex_dpo.main --config=configs/tiny.py --config.model.hf_checkpoint=M
      --config.data.tokenizer=M --config.data.train_files=data.jsonl --config.data.max_length=4096
      --config.data.max_prompt_length=1096 --config.data.eval_split=0.0
      --config.train.global_batch_size=2 --config.train.steps=1 --config.model.dtype=float32

Prints one JSON line: ``peak_rss_bytes`` (the run's whole process, ``ru_maxrss`` of the child:
imports, data, model loading, compilation, the steps, checkpoint and export), and the compiled train
step's ``memory_analysis()`` for the same batch shape: ``step_temp_bytes`` (its temporaries),
``step_argument_bytes`` (policy, Adam state, reference and batch) and ``step_output_bytes``.
Extra ``--config.*`` arguments after ``--`` go to the run (and to the step compiled here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def make_case(folder: str, vocab: int, prompt_len: int, response_len: int, pairs: int, seed: int = 0) -> str:
  """Writes the random HF model, its tokenizer and ``data.jsonl`` into ``folder``; returns folder."""
  import numpy as np
  from flax import nnx
  from tokenizers import Tokenizer, models, pre_tokenizers

  from artifex_dpo.models import LlamaModel, export_hf, get_preset

  os.makedirs(folder, exist_ok=True)
  cfg = get_preset("llama-tiny", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                   num_kv_heads=4, max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=1,
                   eos_token_id=2, pad_token_id=0)
  export_hf(LlamaModel(cfg, rngs=nnx.Rngs(seed)), os.path.join(folder, "model"))
  model_dir = os.path.join(folder, "model")
  words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
  tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(model_dir, "tokenizer.json"))
  with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
  rng = np.random.default_rng(seed)
  with open(os.path.join(folder, "data.jsonl"), "w") as f:
    for _ in range(pairs):
      ids = lambda n: rng.integers(3, vocab, n).tolist()
      f.write(json.dumps({"prompt_ids": ids(prompt_len), "chosen_ids": ids(response_len),
                          "rejected_ids": ids(response_len)}) + "\n")
  return folder


def run_args(case: str, steps: int, extra: list[str]) -> list[str]:
  model = os.path.join(case, "model")
  return ["--config=configs/tiny.py", f"--config.model.hf_checkpoint={model}", f"--config.data.tokenizer={model}",
          f"--config.data.train_files={os.path.join(case, 'data.jsonl')}", "--config.data.max_length=4096",
          "--config.data.max_prompt_length=1096", "--config.data.eval_split=0.0",
          "--config.train.global_batch_size=2", f"--config.train.steps={steps}", "--config.model.dtype=float32",
          *extra]


def run_peak_rss(args: list[str], workdir: str) -> tuple[int, int, float]:
  """Runs the service in a child process: ``(exit code, peak RSS bytes of that child, seconds)``."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  with open(os.path.join(workdir, "stderr.log"), "wb") as log:
    proc = subprocess.Popen([sys.executable, "-m", "artifex_dpo.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                            stdout=log, stderr=log)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (its re-exec included)
    proc.returncode = code = os.waitstatus_to_exitcode(status)
  if code != 0:
    with open(os.path.join(workdir, "stderr.log"), errors="replace") as f:
      sys.stderr.write(f.read()[-3000:])
  return code, int(usage.ru_maxrss) * 1024, time.time() - t0


def compiled_step_memory(args: list[str], workdir: str) -> dict:
  """The train step of the same run, compiled here for its first batch: ``memory_analysis()``."""
  import importlib.util

  from artifex_dpo import config as config_lib
  from artifex_dpo import state as state_lib
  from artifex_dpo.setup import build

  spec = importlib.util.spec_from_file_location("run_config", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for arg in args:
    if arg.startswith("--config."):
      key, value = arg[len("--config."):].split("=", 1)
      *parents, last = key.split(".")
      node = c
      for part in parents:
        node = node[part]
      old = node[last]
      node[last] = (value in ("True", "true", "1") if isinstance(old, bool)
                    else value if old is None else type(old)(value))
  config_lib.validate(c)
  setup = build(c, workdir)
  _, local = next(iter(setup.loader(c, start_step=0, num_steps=1)))
  batch = state_lib.global_batch(local, setup.mesh, with_pair_mask=False, reference_table=setup.train_ref)
  step = state_lib.jit_train_step(setup.spec, setup.dpo_config, batch, grad_accum_steps=c.train.grad_accum_steps)
  m = step.lower(setup.state, setup.ref_state, batch).compile().memory_analysis()
  return {"step_temp_bytes": int(m.temp_size_in_bytes), "step_argument_bytes": int(m.argument_size_in_bytes),
          "step_output_bytes": int(m.output_size_in_bytes), "batch_shape": list(batch.chosen.sequences.shape)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/artifex-peak-memory")
  parser.add_argument("--vocab", type=int, default=131072)
  parser.add_argument("--prompt_len", type=int, default=1024)
  parser.add_argument("--response_len", type=int, default=3000)
  parser.add_argument("--pairs", type=int, default=4)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("extra", nargs="*", help="--config.* overrides for the run (after --)")
  a = parser.parse_args()
  case = make_case(os.path.join(a.workdir, "case"), a.vocab, a.prompt_len, a.response_len, a.pairs)
  args = run_args(case, a.steps, a.extra)
  run_dir = os.path.join(a.workdir, "run")
  shutil.rmtree(run_dir, ignore_errors=True)
  code, peak, seconds = run_peak_rss(args, run_dir)
  report = {"vocab": a.vocab, "exit_code": code, "peak_rss_bytes": peak, "run_s": round(seconds, 1)}
  print(f"run: exit code {code}, peak RSS {peak / 1e9:.2f} GB; compiling the step for its memory ...",
        file=sys.stderr, flush=True)
  report.update(compiled_step_memory(args, os.path.join(a.workdir, "compile")))
  report["peak_rss_gb"] = round(peak / 1e9, 2)
  report["step_temp_mib"] = round(report["step_temp_bytes"] / 2**20)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
