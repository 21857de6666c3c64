"""Running `python -m artifex_dpo.main` in tests and reading what it wrote: exit, error line, metrics rows.

Shared by the service tests: :func:`run_main` runs one process to its end (for several processes, or
to signal a live one, see ``processes.py``); :func:`read_rows` and :func:`final_rows` read
``metrics.jsonl``; :func:`stop_with_sigterm` and :func:`assert_identical` are the preemption tests'
steps (stop a run mid-way, then compare the resumed run with an uninterrupted one bit for bit).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from processes import wait

ROOT = Path(__file__).resolve().parents[1]
# The metrics a resumed run must reproduce exactly (bitwise) for every step.
EXACT_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "grad_norm", "learning_rate", "tokens", "train/nonfinite_steps")


def run_main(workdir, *overrides, config="configs/tiny.py", timeout=600, extra_env=None):
  """Runs one process of the service to its end on CPU; returns the ``subprocess.CompletedProcess``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(extra_env or {}))
  cmd = [sys.executable, "-m", "artifex_dpo.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def read_rows(workdir):
  """``(all rows, {step: training row}, [eval rows])`` of the workdir's ``metrics.jsonl``."""
  rows = [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]
  train = {r["step"]: r for r in rows if "loss" in r}
  evals = [r for r in rows if "eval/loss" in r]
  return rows, train, evals


def error_line(proc) -> str:
  """The one ``artifex_dpo: error:`` line of a finished process's stderr (asserts there is exactly one)."""
  lines = [l for l in proc.stderr.splitlines() if l.startswith("artifex_dpo: error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def wait_for_step(workdir, step, procs, timeout=300):
  """Returns once ``metrics.jsonl`` has a training row for ``step`` or later; fails if a process ends first."""
  path = Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists():
      rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
      if any(r.get("step", 0) >= step and "loss" in r for r in rows):
        return
    if any(p.poll() is not None for p in procs):
      raise AssertionError(f"process ended before step {step}: {[p.returncode for p in procs]}")
    time.sleep(0.02)
  raise AssertionError(f"step {step} not reached")


def final_rows(workdir):
  """The row that counts for each step: the later one when a resumed run repeats a step."""
  rows, _, _ = read_rows(workdir)
  train, evals = {}, {}
  for r in rows:
    (evals if "eval/loss" in r else train)[r["step"]] = r
  return train, evals


def stop_with_sigterm(workdir, procs, steps, after=5):
  """Sends SIGTERM to the first of ``procs`` once step ``after`` is logged; returns the last step logged.

  Asserts the preemption contract: exit 75, stopped at or after ``after`` and before ``steps``.
  """
  wait_for_step(workdir, after, procs)
  procs[0].send_signal(signal.SIGTERM)
  (code, err), = wait(procs)
  assert code == 75, err[-3000:]
  stopped = max(final_rows(workdir)[0])
  assert after <= stopped < steps
  return stopped


def exported_tensors(workdir) -> dict[str, np.ndarray]:
  """Every tensor of the run's export: the safetensors files of ``export/`` (one, or one per writing host)."""
  files = sorted((Path(workdir) / "export").glob("*.safetensors"))
  assert files, f"no safetensors in {workdir}/export"
  return {k: v for f in files for k, v in load_file(f).items()}


def assert_identical(a_dir, b_dir, steps):
  """Two runs logged the same steps 1..steps with bitwise equal metrics and evals, and exported equal weights."""
  a, a_eval = final_rows(a_dir)
  b, b_eval = final_rows(b_dir)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  for s in a:
    for k in EXACT_KEYS:
      assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
  assert a_eval.keys() == b_eval.keys()
  for s in a_eval:
    assert a_eval[s]["eval/loss"] == b_eval[s]["eval/loss"]
  wa, wb = exported_tensors(a_dir), exported_tensors(b_dir)
  assert wa.keys() == wb.keys()
  for k in wa:
    np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)  # bitwise
