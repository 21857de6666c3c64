"""Tokenize once: first-run tokenization time, restart time to the first batch, and memory per process.

    python benchmarks/tokenize_cache.py --pairs=1000000 --workdir=/tmp/tokbench [--processes=1,2]

Generates a preference set (prompts ~200 tokens, responses ~300 each) and trains a byte-level BPE
tokenizer on a sample of it with `tokenizers`. Then, for each process count P, starts P real
processes (jax.distributed on 127.0.0.1, as the trainer does) that each

1. tokenize their ~1/P of the records into a fresh ``data_cache`` (``artifex_dpo.data.cache``): the
   first run's tokenization time (wall, and CPU seconds of each process, all its threads), and the
   records each process tokenized;
2. start again on the same cache: the time from the call to the first batch in hand (the data part
   of a restart's time to its first step: cache lookup, the per-pair table, the loader's first batch),
   and from the process's spawn to that batch (interpreter, imports, jax.distributed included);
3. report the peak resident memory (``ru_maxrss``) and the resident memory the data adds on the restart
   (RSS after loading and reading ``--batches`` batches of 64 pairs, minus RSS before the load, with the
   libraries already imported), next to the token buffer's size.

Prints one JSON line per process count (with the machine's CPU count and its 1-minute load average
before the first run, between the runs and after the restart: wall times on a shared machine are
CPU seconds divided by the share it gave), progress on stderr. The generated set stays in
``--workdir`` (reused by the next run of that size); each process count's cache is deleted after its
line unless ``--keep``. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)



def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def generate(path: str, pairs: int, seed: int = 0) -> None:
  """Random words from a 5000-word vocabulary: ~1 BPE token a word, so prompts ~200 tokens, responses ~300."""
  rng = random.Random(seed)
  syll = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "gor", "lin", "tes", "pra", "ul"]
  words = np.array(["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(5000)], object)
  choices = np.random.default_rng(seed)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    for start in range(0, pairs, 10_000):
      n = min(10_000, pairs - start)
      picks = words[choices.integers(0, len(words), size=(n, 800))]
      f.write("".join(json.dumps({"prompt": " ".join(row[:200]), "chosen": " ".join(row[200:500]),
                                  "rejected": " ".join(row[500:])}) + "\n" for row in picks.tolist()))
  os.replace(tmp, path)  # a run killed while generating leaves no truncated set behind


def train_tokenizer(data: str, folder: str, sample: int = 5000) -> None:
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers

  texts = []
  with open(data) as f:
    for i, line in enumerate(f):
      if i >= sample:
        break
      r = json.loads(line)
      texts += [r["prompt"], r["chosen"], r["rejected"]]
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def worker(args) -> None:
  import jax

  if args.process_count > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.process_count,
                               process_id=args.process_index)
  from artifex_dpo.data import PreferenceLoader, cache, load_tokenizer

  tok = load_tokenizer(args.tokenizer)
  kw = dict(max_length=1024, max_prompt_length=512, process_index=args.process_index,
            process_count=args.process_count)
  out = {"process": args.process_index}
  if args.phase == "first":
    calls = []
    real = cache.tokenize_pairs
    cache.tokenize_pairs = lambda texts, t: calls.append(len(texts)) or real(texts, t)
    t, cpu = time.perf_counter(), _cpu_s()
    ds = cache.load_or_tokenize(args.data, tok, args.cache, **kw)
    out.update(tokenize_s=time.perf_counter() - t, tokenize_cpu_s=_cpu_s() - cpu, records_tokenized=sum(calls),
               pairs=len(ds))
  else:
    import grain  # noqa: F401  (imported before the baseline: its import is not data)

    if args.process_count > 1:  # the cache key's broadcast compiles a collective: not data either
      from jax.experimental import multihost_utils

      multihost_utils.broadcast_one_to_all(np.zeros(20, np.uint8))

    before = _rss_bytes()
    t = time.perf_counter()
    ds = cache.load_or_tokenize(args.data, tok, args.cache, **kw)
    loader = PreferenceLoader(ds, 64, seed=0, process_index=args.process_index, process_count=args.process_count,
                              pad_multiple=64, max_length=1024)
    it = iter(loader)
    next(it)
    out["restart_to_first_batch_s"] = time.perf_counter() - t
    # From the process's spawn (interpreter, imports, jax.distributed, tokenizer) to its first batch.
    out["spawn_to_first_batch_s"] = time.time() - args.spawned
    for _ in range(args.batches - 1):  # then keep reading: the resident size must not grow with the data
      next(it)
    out.update(data_rss_bytes=_rss_bytes() - before,
               token_buffer_bytes=int(ds.tokens.nbytes), pair_table_bytes=int(ds.offsets.nbytes + ds.lengths.nbytes))
  out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RESULT " + json.dumps(out), flush=True)


def _cpu_s() -> float:
  """CPU seconds of this process, all threads (the tokenizer's own thread pool included)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)


def run_processes(args, processes: int, phase: str, cache_dir: str) -> list[dict]:
  port = 20000 + random.randint(0, 20000)
  cmds = [[sys.executable, os.path.abspath(__file__), "--worker", f"--phase={phase}", f"--data={args.data}",
           f"--tokenizer={args.tokenizer}", f"--cache={cache_dir}", f"--process_index={i}",
           f"--process_count={processes}", f"--coordinator=127.0.0.1:{port}", f"--batches={args.batches}",
           f"--spawned={time.time()!r}"] for i in range(processes)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
  results = []
  for p in procs:
    stdout, stderr = p.communicate()
    if p.returncode:
      raise SystemExit(stderr[-3000:])
    results += [json.loads(l[len("RESULT "):]) for l in stdout.splitlines() if l.startswith("RESULT ")]
  return results


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--pairs", type=int, default=1_000_000)
  ap.add_argument("--workdir", default="/tmp/tokbench")
  ap.add_argument("--processes", default="1,2")
  ap.add_argument("--worker", action="store_true")
  ap.add_argument("--phase", default="first")
  ap.add_argument("--data")
  ap.add_argument("--tokenizer")
  ap.add_argument("--cache")
  ap.add_argument("--process_index", type=int, default=0)
  ap.add_argument("--process_count", type=int, default=1)
  ap.add_argument("--coordinator")
  ap.add_argument("--keep", action="store_true", help="keep each process count's cache (deleted by default)")
  ap.add_argument("--spawned", type=float, default=0.0)
  ap.add_argument("--batches", type=int, default=50, help="batches read on the restart before measuring memory")
  args = ap.parse_args()
  if args.worker:
    worker(args)
    return
  os.makedirs(args.workdir, exist_ok=True)
  args.data = os.path.join(args.workdir, f"prefs-{args.pairs}.jsonl")
  args.tokenizer = os.path.join(args.workdir, "tokenizer")
  if not os.path.isfile(args.data):
    _log(f"generating {args.pairs} pairs")
    t = time.perf_counter()
    generate(args.data, args.pairs)
    _log(f"generated in {time.perf_counter() - t:.1f} s: {os.path.getsize(args.data) / 1e9:.2f} GB")
  if not os.path.isdir(args.tokenizer):
    t = time.perf_counter()
    train_tokenizer(args.data, args.tokenizer)
    _log(f"tokenizer trained in {time.perf_counter() - t:.1f} s")
  for processes in (int(x) for x in args.processes.split(",")):
    cache_dir = os.path.join(args.workdir, f"cache-p{processes}")
    shutil.rmtree(cache_dir, ignore_errors=True)
    load = [os.getloadavg()[0]]
    _log(f"{processes} process(es): first run")
    first = run_processes(args, processes, "first", cache_dir)
    load.append(os.getloadavg()[0])
    _log(f"{processes} process(es): first run done ({max(r['tokenize_s'] for r in first):.1f} s); restart")
    restart = run_processes(args, processes, "restart", cache_dir)
    load.append(os.getloadavg()[0])
    tok_s = max(r["tokenize_s"] for r in first)
    restart_s = max(r["restart_to_first_batch_s"] for r in restart)
    print(json.dumps({
        "pairs": args.pairs, "processes": processes, "cpus": os.cpu_count(),
        "load_avg_1min_start_mid_end": [round(x, 1) for x in load],
        "first_run_tokenize_s": round(tok_s, 2),
        "first_run_tokenize_cpu_s_per_process": [round(r["tokenize_cpu_s"], 1) for r in first],
        "records_tokenized_per_process": [r["records_tokenized"] for r in first],
        "restart_to_first_batch_s": round(restart_s, 3),
        "restart_over_first": round(restart_s / tok_s, 5),
        "spawn_to_first_batch_s": round(max(r["spawn_to_first_batch_s"] for r in restart), 2),
        "token_buffer_bytes": restart[0]["token_buffer_bytes"], "pair_table_bytes": restart[0]["pair_table_bytes"],
        "tokens_per_pair": round(restart[0]["token_buffer_bytes"] / 4 / first[0]["pairs"], 1),
        "data_rss_bytes_per_process": [r["data_rss_bytes"] for r in restart],
        "peak_rss_bytes_per_process": [r["peak_rss_bytes"] for r in restart],
        "first_run_peak_rss_bytes_per_process": [r["peak_rss_bytes"] for r in first],
    }), flush=True)
    if not args.keep:
      shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
