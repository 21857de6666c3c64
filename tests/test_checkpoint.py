"""Preemption, resume, crash safety, resharding, non-finite guard: real processes, real signals."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from processes import start, wait
from service_runs import assert_identical, error_line, final_rows, run_main, stop_with_sigterm, wait_for_step

BASE = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.checkpoint.save_every=0",
        "--config.data.synthetic_pairs=256", "--config.train.global_batch_size=8", "--config.train.eval_batch_size=16",
        "--config.optim.learning_rate=1e-3"]
STEPS = 400


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp("uninterrupted")
  (code, err), = wait(start(d, *BASE, f"--config.train.steps={STEPS}"))
  assert code == 0, err[-3000:]
  return d


def test_sigterm_saves_exits_75_and_resumes_bit_exact(uninterrupted, tmp_path):
  d = tmp_path / "run"
  stopped = stop_with_sigterm(d, start(d, *BASE, f"--config.train.steps={STEPS}"), STEPS)
  assert (d / "checkpoints" / str(stopped)).is_dir() and not (d / "export").exists()
  (code, err), = wait(start(d, *BASE, f"--config.train.steps={STEPS}"))
  assert code == 0, err[-3000:]
  assert f"resumed from {d / 'checkpoints'}/{stopped}" in err
  assert_identical(uninterrupted, d, STEPS)


def test_sigterm_two_processes_resume_bit_exact(tmp_path):
  steps = 40
  ref = tmp_path / "ref"
  for code, err in wait(start(ref, *BASE, f"--config.train.steps={steps}", processes=2)):
    assert code == 0, err[-3000:]
  d = tmp_path / "run"
  procs = start(d, *BASE, f"--config.train.steps={steps}", processes=2)
  wait_for_step(d, 5, procs)
  for p in procs:  # GKE sends SIGTERM to every pod
    p.send_signal(signal.SIGTERM)
  results = wait(procs)
  assert [c for c, _ in results] == [75, 75], results[0][1][-3000:]
  for code, err in wait(start(d, *BASE, f"--config.train.steps={steps}", processes=2)):
    assert code == 0, err[-3000:]
  assert_identical(ref, d, steps)


def test_kill9_during_async_saves_leaves_no_loadable_partial_checkpoint(uninterrupted, tmp_path):
  d = tmp_path / "run"
  args = [*BASE, f"--config.train.steps={STEPS}", "--config.checkpoint.save_every=1", "--config.checkpoint.max_to_keep=2"]
  procs = start(d, *args)
  wait_for_step(d, 30, procs)
  procs[0].send_signal(signal.SIGKILL)  # most likely in the middle of one of the per-step async saves
  wait(procs)
  (code, err), = wait(start(d, *args))
  assert code == 0, err[-3000:]
  assert "resumed from" in err
  assert_identical(uninterrupted, d, STEPS)


def test_checkpoint_reshards_onto_another_mesh_and_process_count(tmp_path):
  common = [*BASE, "--config.export.hf=False"]
  single = tmp_path / "single"
  (code, err), = wait(start(single, *common, "--config.train.steps=12"))
  assert code == 0, err[-3000:]
  d = tmp_path / "run"
  (code, err), = wait(start(d, *common, "--config.train.steps=6", "--config.mesh.ici.fsdp=8", devices=8))
  assert code == 0, err[-3000:]
  results = wait(start(d, *common, "--config.train.steps=12", "--config.mesh.ici.data=2", "--config.mesh.ici.fsdp=-1",
                       processes=2, devices=2))
  for code, err in results:
    assert code == 0, err[-3000:]
  assert "resumed from" in results[0][1]
  a, _ = final_rows(single)
  b, _ = final_rows(d)
  assert sorted(b) == list(range(1, 13))
  for s in range(1, 13):  # different meshes sum in different orders: equal up to float rounding
    np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-4, atol=1e-6, err_msg=str(s))
    np.testing.assert_allclose(b[s]["rewards/margins"], a[s]["rewards/margins"], rtol=1e-3, atol=1e-5)


def test_nonfinite_steps_stop_with_exit_3_and_keep_the_last_good_state(tmp_path):
  import orbax.checkpoint as ocp

  d = tmp_path / "run"
  proc = run_main(d, *BASE, "--config.train.steps=50", "--config.optim.learning_rate=1e30",
                  "--config.optim.grad_clip_norm=0", "--config.train.max_nonfinite_steps=3")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "non-finite steps in a row" in proc.stderr
  train, _ = final_rows(d)
  nonfinite = [s for s, r in sorted(train.items()) if r["nonfinite"]]
  assert len(nonfinite) == 3 and nonfinite == list(range(nonfinite[0], nonfinite[0] + 3))
  assert train[nonfinite[-1]]["train/nonfinite_steps"] == 3
  steps = sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
  assert steps
  restored = ocp.StandardCheckpointer().restore(d / "checkpoints" / str(steps[-1]) / "state")
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored)]
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f")


def test_mismatched_or_foreign_checkpoint_is_refused_naming_the_path(tmp_path):
  from test_data_util import write_hf_folder

  d = tmp_path / "run"
  proc = run_main(d, *BASE, "--config.train.steps=3", "--config.export.hf=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A different vocabulary (another tokenizer) means another embedding shape.
  tok = write_hf_folder(tmp_path / "tok")
  proc = run_main(d, *BASE, "--config.train.steps=6", f"--config.data.tokenizer={tok}",
                  "--config.checkpoint.allow_change=True")
  assert proc.returncode == 2
  line = error_line(proc)
  assert str(d / "checkpoints" / "3") in line and "embed" in line and "shape" in line
  # A foreign folder that looks like a newer step is damage, not another model: moved aside (kept), and
  # the run resumes from step 3.
  (d / "checkpoints" / "9").mkdir()
  (d / "checkpoints" / "9" / "junk.bin").write_bytes(b"\0" * 100)
  proc = run_main(d, *BASE, "--config.train.steps=4", "--config.export.hf=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"checkpoint {d / 'checkpoints' / '9'} is damaged" in proc.stderr
  assert f"resumed from {d / 'checkpoints'}/3" in proc.stderr
  assert next((d / "checkpoints").glob("9.damaged-*/junk.bin")).read_bytes() == b"\0" * 100
