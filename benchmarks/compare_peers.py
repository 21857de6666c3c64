"""Ours vs TRL (and optionally Tunix) on the standard workload, side by side, in one run.

    python benchmarks/compare_peers.py [--workload=/tmp/wl] [--steps=12] [--tunix_python=PATH]

Writes the workload with ``../shared/bench/make_workload.py`` if absent, then runs, one after the
other on this machine: ours without data-set packing (reference model in memory): the default layout
(``data.pack_batches`` + ``data.share_prompt``), padded batches (``data.pack_batches=False``) and packed rows
without ``data.share_prompt``,
ours with packing and precomputed reference log-probs (with and without ``data.share_prompt``), TRL's
DPOTrainer (``peer_trl.py``) with its reference model and with ``PRECOMPUTE=1``, and Tunix
(``peer_tunix.py``) when a Python with google-tunix is given; each peer with and without glibc malloc's
huge-page mode, the faster counting.
Prints each result as a JSON line, then a table with the ratios to the faster peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from artifex_dpo import hugepages  # noqa: E402
BENCH = os.path.join(os.path.dirname(ROOT), "shared", "bench")


def _json_line(out: str) -> dict:
  for line in reversed(out.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  raise RuntimeError(f"no JSON line in:\n{out[-3000:]}")


def run(cmd, env=None) -> dict:
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
  return _json_line(proc.stdout)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workload", default="/tmp/artifex-wl")
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--bench", default=BENCH, help="folder with make_workload.py, peer_trl.py, peer_tunix.py")
  p.add_argument("--tunix_python", default=None, help="a Python with google-tunix installed")
  p.add_argument("--pad_multiple", type=int, default=16)
  a = p.parse_args()
  py = sys.executable
  if not os.path.exists(os.path.join(a.workload, "hf_model", "config.json")):
    subprocess.run([py, os.path.join(a.bench, "make_workload.py"), a.workload], check=True)
  ours = [py, "benchmarks/step_throughput.py", f"--workload={a.workload}", f"--steps={a.steps}",
          f"--config.data.pad_multiple={a.pad_multiple}", "--config.model.scan_unroll=4"]
  cpu = {"JAX_PLATFORMS": "cpu"}
  packed = ["--workdir=/tmp/artifex-bench-packed", "--config.data.packing=True", "--config.dpo.precompute_ref_logps=True"]
  results = {  # the default layout first: per-batch packed rows with shared prompts
      "ours_default": run(ours + ["--workdir=/tmp/artifex-bench-default", "--label=ours_default"], cpu),
      "ours_padded": run(ours + ["--workdir=/tmp/artifex-bench-default", "--label=ours_padded",
                                 "--config.data.pack_batches=False"], cpu),
      "ours_pack_batches_unshared": run(ours + ["--workdir=/tmp/artifex-bench-default", "--config.data.pack_batches=True",
                                                "--config.data.share_prompt=False",
                                                "--label=ours_pack_batches_unshared"], cpu),
      "ours_packed_precomputed": run(ours + packed + ["--label=ours_packed_precomputed"], cpu),
      "ours_packed_precomputed_shared": run(ours + packed + ["--config.data.share_prompt=True",
                                                             "--label=ours_packed_precomputed_shared"], cpu),
  }
  # Ours runs with glibc malloc's huge-page mode (artifex_dpo/hugepages.py); the peers run both with and
  # without it, and the faster of the two counts.
  trl = [py, os.path.join(a.bench, "peer_trl.py"), a.workload, str(a.steps)]
  peers = [("trl", trl, {}), ("trl_precompute", trl, {"PRECOMPUTE": "1"})]
  if a.tunix_python:
    peers.append(("tunix", [a.tunix_python, os.path.join(a.bench, "peer_tunix.py"), a.workload, str(a.steps)], cpu))
  huge = {"GLIBC_TUNABLES": hugepages.TUNABLE}
  for name, cmd, env in peers:
    plain, with_huge = run(cmd, env), run(cmd, dict(env, **huge))
    results[name] = dict(max(plain, with_huge, key=lambda r: r["tokens_per_s"]),
                         tokens_per_s_plain_malloc=plain["tokens_per_s"],
                         tokens_per_s_hugepages=with_huge["tokens_per_s"])
  for name, r in results.items():
    print(json.dumps({"name": name, **r}))
  peers = [results[k]["tokens_per_s"] for k in ("trl", "tunix") if k in results]
  fastest = max(peers)
  print(f"\n{'setting':28s} {'tokens/s':>9s} {'vs faster peer':>15s} {'vs TRL precompute':>18s} {'mfu':>6s} "
        f"{'memory (MB)':>12s}")
  for name, r in results.items():
    mem = r.get("memory", {}).get("total_bytes")
    print(f"{name:28s} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / fastest:15.2f} "
          f"{r['tokens_per_s'] / results['trl_precompute']['tokens_per_s']:18.2f} "
          f"{r.get('mfu', float('nan')):6.3f} {mem / 2**20 if mem else float('nan'):12.0f}")


if __name__ == "__main__":
  main()
