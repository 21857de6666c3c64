"""LoRA vs full training, side by side on the standard workload (a benchmark, never a test).

    python benchmarks/lora_vs_full.py --workload=WL [--steps=12] [--rank=16]

Runs ``step_throughput.py`` once per setting, one after the other on the same machine: full
training (policy + reference model in memory), LoRA with a float32 base (the reference is the base,
adapters off), and QLoRA with an int8 and an NF4 base. Prints one JSON line per setting and a
summary line with each one's tokens/s relative to full training. CPU numbers drift with the load:
compare only lines from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workload", required=True)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--workdir", default="/tmp/artifex-lora-bench")
  args = parser.parse_args()
  settings = {
      "full": [],
      f"lora-r{args.rank}-fp32": [f"--config.lora.rank={args.rank}", "--config.lora.base_dtype=float32"],
      f"qlora-r{args.rank}-int8": [f"--config.lora.rank={args.rank}", "--config.lora.base_dtype=int8"],
      f"qlora-r{args.rank}-nf4": [f"--config.lora.rank={args.rank}", "--config.lora.base_dtype=nf4"],
  }
  results = {}
  for label, extra in settings.items():
    cmd = [sys.executable, os.path.join(HERE, "step_throughput.py"), f"--workload={args.workload}",
           f"--workdir={os.path.join(args.workdir, label)}", f"--steps={args.steps}", f"--label={label}", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    results[label] = json.loads(line)
    print(line, flush=True)
  full = results["full"]["tokens_per_s"]
  print(json.dumps({"summary": {k: {"tokens_per_s": v["tokens_per_s"], "vs_full": round(v["tokens_per_s"] / full, 3),
                                    "step_bytes": v["memory"].get("total_bytes")} for k, v in results.items()}}))


if __name__ == "__main__":
  main()
