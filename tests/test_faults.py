"""The faults a pod meets, with real processes: damaged checkpoints, two runs on one workdir, signals
in every phase, storage errors, export leftovers.

To keep the suite short, one module fixture plays a single story on one workdir (a small tmpfs when
the tests run as root, so that the disk can fill up) and records what every process did; the tests
below check one case each. Runs use the tiny config with 64 synthetic pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import ROOT
from service_runs import error_line, run_main

FAST = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.data.synthetic_pairs=64",
        "--config.train.global_batch_size=8", "--config.train.eval_batch_size=8", "--config.export.hf=False",
        "--config.checkpoint.save_every=1", "--config.checkpoint.max_to_keep=4",
        "--config.optim.learning_rate=1e-3"]
LONG = "--config.train.steps=100000"
ROOT_ONLY = os.geteuid() == 0 and shutil.which("mount") is not None
COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate")


def start_logged(workdir, *args, log_dir: Path) -> subprocess.Popen:
  """Like processes.start, with stderr to a file (a long run's log would fill a pipe and block it)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  log = log_dir / f"log-{time.time_ns()}.txt"
  cmd = [sys.executable, "-m", "artifex_dpo.main", "--config=configs/tiny.py", f"--workdir={workdir}", *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True)
  proc.log = log
  return proc


def finish(proc, timeout=600) -> tuple[int, str]:
  """``(returncode, stderr)``; kills the process on a timeout."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, proc.log.read_text()


def rows(workdir) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      pass  # the row being written right now
  return out


def wait_until(predicate, procs, what, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if any(p.poll() is not None for p in procs):
      out = [p.log.read_text()[-3000:] for p in procs]
      raise AssertionError(f"process ended before {what}: {[p.returncode for p in procs]} {out}")
    time.sleep(0.02)
  raise AssertionError(f"timed out waiting for {what}")


def lease_pid(workdir) -> int | None:
  try:
    return json.loads((Path(workdir) / "lease.json").read_text())["pid"]
  except (OSError, ValueError, KeyError):
    return None


def holds_lease(workdir, proc):
  return lambda: lease_pid(workdir) == proc.pid


def reached(workdir, step):
  return lambda: any(r.get("step", 0) >= step and "loss" in r for r in rows(workdir))


def steps_of(workdir) -> list[int]:
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def biggest_data_file(ckpt: Path) -> Path:
  return max((p for p in (ckpt / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


class Story(dict):
  """What happened: name -> (returncode, stderr), plus facts recorded along the way."""


@pytest.fixture(scope="module")
def story(tmp_path_factory):
  base = tmp_path_factory.mktemp("faults")
  mount = base / "disk"
  mount.mkdir()
  mounted = False
  if ROOT_ONLY:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)]).returncode == 0
  w = mount / "w"
  s = Story(mounted=mounted, workdir=w, cache=base / "jax_cache")
  try:
    _play(s, w, mount)
    yield s
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(mount)])


def _play(s: Story, w: Path, mount: Path) -> None:
  # The compilation cache moved out of the workdir (train.compilation_cache) and shared by all runs.
  logs = Path(s["cache"]).parent

  def start(workdir, *args):
    return [start_logged(workdir, *args, f"--config.train.compilation_cache={s['cache']}", log_dir=logs)]

  def wait(procs, timeout=600):
    return [finish(p, timeout) for p in procs]
  # A: a long run; B: a second run on the same workdir while A is alive.
  (a,) = start(w, *FAST, LONG)
  wait_until(holds_lease(w, a), [a], "A holds the lease")
  s["lease_doc"] = json.loads((w / "lease.json").read_text())
  s["a_pid"] = a.pid
  wait_until(reached(w, 4), [a], "A at step 4")
  s["B"] = wait(start(w, *FAST, LONG), timeout=120)[0]
  # Ctrl-C during training: A saves its step and exits 130.
  a.send_signal(signal.SIGINT)
  s["A"] = wait([a])[0]
  s["a_rows"] = {r["step"]: r for r in rows(w) if "loss" in r}
  s["a_last"] = max(s["a_rows"])
  s["a_checkpoints"] = steps_of(w)
  s["lease_after_A"] = (w / "lease.json").exists()
  # D: killed with -9 while it holds the lease; G: takes the lease over at once, gets SIGTERM before
  # its first step; H: the same with Ctrl-C.
  (d,) = start(w, *FAST, LONG)
  wait_until(holds_lease(w, d), [d], "D holds the lease")
  d.kill()
  wait([d])
  s["lease_after_kill9"] = lease_pid(w)
  s["d_pid"] = d.pid
  for name, signum in (("G", signal.SIGTERM), ("H", signal.SIGINT)):
    (p,) = start(w, *FAST, LONG)
    t0 = time.time()
    wait_until(holds_lease(w, p), [p], f"{name} holds the lease")
    s[f"{name}_lease_wait"] = time.time() - t0
    p.send_signal(signum)
    s[name] = wait([p], timeout=60)[0]
  s["checkpoints_after_setup_signals"] = steps_of(w)
  # Damage the newest checkpoints four ways; E must resume from the one before them.
  k = s["a_last"]
  ck = w / "checkpoints"
  truncated = biggest_data_file(ck / str(k))
  with open(truncated, "r+b") as f:
    f.truncate(truncated.stat().st_size // 2)
  biggest_data_file(ck / str(k - 1)).unlink()
  (ck / str(k - 2) / "state" / "_METADATA").unlink()
  (ck / str(k + 1)).mkdir()
  (e,) = start(w, *FAST, LONG)
  wait_until(reached(w, k + 2), [e], "E past the damaged steps")
  s["e_rows"] = {r["step"]: r for r in rows(w) if "loss" in r}
  filler = mount / "filler"
  if s["mounted"]:
    # The disk fills up in the middle of the run (E writes meanwhile): the next save fails.
    with open(filler, "wb", buffering=0) as f:
      try:
        while True:
          f.write(b"\0" * (64 * 1024))
      except OSError:
        pass
    s["E"] = wait([e], timeout=120)[0]
    s["checkpoints_after_full"] = steps_of(w)
    filler.unlink()
  else:
    e.send_signal(signal.SIGTERM)
    s["E"] = wait([e], timeout=120)[0]
  s["checkpoints_after_E"] = steps_of(w)
  s["damaged_after_E"] = sorted(p.name for p in ck.iterdir() if ".damaged-" in p.name)
  # F: the rerun after space is freed finishes and exports; a stale export temp folder (a killed
  # export) is cleaned at its start.
  (w / ".export.tmp-12345").mkdir()
  (w / ".export.tmp-12345" / "model.safetensors").write_bytes(b"partial")
  last_good = max(steps_of(w))
  s["f_resume_from"] = last_good
  s["f_steps"] = last_good + 2
  s["F"] = wait(start(w, *FAST, f"--config.train.steps={last_good + 2}", "--config.export.hf=True"))[0]
  # N: every checkpoint damaged: exit 2 naming the folder, nothing moved.
  for step in steps_of(w):
    (ck / str(step) / "state" / "_METADATA").unlink()
  s["n_steps_before"] = steps_of(w)
  s["N"] = wait(start(w, *FAST, f"--config.train.steps={last_good + 4}"))[0]
  s["n_steps_after"] = steps_of(w)


def test_second_live_run_is_refused_naming_the_holder(story):
  code, err = story["B"]
  assert code == 2, err[-3000:]
  line = [l for l in err.splitlines() if l.startswith("artifex_dpo: error:")]
  assert len(line) == 1 and "Traceback" not in err, err[-3000:]
  assert f"pid {story['a_pid']}" in line[0] and socket.gethostname() in line[0]
  assert story["lease_doc"]["start_time"] in line[0]
  # Only A wrote metrics: every step once.
  steps = [r["step"] for r in rows(story["workdir"]) if "loss" in r and r["step"] <= story["a_last"]]
  assert sorted(set(steps)) == list(range(1, story["a_last"] + 1))


def test_ctrl_c_in_training_saves_and_exits_130_with_one_line(story):
  code, err = story["A"]
  assert code == 130, err[-3000:]
  assert "Traceback" not in err
  lines = [l for l in err.splitlines() if "interrupted" in l]
  assert len(lines) == 1 and f"saved step {story['a_last']}" in lines[0], lines
  assert story["a_last"] in story["a_checkpoints"]
  assert not story["lease_after_A"]


def test_kill9_leaves_the_lease_and_the_restart_takes_it_over_at_once(story):
  assert story["lease_after_kill9"] == story["d_pid"]
  code, err = story["G"]
  assert f"took over the workdir lease of host {socket.gethostname()} pid {story['d_pid']}" in err
  assert "its process is gone" in err
  assert story["G_lease_wait"] < 60


def test_signals_before_the_first_step_exit_75_and_130_at_once(story):
  code, err = story["G"]
  assert code == 75, err[-3000:]
  assert "preempted (SIGTERM) with nothing unsaved" in err and "Traceback" not in err
  code, err = story["H"]
  assert code == 130, err[-3000:]
  assert "interrupted (Ctrl-C) with nothing unsaved" in err and "Traceback" not in err
  assert story["checkpoints_after_setup_signals"] == story["a_checkpoints"]
  assert not (Path(story["workdir"]) / "lease.json").exists() or lease_pid(story["workdir"]) != story["d_pid"]


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_bitwise(story):
  code, err = story["E"]
  w, k = Path(story["workdir"]), story["a_last"]
  ck = w / "checkpoints"
  warnings = [l for l in err.splitlines() if " is damaged (" in l]
  assert len(warnings) == 4, warnings
  assert "Traceback" not in err  # one line each (tensorstore's late callbacks included)
  for step, why in ((k + 1, "the folder is empty"), (k, "cannot read the state's arrays"),
                    (k - 1, "cannot read the state's arrays"), (k - 2, "state/_METADATA")):
    line = next(l for l in warnings if f"checkpoint {ck / str(step)} is damaged" in l)
    assert why in line and "model" not in line, line
  assert f"resumed from {ck}/{k - 3}" in err
  assert sorted(n.split(".")[0] for n in story["damaged_after_E"]) == sorted(str(x) for x in (k - 2, k - 1, k, k + 1))
  # The steps after the fallback are bitwise those of the first run.
  for step in range(k - 2, k + 1):
    for key in COMPARED:
      assert story["e_rows"][step][key] == story["a_rows"][step][key], (step, key)


@pytest.mark.skipif(not ROOT_ONLY, reason="needs root to mount a small tmpfs (a disk that fills up)")
def test_full_disk_exits_2_keeps_the_last_checkpoint_and_the_rerun_resumes(story):
  assert story["mounted"]
  code, err = story["E"]
  assert code == 2, err[-3000:]
  line = error_line(type("P", (), {"stderr": err}))
  # The path: the checkpoint being saved, the metrics file, or the workdir (an error that names no file).
  assert "No space left on device" in line and str(story["workdir"]) in line, line
  assert "Traceback" not in err
  code, err = story["F"]
  assert code == 0, err[-3000:]
  assert f"resumed from {Path(story['workdir']) / 'checkpoints'}/{story['f_resume_from']}" in err


def test_export_records_its_step_has_one_mode_and_stale_temp_folders_are_cleaned(story):
  code, err = story["F"]
  assert code == 0, err[-3000:]
  w = Path(story["workdir"])
  # The row cut short when the disk filled up was cut off before the rerun appended to the file.
  for line in (w / "metrics.jsonl").read_text().splitlines():
    json.loads(line)
  assert not list(w.glob(".export.tmp-*"))
  assert "removed the stale export folder" in err
  export = w / "export"
  info = json.loads((export / "artifex_dpo_export.json").read_text())
  assert info["step"] == story["f_steps"]
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in export.iterdir() if p.is_file()}
  assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_no_restorable_checkpoint_exits_2_naming_the_folder_and_moves_nothing(story):
  code, err = story["N"]
  assert code == 2, err[-3000:]
  line = error_line(type("P", (), {"stderr": err}))
  assert f"{Path(story['workdir']) / 'checkpoints'}: no checkpoint restores" in line
  assert "Traceback" not in err
  assert story["n_steps_after"] == story["n_steps_before"]


# --- Storage errors at the start: one line, exit 2 ------------------------------------------------------------


def test_workdir_under_a_file_exits_2_naming_the_path(tmp_path):
  (tmp_path / "file").write_text("x")
  proc = run_main(tmp_path / "file" / "w", timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert str(tmp_path / "file" / "w") in line and "Not a directory" in line
  assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not ROOT_ONLY, reason="needs root to mount a read-only / a full tmpfs")
@pytest.mark.parametrize("options,needle", [("ro,size=1m", "Read-only file system"),
                                            ("size=64k", "No space left on device")])
def test_read_only_or_full_workdir_exits_2_naming_the_path(tmp_path, options, needle):
  mount = tmp_path / "disk"
  mount.mkdir()
  assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode == 0
  try:
    (mount / "w").mkdir()
    if options.startswith("ro"):
      subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    else:
      with open(mount / "filler", "wb") as f:
        try:
          f.write(b"\0" * (1 << 20))
        except OSError:
          pass
    proc = run_main(mount / "w", timeout=120)
  finally:
    subprocess.run(["umount", "-l", str(mount)])
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert str(mount / "w") in line and needle in line, line
  assert "Traceback" not in proc.stderr


# --- Data that says nothing, inputs that point elsewhere, config files that raise --------------------------------

DATA_RUN = ["--config.train.log_every=1", "--config.train.eval_every=0", "--config.data.eval_split=0",
            "--config.train.global_batch_size=8", "--config.train.eval_batch_size=8", "--config.export.hf=False",
            "--config.checkpoint.save_every=0"]


def test_identical_and_truncated_pairs_are_counted_and_a_second_ctrl_c_aborts(tmp_path):
  from artifex_dpo.data.synthetic import synthetic_records

  good = synthetic_records(32, seed=3)  # short prompts and responses: nothing cut (tiny: 32 prompt, 64 total)
  identical = [dict(r, rejected=r["chosen"]) for r in synthetic_records(6, seed=4)]
  long_prompt = [dict(r, prompt="Q: " + "p" * 80 + "?\nA:") for r in synthetic_records(5, seed=5)]
  long_response = [dict(r, chosen=" " + "c" * 90) for r in synthetic_records(3, seed=6)]
  path = tmp_path / "prefs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in good + identical + long_prompt + long_response))
  w = tmp_path / "w"
  proc = start_logged(w, *DATA_RUN, f"--config.data.train_files={path}", LONG, log_dir=tmp_path)
  wait_until(reached(w, 2), [proc], "step 2")
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  code, err = finish(proc, timeout=120)
  assert code == 130, err[-3000:]
  assert "interrupted again (Ctrl-C): aborted at once, without saving" in err and "Traceback" not in err
  row = next(r for r in rows(w) if "loss" in r)
  assert row["data/identical_pairs"] == 6
  # 5 long prompts cut to 32 tokens; 3 chosen responses of 91 bytes + EOS cut to fit 64 tokens.
  assert row["data/truncated_prompts"] == 5 and row["data/truncated_responses"] == 3
  line = next(l for l in err.splitlines() if "truncation:" in l)
  n = 32 + 5 + 3
  assert f"5 prompts ({100 * 5 / n:.1f}% of pairs)" in line and f"3 responses ({100 * 3 / (2 * n):.1f}%" in line
  # A data set made only of identical pairs trains nothing: exit 2.
  path.write_text("".join(json.dumps(r) + "\n" for r in identical))
  proc = run_main(tmp_path / "w2", *DATA_RUN, f"--config.data.train_files={path}", "--config.train.steps=2",
                  timeout=180)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert str(path) in line and "6 with identical chosen and rejected" in line


def _model_folder(folder: Path, vocab_size: int) -> Path:
  from artifex_dpo.models import get_preset
  from artifex_dpo.models.hf_config import config_to_hf

  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(config_to_hf(get_preset("llama-tiny", vocab_size=vocab_size))))
  return folder


def test_pretokenized_ids_are_checked_against_the_model_and_an_index_pointing_outside_is_refused(tmp_path):
  model = _model_folder(tmp_path / "model", 512)  # no tokenizer files: configs/tiny.py's byte tokenizer
  (tmp_path / "outside.safetensors").write_bytes(b"\0" * 16)
  (model / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}}))
  path = tmp_path / "ids.jsonl"

  def write(top_id):
    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, top_id - i], "rejected_ids": [5, 6 + i]} for i in range(16)]
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))

  common = [*DATA_RUN, f"--config.data.train_files={path}", f"--config.model.hf_checkpoint={model}",
            "--config.train.steps=1"]
  write(300)  # inside the model's 512 ids, outside the byte tokenizer's 259: accepted
  proc = run_main(tmp_path / "w", *common, timeout=180)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert "model.safetensors.index.json" in line and "outside the model folder" in line, line
  write(600)
  proc = run_main(tmp_path / "w2", *common, timeout=180)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "token id 600 is outside [0, 512)" in error_line(proc)


@pytest.mark.parametrize("body,line_no,needle", [
    ("from artifex_dpo.config import default_config\n\ndef get_config():\n  c = default_config()\n"
     "  c.train.steps = int('ten')\n  return c\n", 5, "ValueError: invalid literal for int()"),
    ("x = 1\nimport artifex_dpo_no_such_module\n", 2, "ModuleNotFoundError: No module named"),
    ("def get_config(:\n  pass\n", 1, "SyntaxError"),
])
def test_a_config_file_that_raises_names_file_and_line(tmp_path, body, line_no, needle):
  config = tmp_path / "bad_config.py"
  config.write_text(body)
  proc = run_main(tmp_path / "w", config=str(config), timeout=60)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert f"{config}:{line_no}: " in line and needle in line, line
  assert "Traceback" not in proc.stderr


def test_a_lease_from_another_host_is_taken_over_when_stale_and_refused_when_renewed(tmp_path):
  """The cross-host path: the holder's process cannot be seen, only whether it renews the lease."""
  import threading

  from artifex_dpo.lease import LocalBackend

  w = tmp_path / "w"
  w.mkdir()
  backend = LocalBackend(str(w / "lease.json"))
  other = {"host": "another-host", "pid": 1, "start_time": "2026-01-01T00:00:00Z"}
  args = ["--config.train.lease_timeout_s=3", "--config.data.synthetic_pairs=64", LONG]
  # Not renewed: taken over after the timeout; then SIGTERM before the first step (exit 75 at once).
  assert backend.write_if(other, None) == 1
  proc = start_logged(w, *args, log_dir=tmp_path)
  t0 = time.time()
  wait_until(holds_lease(w, proc), [proc], "the stale lease taken over")
  waited = time.time() - t0
  proc.send_signal(signal.SIGTERM)
  code, err = finish(proc, timeout=60)
  assert code == 75, err[-3000:]
  assert "took over the workdir lease of host another-host pid 1" in err and "not renewed for 3 s" in err
  assert waited >= 3
  # Renewed by its holder while the newcomer watches: refused, naming the holder.
  assert backend.write_if(other, None) == 1
  stop = threading.Event()

  def renew():
    generation = 1
    while not stop.wait(0.5):
      generation = backend.write_if(other, generation) or generation

  renewer = threading.Thread(target=renew, daemon=True)
  renewer.start()
  try:
    proc = run_main(w, *args, timeout=120)
  finally:
    stop.set()
    renewer.join()
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = error_line(proc)
  assert "in use by a live run" in line and "host another-host pid 1 (started 2026-01-01T00:00:00Z)" in line
  assert json.loads((w / "lease.json").read_text())["host"] == "another-host"


def test_a_holder_whose_lease_was_taken_over_is_told_and_compare_and_swap_has_one_winner(tmp_path):
  """In-process: the renewal thread notices a takeover; of two writers with the same generation one wins."""
  from artifex_dpo.lease import Lease, LocalBackend

  path = str(tmp_path / "lease.json")
  lease = Lease(path, timeout_s=0.4)
  lease.acquire()
  lost = []
  lease.start_renewing(lost.append)
  time.sleep(0.3)
  backend = LocalBackend(path)
  _, generation = backend.read()
  assert generation > 1  # renewed
  assert backend.write_if({"host": "x", "pid": 9, "start_time": "t"}, generation) == generation + 1
  assert backend.write_if({"host": "y", "pid": 8, "start_time": "t"}, generation) is None  # lost the race
  deadline = time.time() + 5
  while not lost and time.time() < deadline:
    time.sleep(0.02)
  assert lost == ["host x pid 9 (started t)"]
  lease.release()  # not ours any more: left alone
  assert backend.read()[0]["host"] == "x"
