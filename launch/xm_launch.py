"""Launches a DPO job with XManager (its local, Vertex AI or Kubernetes executors).

    python launch/xm_launch.py --executor=local --image=artifex-dpo-cpu:latest \\
        --config=configs/tiny.py --workdir=/home/artifex/run          # docker, on this machine
    python launch/xm_launch.py --executor=local --config=configs/tiny.py --workdir=/tmp/run   # no image
    python launch/xm_launch.py --executor=local --tpu=v5p-8 --config=... --workdir=gs://...   # on a TPU VM
    python launch/xm_launch.py --executor=vertex --image=... --config=... --workdir=gs://... --dry_run

``--dry_run`` prints the job as JSON (:func:`describe_job`) and submits nothing; it needs no
xmanager. xmanager is kept apart from the project's other dependencies (its full tree did not
resolve in 500 s). Building the xm objects (requirements, executor, packageable; what the tests
check) needs only::

    pip install --no-deps xmanager==0.8.5.post1 && pip install immutabledict docker attrs

Submitting needs more, because ``xm_local.create_experiment`` imports xmanager's experiment
database and cloud packaging even for the local executor (sqlalchemy, alembic, async_generator,
google-auth, google-api-python-client, google-cloud-storage, cloud-sql-python-connector, grpcio,
...): install xmanager with its dependencies (``pip install xmanager==0.8.5.post1``, slow to
resolve) in a separate virtual environment. Vertex AI also needs ``google-cloud-aiplatform``.

What each executor can run (xmanager 0.8.5): the local executor runs one process: the container
with docker (CPU: xmanager cannot start it privileged, as TPU access needs), or
``python -m artifex_dpo.main`` directly, e.g. on a single-host TPU VM.
xmanager's Vertex backend maps only TPU v2 / v3, and its Kubernetes backend starts a one-pod Job
that requests no ``google.com/tpu`` chips and sets no TPU topology, so neither can place a v4 /
v5e / v5p / v6e slice: for TPU slices on GKE use ``launch/gke.py`` (a JobSet). Here they run CPU
jobs (try-outs with the CPU image); a TPU request on them is refused with that reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

try:
  from launch import gke
except ImportError:  # run as a script: python launch/xm_launch.py
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from launch import gke

EXECUTORS = ("local", "vertex", "kubernetes")
ENTRYPOINT = ("python", "-m", "artifex_dpo.main")  # the image's ENTRYPOINT (docker/Dockerfile)
_XM_INSTALL = ("pip install xmanager==0.8.5.post1 in a separate virtual environment to submit; only to build the "
               "job objects: pip install --no-deps xmanager==0.8.5.post1 && pip install immutabledict docker attrs")


# A job the chosen executor cannot run, or a bad argument (one line; the CLI exits with code 2).
LaunchError = gke.LaunchError


@dataclasses.dataclass(frozen=True)
class JobDescription:
  """The job the launcher would submit, independent of xmanager.

  Attributes:
    name: job / experiment name.
    executor: ``local``, ``vertex`` or ``kubernetes``.
    image: container image (its entrypoint is :data:`ENTRYPOINT`); None: run ``command``
      directly on this machine (local executor only).
    command: what runs: the image's entrypoint, or the Python command line without an image.
    args: the trainer's arguments (``--config``, ``--workdir``, ``--config.a.b=v`` ...).
    env: environment variables.
    accelerator: xm resource name (``tpu_v5p``) or None for CPU.
    topology: TPU topology of the slice (``2x2x4``) or None.
    hosts: processes the job needs (TPU hosts of the slice).
    chips_per_host: TPU chips per host (0 for CPU).
    cpu: vCPUs requested for a CPU job on Vertex / Kubernetes.
    ram_gib: memory requested for a CPU job on Vertex / Kubernetes.
  """

  name: str
  executor: str
  image: str | None
  command: tuple[str, ...]
  args: tuple[str, ...]
  env: dict[str, str]
  accelerator: str | None = None
  topology: str | None = None
  hosts: int = 1
  chips_per_host: int = 0
  cpu: int = 8
  ram_gib: int = 32

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def describe_job(*, executor: str, config: str, workdir: str, image: str | None = None, tpu: str | None = None,
                 topology: str | None = None, overrides: Sequence[str] = (), name: str | None = None,
                 env: dict[str, str] | None = None, cpu: int = 8, ram_gib: int = 32) -> JobDescription:
  """Builds the plain description of the job (no xmanager needed).

  Args:
    executor: ``local``, ``vertex`` or ``kubernetes``.
    config: config file (inside the image when ``image`` is given).
    workdir: run folder (``gs://`` for Vertex / Kubernetes).
    image: container image; None runs ``python -m artifex_dpo.main`` on this machine (local only).
    tpu: TPU slice (``v5p-8``, ``v5e-8``, ...) or None for CPU.
    topology: the slice's topology (default: Google Cloud's default for the size).
    overrides: config overrides ``section.key=value`` (``--config.`` prefix optional).
    name: job name (default: from the config file name).
    env: extra environment variables.
    cpu: vCPUs for a CPU job on Vertex / Kubernetes.
    ram_gib: memory (GiB) for a CPU job on Vertex / Kubernetes.

  Returns:
    The description.

  Raises:
    LaunchError: a job this executor cannot run (multi-host TPU slices, TPUs on Vertex /
      Kubernetes, a local workdir on a remote executor, ...).
  """
  if executor not in EXECUTORS:
    raise LaunchError(f"--executor {executor!r}: one of {', '.join(EXECUTORS)}")
  if not config or not workdir:
    raise LaunchError("--config and --workdir are required")
  sl = gke.parse_slice(tpu, topology) if tpu else None
  if sl is not None and executor != "local":
    raise LaunchError(f"--executor={executor} cannot place a {sl.name} slice: xmanager's "
                      f"{'Vertex backend maps only TPU v2/v3' if executor == 'vertex' else 'Kubernetes backend requests no google.com/tpu chips or topology'}; "
                      f"use launch/gke.py (a JobSet) for TPU slices on GKE")
  if sl is not None and sl.hosts > 1:
    raise LaunchError(f"{sl.name} has {sl.hosts} hosts: the local executor runs one process; use launch/gke.py")
  if sl is not None and image:
    raise LaunchError("xmanager's local docker runs are not privileged, so the container cannot open the TPU: "
                      "leave out --image to run the command directly on the TPU VM")
  if executor != "local" and not image:
    raise LaunchError(f"--executor={executor} needs --image")
  if executor != "local" and not workdir.startswith("gs://"):
    raise LaunchError(f"--workdir {workdir!r}: a remote job needs a gs:// path")
  args = (f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{gke.normalize_override(o)}" for o in overrides))
  return JobDescription(
      name=name or gke.default_name(config),
      executor=executor,
      image=image or None,
      command=ENTRYPOINT if image else (sys.executable, "-m", "artifex_dpo.main"),
      args=args,
      env=dict(env or {}),
      accelerator=sl.generation.xm_resource if sl else None,
      topology=sl.topology if sl else None,
      hosts=sl.hosts if sl else 1,
      chips_per_host=sl.chips_per_host if sl else 0,
      cpu=cpu,
      ram_gib=ram_gib,
  )


def _xm():
  try:
    from xmanager import xm
    from xmanager import xm_local
    from xmanager.xm_local import executors
  except ImportError as e:
    raise LaunchError(f"xmanager is not installed ({e}): {_XM_INSTALL}") from None
  return xm, xm_local, executors


def xm_requirements(desc: JobDescription):
  """``xm.JobRequirements`` of the job: the TPU slice (``tpu_v5p='2x2x1'``) or CPU and RAM."""
  xm, _, _ = _xm()
  if desc.accelerator:
    return xm.JobRequirements(**{desc.accelerator: desc.topology})
  if desc.executor == "local":
    return xm.JobRequirements()
  return xm.JobRequirements(cpu=desc.cpu, ram=desc.ram_gib * xm.GiB)


def xm_executor(desc: JobDescription):
  """The xmanager executor object (building Vertex / Kubernetes ones needs their backends)."""
  _, _, executors = _xm()
  requirements = xm_requirements(desc)
  if desc.executor == "local":
    return executors.Local(requirements=requirements, experimental_stream_output=True)
  if desc.executor == "vertex":
    return executors.Vertex(requirements=requirements)
  return executors.Kubernetes(requirements=requirements)


def xm_packageable(desc: JobDescription, executor_spec):
  """What ``experiment.package`` turns into the executable: the image, or the local command."""
  xm, _, _ = _xm()
  if desc.image:
    return xm.container(executor_spec=executor_spec, image_path=desc.image, args=list(desc.args),
                        env_vars=desc.env)
  return xm.binary(executor_spec=executor_spec, path=desc.command[0], args=[*desc.command[1:], *desc.args],
                   env_vars=desc.env)


def launch(desc: JobDescription) -> int:
  """Submits the job in a new local-mode XManager experiment; returns its experiment id."""
  xm, xm_local, _ = _xm()
  executor = xm_executor(desc)
  with xm_local.create_experiment(experiment_title=desc.name) as experiment:
    [executable] = experiment.package([xm_packageable(desc, executor.Spec())])
    experiment.add(xm.Job(executable=executable, executor=executor, name=desc.name))
    return experiment.experiment_id


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python launch/xm_launch.py", allow_abbrev=False,
                              description="Launch a DPO job with XManager. Config overrides: --config.a.b=value.")
  p.add_argument("--executor", choices=EXECUTORS, default="local")
  p.add_argument("--image", help="container image (docker/Dockerfile or docker/Dockerfile.cpu)")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--tpu", help="single-host TPU slice for the local executor without --image (this TPU VM), "
                                "e.g. v5p-8, v5e-8")
  p.add_argument("--topology")
  p.add_argument("--name")
  p.add_argument("--cpu", type=int, default=8)
  p.add_argument("--ram_gib", type=int, default=32)
  p.add_argument("--dry_run", action="store_true", help="print the job as JSON; submit nothing")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, rest = _parser().parse_known_args(list(argv))
    bad = [a for a in rest if not a.startswith("--config.") or "=" not in a]
    if bad:
      raise LaunchError(f"unexpected argument {bad[0]!r} (config overrides are --config.section.key=value)")
    desc = describe_job(executor=args.executor, config=args.config, workdir=args.workdir, image=args.image,
                        tpu=args.tpu, topology=args.topology, overrides=rest, name=args.name, cpu=args.cpu,
                        ram_gib=args.ram_gib)
    if args.dry_run:
      print(json.dumps(desc.to_dict(), indent=2))
      return 0
    print(f"launched experiment {launch(desc)}", file=sys.stderr)
  except LaunchError as e:
    print(f"xm_launch: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
