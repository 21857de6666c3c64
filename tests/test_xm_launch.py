"""launch/xm_launch.py: the job description (no xmanager needed) and, where xmanager is installed, the
real xm objects built from it (nothing is submitted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # launch/ is run from the repository root, not installed

from launch import xm_launch  # noqa: E402

IMAGE = "us-docker.pkg.dev/proj/repo/artifex-dpo:v1"
CPU_IMAGE = "us-docker.pkg.dev/proj/repo/artifex-dpo-cpu:v1"
NO_XMANAGER = ("xmanager is not installed (it lives in its own extra: pip install --no-deps xmanager==0.8.5.post1 "
               "&& pip install immutabledict docker attrs)")


def test_local_job_without_image_runs_the_cli_here():
  d = xm_launch.describe_job(executor="local", config="configs/tiny.py", workdir="/tmp/run",
                             overrides=["--config.train.steps=20", "train.log_every=5"])
  assert d.image is None
  assert d.command == (sys.executable, "-m", "artifex_dpo.main")
  assert d.args == ("--config=configs/tiny.py", "--workdir=/tmp/run", "--config.train.steps=20",
                    "--config.train.log_every=5")
  assert (d.accelerator, d.topology, d.hosts, d.chips_per_host) == (None, None, 1, 0)
  assert d.name == "dpo-tiny"


def test_local_single_host_tpu_runs_the_cli_on_the_tpu_vm():
  d = xm_launch.describe_job(executor="local", config="configs/llama3_8b_v5p32.py", workdir="gs://b/run",
                             tpu="v5p-8", name="dpo-8b")
  assert d.image is None and d.command == (sys.executable, "-m", "artifex_dpo.main")
  assert (d.accelerator, d.topology, d.hosts, d.chips_per_host) == ("tpu_v5p", "2x2x1", 1, 4)
  d = xm_launch.describe_job(executor="local", config="c.py", workdir="/tmp/r", tpu="v5e-8")
  assert (d.accelerator, d.topology, d.hosts, d.chips_per_host) == ("tpu_v5e", "2x4", 1, 8)


def test_local_image_runs_the_image_entrypoint():
  d = xm_launch.describe_job(executor="local", config="configs/tiny.py", workdir="/home/artifex/run", image=CPU_IMAGE)
  assert d.command == ("python", "-m", "artifex_dpo.main")  # the image's ENTRYPOINT
  assert d.args == ("--config=configs/tiny.py", "--workdir=/home/artifex/run")


def test_remote_cpu_job():
  d = xm_launch.describe_job(executor="vertex", config="configs/tiny.py", workdir="gs://b/run", image=CPU_IMAGE,
                             cpu=16, ram_gib=64)
  assert (d.executor, d.image, d.cpu, d.ram_gib, d.accelerator) == ("vertex", CPU_IMAGE, 16, 64, None)


@pytest.mark.parametrize("kw, message", [
    (dict(executor="vertex", tpu="v5p-8", image=IMAGE), "Vertex backend maps only TPU v2/v3"),
    (dict(executor="kubernetes", tpu="v5e-16", image=IMAGE), "launch/gke.py"),
    (dict(executor="local", tpu="v5p-32"), "4 hosts"),
    (dict(executor="local", tpu="v5p-8", image=IMAGE), "not privileged"),
    (dict(executor="kubernetes", workdir="/tmp/run", image=CPU_IMAGE), "gs://"),
    (dict(executor="vertex"), "needs --image"),
    (dict(executor="slurm"), "one of local"),
    (dict(executor="local", overrides=["train.stepz=3"]), "unknown config key"),
])
def test_jobs_an_executor_cannot_run_are_refused(kw, message):
  base = dict(config="configs/tiny.py", workdir="gs://b/run")
  with pytest.raises(xm_launch.LaunchError, match=message):
    xm_launch.describe_job(**{**base, **kw})


def test_dry_run_cli_prints_the_description():
  args = ["--executor=local", "--tpu=v5e-8", "--config=configs/tiny.py", "--workdir=gs://b/run",
          "--config.train.steps=7", "--dry_run"]
  proc = subprocess.run([sys.executable, "launch/xm_launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr
  expected = xm_launch.describe_job(executor="local", tpu="v5e-8", config="configs/tiny.py",
                                    workdir="gs://b/run", overrides=["train.steps=7"]).to_dict()
  assert json.loads(proc.stdout) == json.loads(json.dumps(expected))
  bad = subprocess.run([sys.executable, "launch/xm_launch.py", *args, "--bogus"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert bad.returncode == 2
  assert bad.stderr.strip() == ("xm_launch: error: unexpected argument '--bogus' (config overrides are "
                                "--config.section.key=value)")


def test_importable_and_dry_run_without_xmanager():
  code = ("import sys; sys.modules['xmanager'] = None\n"  # any 'import xmanager' now fails
          "from launch import xm_launch\n"
          "d = xm_launch.describe_job(executor='local', config='configs/tiny.py', workdir='/tmp/r')\n"
          "try:\n"
          "  xm_launch.xm_executor(d)\n"
          "except xm_launch.LaunchError as e:\n"
          "  print(e)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert "xmanager is not installed" in proc.stdout
  assert "pip install --no-deps xmanager==0.8.5.post1" in proc.stdout


# --------------------------------------------------------------------------------------------
# The real xm objects (skipped where xmanager is not installed)
# --------------------------------------------------------------------------------------------


def test_xm_requirements_executor_and_packageable_for_the_local_executor():
  xm = pytest.importorskip("xmanager.xm", reason=NO_XMANAGER)
  from xmanager.xm_local import executables, executors

  # A single-host TPU VM: the command runs directly (a local docker container could not open the TPU).
  d = xm_launch.describe_job(executor="local", config="configs/llama3_8b_v5p32.py", workdir="gs://b/run",
                             tpu="v5p-8", overrides=["train.steps=3"])
  req = xm_launch.xm_requirements(d)
  assert req.accelerator == xm.ResourceType.TPU_V5P
  assert req.topology == xm.Topology("2x2x1") and req.topology.chip_count == 4
  executor = xm_launch.xm_executor(d)
  assert isinstance(executor, executors.Local)
  assert executor.requirements.accelerator == xm.ResourceType.TPU_V5P
  packageable = xm_launch.xm_packageable(d, executor.Spec())
  assert isinstance(packageable.executable_spec, xm.Binary)
  assert packageable.executable_spec.path == sys.executable
  assert packageable.args.to_list() == ["-m", "artifex_dpo.main", "--config=configs/llama3_8b_v5p32.py",
                                        "--workdir=gs://b/run", "--config.train.steps=3"]
  # What experiment.package returns for it (xm_local packaging), in a Job as experiment.add takes it.
  binary = executables.LocalBinary(name="artifex-dpo", command=sys.executable, args=packageable.args)
  job = xm.Job(executable=binary, executor=executor, name=d.name)
  assert job.name == "dpo-llama3-8b-v5p32"

  # The CPU image with docker: the image's entrypoint gets the trainer's arguments.
  d = xm_launch.describe_job(executor="local", config="configs/tiny.py", workdir="/home/artifex/run",
                             image=CPU_IMAGE)
  packageable = xm_launch.xm_packageable(d, executors.Local.Spec())
  assert isinstance(packageable.executable_spec, xm.Container)
  assert packageable.executable_spec.image_path == CPU_IMAGE
  assert packageable.args.to_list() == ["--config=configs/tiny.py", "--workdir=/home/artifex/run"]
  assert xm_launch.xm_requirements(d).accelerator is None
  image = executables.LoadedContainerImage(name="artifex-dpo", image_id="sha256:0", args=packageable.args)
  assert xm.Job(executable=image, executor=xm_launch.xm_executor(d)).executable.image_id == "sha256:0"


@pytest.mark.parametrize("executor", ["vertex", "kubernetes"])
def test_xm_remote_cpu_executors(executor):
  xm = pytest.importorskip("xmanager.xm", reason=NO_XMANAGER)
  d = xm_launch.describe_job(executor=executor, config="configs/tiny.py", workdir="gs://b/run", image=CPU_IMAGE,
                             cpu=16, ram_gib=64)
  req = xm_launch.xm_requirements(d)
  assert req.task_requirements[xm.ResourceType.CPU] == 16
  assert req.task_requirements[xm.ResourceType.RAM] == 64 * xm.GiB
  try:
    built = xm_launch.xm_executor(d)
  except ImportError as e:  # xmanager builds these only with their cloud backends installed
    pytest.skip(f"xmanager's {executor} backend is not installed ({e}); the minimal xm install covers the local "
                f"executor only")
  assert built.requirements.task_requirements[xm.ResourceType.CPU] == 16
