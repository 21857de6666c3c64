"""Two real processes on 127.0.0.1 (jax.distributed + gloo) give the single-process losses."""

import numpy as np

from processes import start, wait
from service_runs import read_rows, run_main

ARGS = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.export.hf=False", "--config.checkpoint.save_every=0", "--config.data.synthetic_pairs=256",
        "--config.train.global_batch_size=8", "--config.train.eval_batch_size=16"]


def run_two_processes(workdir, *overrides, timeout=600):
  return wait(start(workdir, *overrides, processes=2), timeout=timeout)


def test_two_processes_match_one(tmp_path):
  single = run_main(tmp_path / "one", *ARGS)
  assert single.returncode == 0, single.stderr[-3000:]
  outs = run_two_processes(tmp_path / "two", *ARGS)
  for code, err in outs:
    assert code == 0, err[-4000:]
  _, one, eval_one = read_rows(tmp_path / "one")
  _, two, eval_two = read_rows(tmp_path / "two")
  assert sorted(one) == sorted(two) == list(range(1, 7))
  for step in one:
    for key in ("loss", "rewards/margins", "logps/chosen", "tokens"):
      np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, atol=1e-6, err_msg=f"{key}@{step}")
  np.testing.assert_allclose(eval_two[-1]["eval/loss"], eval_one[-1]["eval/loss"], rtol=1e-5)
  # Each process read only its half of every global batch.
  for i, (_, err) in enumerate(outs):
    assert f"process {i} of 2 read 24 training pairs" in err
  assert "process 0 of 1 read 48 training pairs" in single.stderr
