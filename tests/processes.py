"""Starting `python -m artifex_dpo.main` as one or several real processes (jax.distributed on 127.0.0.1)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, *overrides, processes=1, devices=1, config="configs/tiny.py"):
  """Starts the processes of one run (each with `devices` CPU devices); returns the Popen handles."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  base = [sys.executable, "-m", "artifex_dpo.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  if processes > 1:
    port = free_port()
    cmds = [base + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
            for i in range(processes)]
  else:
    cmds = [base]
  return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for cmd in cmds]


def wait(procs, timeout=600):
  """``[(returncode, stderr)]`` of every process; kills all of them on a timeout."""
  out = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append((p.returncode, err))
  return out
