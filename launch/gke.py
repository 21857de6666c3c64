"""Renders the Kubernetes JobSet that runs a DPO job on one or more GKE TPU slices.

    python -m launch.gke --tpu=v5p-32 --image=REGION-docker.pkg.dev/PROJECT/REPO/artifex-dpo:TAG \\
        --config=configs/llama3_8b_v5p32.py --workdir=gs://BUCKET/runs/llama3-8b-dpo \\
        --config.model.hf_checkpoint=/gcs/BUCKET/models/Llama-3.1-8B-Instruct > jobset.yaml
    kubectl apply -f jobset.yaml            # or add --apply

Without ``--apply`` nothing is submitted: the manifest goes to stdout (or ``--output``) and a
one-line summary (slice, hosts, chips) to stderr, so the command doubles as a dry run.

What the manifest does (JobSet ``jobset.x-k8s.io/v1alpha2``, as xpk / MaxText lay it out):

* one replicated Job per slice (``replicas = --num_slices``), each an Indexed Job with one pod per
  TPU host (``parallelism = completions = hosts``), each pod requesting its host's chips
  (``google.com/tpu``) on nodes labelled with the slice's accelerator and topology; the
  ``alpha.jobset.sigs.k8s.io/exclusive-topology`` annotation puts each slice on its own node pool;
* multi-slice: ``MEGASCALE_COORDINATOR_ADDRESS`` (first pod of the first slice, by its JobSet DNS
  name), ``MEGASCALE_NUM_SLICES`` and ``MEGASCALE_SLICE_ID`` (the ``jobset.sigs.k8s.io/job-index``
  annotation, through the downward API) for JAX's multi-slice runtime. Within a slice, GKE's TPU
  webhook sets ``TPU_WORKER_ID`` / ``TPU_WORKER_HOSTNAMES`` from the JobSet's DNS hostnames;
* restarts: a pod that fails makes its Job fail (``backoffLimit: 0``; a lone restarted process
  could not rejoin the others' collectives) and the JobSet recreates every Job, up to
  ``failurePolicy.maxRestarts`` times. The trainer resumes from its last checkpoint. A preemption
  (the trainer checkpoints on SIGTERM within ``terminationGracePeriodSeconds`` and exits 75, or the
  pod gets a ``DisruptionTarget`` condition) restarts without counting against ``maxRestarts``; bad
  config or data (exit 2) and divergence (exit 3) fail the JobSet instead of looping.

Slice names follow Google Cloud: v4 / v5p names count TensorCores (2 per chip: v5p-32 = 16 chips,
topology 2x2x4), v5e / v6e names count chips (v5e-16 = 16 chips, 4x4). Hosts: v4 / v5p have 4
chips per host; v5e / v6e slices up to 8 chips (1x1, 2x2, 2x4) are one host, larger ones have
4 chips per host (v5e-16: 4 hosts of 4 chips).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from artifex_dpo import tpu_chips

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
CONTAINER_NAME = "trainer"
REPLICATED_JOB_NAME = "slice"
EXCLUSIVE_TOPOLOGY_KEY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
NODE_POOL_LABEL = "cloud.google.com/gke-nodepool"
ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
SPOT_LABEL = "cloud.google.com/gke-spot"
TPU_RESOURCE = "google.com/tpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
# The trainer's exit codes (docs/design.md): 2 bad config / data, 3 diverged, 75 preempted after a checkpoint.
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED = 2, 3, 75
DEFAULT_GRACE_PERIOD_S = 300
DEFAULT_MAX_RESTARTS = 10


class LaunchError(ValueError):
  """A bad launch request (the CLI prints it on one line and exits with code 2)."""


# Each generation's slice facts (cores per chip, dimensions, hosts, GKE node label) live in the one
# chip table, which imports no JAX.
TpuGeneration = tpu_chips.TpuChip
GENERATIONS: dict[str, TpuGeneration] = tpu_chips.CHIPS
# The 2D slice shapes GKE offers for v5e / v6e, by chip count.
TOPOLOGIES_2D: dict[int, str] = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                                 256: "16x16"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: generation and topology, and what follows from them."""

  generation: TpuGeneration
  topology: str

  @property
  def chips(self) -> int:
    return math.prod(int(d) for d in self.topology.split("x"))

  @property
  def hosts(self) -> int:
    """TPU hosts (VMs), i.e. pods of the slice's Job."""
    if self.chips <= self.generation.single_host_chips:
      return 1
    return self.chips // self.generation.chips_per_host

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def name(self) -> str:
    """Google Cloud's name of the slice, e.g. ``v5p-32`` for 16 v5p chips."""
    return f"{self.generation.name}-{self.chips * self.generation.cores_per_chip}"

  @property
  def aot_topology(self) -> str:
    """The slice as ``python -m artifex_dpo.aot --topology=`` names it, e.g. ``v5p:2x2x4``."""
    return f"{self.generation.name}:{self.topology}"


def _default_3d_topology(chips: int) -> str:
  # Google Cloud's default shapes: 2x2x1 (4 chips), then double the smallest dimension, the last
  # one among equals: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...
  dims = [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return "x".join(map(str, dims))


def _check_topology(gen: TpuGeneration, topology: str) -> str:
  if not re.fullmatch(r"\d+(x\d+)+", topology) or len(topology.split("x")) != gen.dims:
    raise LaunchError(f"--topology {topology!r}: {gen.name} topologies have {gen.dims} dimensions, "
                      f"e.g. {'2x2x4' if gen.dims == 3 else '4x4'}")
  dims = [int(d) for d in topology.split("x")]
  if gen.dims == 2 and topology not in TOPOLOGIES_2D.values():
    raise LaunchError(f"--topology {topology!r}: GKE offers {gen.name} slices "
                      f"{', '.join(TOPOLOGIES_2D.values())}")
  if gen.dims == 3 and (min(dims) < 1 or math.prod(dims) % gen.chips_per_host):
    raise LaunchError(f"--topology {topology!r}: a {gen.name} slice is made of whole hosts of "
                      f"{gen.chips_per_host} chips (e.g. 2x2x1, 2x2x4, 4x4x4)")
  return topology


def parse_slice(tpu: str, topology: str | None = None) -> TpuSlice:
  """Parses a slice name (``v5p-32``, ``v5e-16``, ``v5p:2x2x4``, or ``v5p`` with ``topology``).

  Args:
    tpu: Google Cloud slice name (v4 / v5p count TensorCores, v5e / v6e count chips), or a
      generation alone, or ``generation:topology`` as the AOT tool takes it.
    topology: the slice's topology; by default Google Cloud's default shape for the size.

  Returns:
    The slice.

  Raises:
    LaunchError: unknown generation, a size that is not a slice, or a topology that does not
      match the size.
  """
  text = tpu.strip().lower()
  if ":" in text:
    text, _, from_name = text.partition(":")
    if topology and topology != from_name:
      raise LaunchError(f"--tpu {tpu!r} names topology {from_name}, --topology says {topology}")
    topology = from_name
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+))?", text)
  gen_name = tpu_chips.canonical_name(m.group(1)) if m else text
  if not m or gen_name not in GENERATIONS:
    raise LaunchError(f"--tpu {tpu!r}: expected a slice such as v5p-32, v5e-16, v6e-64 or v4-16 "
                      f"(generations: {', '.join(GENERATIONS)})")
  gen = GENERATIONS[gen_name]
  chips = None
  if m.group(2):
    cores = int(m.group(2))
    if cores % gen.cores_per_chip:
      raise LaunchError(f"--tpu {tpu!r}: {gen.name} names count TensorCores ({gen.cores_per_chip} per chip)")
    chips = cores // gen.cores_per_chip
  if topology:
    sl = TpuSlice(gen, _check_topology(gen, topology))
    if chips is not None and sl.chips != chips:
      raise LaunchError(f"--tpu {tpu!r} is {chips} chips but --topology {topology} is {sl.chips}")
    return sl
  if chips is None:
    raise LaunchError(f"--tpu {tpu!r}: give a size (e.g. {gen.name}-{16 * gen.cores_per_chip}) or --topology")
  if gen.dims == 2:
    if chips not in TOPOLOGIES_2D:
      raise LaunchError(f"--tpu {tpu!r}: {gen.name} slices have {', '.join(map(str, TOPOLOGIES_2D))} chips")
    return TpuSlice(gen, TOPOLOGIES_2D[chips])
  if chips < 4 or chips & (chips - 1):
    raise LaunchError(f"--tpu {tpu!r}: {chips} chips has no default {gen.name} topology; give --topology")
  return TpuSlice(gen, _default_3d_topology(chips))


def normalize_override(text: str) -> str:
  """``--config.a.b=v``, ``config.a.b=v`` or ``a.b=v`` -> ``a.b=v`` (checked)."""
  body = text.strip()
  for prefix in ("--config.", "config."):
    if body.startswith(prefix):
      body = body[len(prefix):]
      break
  key, sep, _ = body.partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
    raise LaunchError(f"override {text!r}: expected --config.section.key=value")
  try:  # catch typos before paying for a slice (skipped where the package is not installed)
    from artifex_dpo.config import DOCS
  except ImportError:
    return body
  if key not in DOCS:
    raise LaunchError(f"override {text!r}: unknown config key {key}")
  return body


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """Everything the JobSet is rendered from.

  Attributes:
    name: JobSet name (a DNS label; pods are ``NAME-slice-J-P``).
    tpu: the slice each replicated Job runs on.
    image: the container image (docker/Dockerfile: entrypoint ``python -m artifex_dpo.main``).
    config: config file inside the image, e.g. ``configs/llama3_8b_v5p32.py``.
    workdir: the run folder, a ``gs://`` path every host can reach.
    overrides: ``section.key=value`` config overrides, passed as ``--config.section.key=value``.
    num_slices: slices joined over the data-centre network (multi-slice).
    max_restarts: JobSet restarts after failures other than preemptions.
    backoff_limit: pod retries within a Job before it fails (keep 0: see the module doc).
    grace_period_s: ``terminationGracePeriodSeconds``: time to save a checkpoint on SIGTERM.
    namespace: Kubernetes namespace (unset: kubectl's current one).
    service_account: Kubernetes service account (Workload Identity for the bucket).
    spot: schedule on Spot TPU node pools.
    queue: Kueue LocalQueue name.
    host_network: use the host network (unset: on for multi-slice, as DCN traffic wants).
    gcsfuse_buckets: buckets mounted read-only at ``/gcs/BUCKET`` by the GCS FUSE CSI driver (HF
      checkpoints, tokenizers), e.g. ``model.hf_checkpoint=/gcs/BUCKET/models/Llama-3.1-8B``.
    failure_rules: add the preemption / bad-input rules (needs a JobSet with failurePolicy.rules).
    image_pull_policy: the container's imagePullPolicy.
  """

  name: str
  tpu: TpuSlice
  image: str
  config: str
  workdir: str
  overrides: tuple[str, ...] = ()
  num_slices: int = 1
  max_restarts: int = DEFAULT_MAX_RESTARTS
  backoff_limit: int = 0
  grace_period_s: int = DEFAULT_GRACE_PERIOD_S
  namespace: str | None = None
  service_account: str | None = None
  spot: bool = False
  queue: str | None = None
  host_network: bool | None = None
  gcsfuse_buckets: tuple[str, ...] = ()
  failure_rules: bool = True
  image_pull_policy: str = "Always"

  def validate(self) -> None:
    """Raises LaunchError on a request that could not run."""
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
      raise LaunchError(f"--name {self.name!r}: must be lower-case letters, digits and '-' (a DNS label)")
    longest = f"{self.name}-{REPLICATED_JOB_NAME}-{self.num_slices - 1}-{self.tpu.hosts - 1}"
    if len(longest) > 63:
      raise LaunchError(f"--name {self.name!r}: too long; pod host names such as {longest!r} must fit in 63 "
                        f"characters")
    if not self.workdir.startswith("gs://") or len(self.workdir) <= len("gs://"):
      raise LaunchError(f"--workdir {self.workdir!r}: must be a gs:// path (every host writes checkpoints there, "
                        f"and it outlives the pods)")
    if not self.image:
      raise LaunchError("--image is required")
    if not self.config:
      raise LaunchError("--config is required")
    if self.num_slices < 1:
      raise LaunchError(f"--num_slices must be >= 1, got {self.num_slices}")
    if self.max_restarts < 0 or self.backoff_limit < 0:
      raise LaunchError("--max_restarts and --backoff_limit must be >= 0")
    if self.grace_period_s < 30:
      raise LaunchError(f"--grace_period {self.grace_period_s}: too short to save a checkpoint (>= 30 s)")
    for bucket in self.gcsfuse_buckets:
      if not re.fullmatch(r"[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]", bucket):
        raise LaunchError(f"--gcsfuse {bucket!r}: expected a bucket name (no gs://)")

  @property
  def multi_slice(self) -> bool:
    return self.num_slices > 1

  def trainer_args(self) -> list[str]:
    """The trainer's command-line arguments (after the image's entrypoint)."""
    return [f"--config={self.config}", f"--workdir={self.workdir}",
            *(f"--config.{normalize_override(o)}" for o in self.overrides)]


def _field_env(name: str, path: str) -> dict[str, Any]:
  return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def container_env(spec: JobSpec) -> list[dict[str, Any]]:
  """The trainer's environment; multi-slice adds the MEGASCALE_* variables JAX needs."""
  env = [
      _field_env("JOBSET_NAME", "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"),
      _field_env("REPLICATED_JOB_NAME", "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"),
      _field_env("JOB_INDEX", "metadata.annotations['jobset.sigs.k8s.io/job-index']"),
  ]
  if spec.multi_slice:
    env += [
        # The first pod of the first slice, by its JobSet DNS name (subdomain = the JobSet's name);
        # $(VAR) refers to the variables above.
        {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"},
        {"name": "MEGASCALE_NUM_SLICES", "value": str(spec.num_slices)},
        _field_env("MEGASCALE_SLICE_ID", "metadata.annotations['jobset.sigs.k8s.io/job-index']"),
    ]
  return env


def pod_failure_policy() -> dict[str, Any]:
  """Maps the trainer's exit codes to Job failures that the JobSet rules can tell apart."""
  return {"rules": [
      {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                            "values": [EXIT_PREEMPTED]}},
      {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
      {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                            "values": [EXIT_BAD_INPUT, EXIT_DIVERGED]}},
  ]}


def failure_policy(spec: JobSpec) -> dict[str, Any]:
  """JobSet restarts: preemptions always restart; bad input / divergence fail; anything else
  restarts up to ``max_restarts`` times (the default action when no rule matches)."""
  policy: dict[str, Any] = {"maxRestarts": spec.max_restarts}
  if spec.failure_rules:
    policy["rules"] = [
        {"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
         "onJobFailureReasons": ["PodFailurePolicy"],
         # Kubernetes' messages: "Container trainer for pod NS/NAME failed with exit code 75 matching
         # FailJob rule at index 0" and "Pod NS/NAME has condition DisruptionTarget matching ...".
         "onJobFailureMessagePatterns": [f"exit code {EXIT_PREEMPTED} matching", "condition DisruptionTarget"]},
        {"name": "badInputOrDiverged", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
    ]
  return policy


def pod_spec(spec: JobSpec) -> dict[str, Any]:
  """The pod of one TPU host."""
  tpu = spec.tpu
  node_selector = {ACCELERATOR_LABEL: tpu.generation.gke_accelerator, TOPOLOGY_LABEL: tpu.topology}
  if spec.spot:
    node_selector[SPOT_LABEL] = "true"
  chips = {TPU_RESOURCE: tpu.chips_per_host}
  mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
  volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  for i, bucket in enumerate(spec.gcsfuse_buckets):
    mounts.append({"name": f"gcs-{i}", "mountPath": f"/gcs/{bucket}", "readOnly": True})
    volumes.append({"name": f"gcs-{i}", "csi": {"driver": GCSFUSE_DRIVER, "readOnly": True,
                                                "volumeAttributes": {"bucketName": bucket,
                                                                     "mountOptions": "implicit-dirs"}}})
  container = {
      "name": CONTAINER_NAME,
      "image": spec.image,
      "imagePullPolicy": spec.image_pull_policy,
      "args": spec.trainer_args(),  # the image's ENTRYPOINT is python -m artifex_dpo.main
      "env": container_env(spec),
      "resources": {"requests": dict(chips), "limits": dict(chips)},
      "volumeMounts": mounts,
  }
  pod: dict[str, Any] = {
      "restartPolicy": "Never",
      "terminationGracePeriodSeconds": spec.grace_period_s,
      "nodeSelector": node_selector,
  }
  host_network = spec.multi_slice if spec.host_network is None else spec.host_network
  if host_network:
    pod.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
  if spec.service_account:
    pod["serviceAccountName"] = spec.service_account
  pod.update(containers=[container], volumes=volumes)
  return pod


def render_jobset(spec: JobSpec) -> dict[str, Any]:
  """The JobSet manifest (a plain dict) for ``spec``.

  Raises:
    LaunchError: the request could not run (see :meth:`JobSpec.validate`).
  """
  spec.validate()
  hosts = spec.tpu.hosts
  metadata: dict[str, Any] = {
      "name": spec.name,
      "labels": {"app.kubernetes.io/name": "artifex-dpo"},
      # One slice per node pool: a slice's hosts are one node pool, and no two Jobs share one.
      "annotations": {EXCLUSIVE_TOPOLOGY_KEY: NODE_POOL_LABEL},
  }
  if spec.namespace:
    metadata["namespace"] = spec.namespace
  if spec.queue:
    metadata["labels"][QUEUE_LABEL] = spec.queue
  pod_template: dict[str, Any] = {}
  if spec.gcsfuse_buckets:  # asks GKE to inject the GCS FUSE sidecar
    pod_template["metadata"] = {"annotations": {"gke-gcsfuse/volumes": "true"}}
  pod_template["spec"] = pod_spec(spec)
  job_spec: dict[str, Any] = {
      "parallelism": hosts,
      "completions": hosts,
      "completionMode": "Indexed",
      "backoffLimit": spec.backoff_limit,
  }
  if spec.failure_rules:
    job_spec["podFailurePolicy"] = pod_failure_policy()
  job_spec["template"] = pod_template
  return {
      "apiVersion": JOBSET_API_VERSION,
      "kind": "JobSet",
      "metadata": metadata,
      "spec": {
          "failurePolicy": failure_policy(spec),
          "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
          "replicatedJobs": [{"name": REPLICATED_JOB_NAME, "replicas": spec.num_slices,
                              "template": {"spec": job_spec}}],
      },
  }


def summary(spec: JobSpec) -> str:
  tpu = spec.tpu
  slices = f"{spec.num_slices} x " if spec.multi_slice else ""
  return (f"{spec.name}: {slices}{tpu.name} (topology {tpu.topology}, {tpu.hosts} host(s) x {tpu.chips_per_host} "
          f"chips), {spec.num_slices * tpu.chips} chips in all; AOT check: python -m artifex_dpo.aot "
          f"--config={spec.config} --topology={tpu.aot_topology}"
          + (f" --num_slices={spec.num_slices}" if spec.multi_slice else ""))


def to_yaml(manifest: dict[str, Any], header: str = "") -> str:
  """YAML text of the manifest (JSON, which is YAML too, where PyYAML is missing)."""
  comment = "".join(f"# {line}\n" for line in header.splitlines())
  try:
    import yaml
  except ImportError:
    return comment + json.dumps(manifest, indent=2) + "\n"
  return comment + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, width=1000)


def apply(text: str, kubectl: str = "kubectl", runner=subprocess.run) -> int:
  """Submits the manifest with ``kubectl apply -f -``; returns kubectl's exit code."""
  return runner([kubectl, "apply", "-f", "-"], input=text, text=True, check=False).returncode


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m launch.gke", allow_abbrev=False,
      description="Render (and optionally apply) the GKE JobSet of a TPU DPO run. Config overrides: "
                  "--config.section.key=value (passed to the trainer).")
  p.add_argument("--tpu", required=True, help="slice: v5p-32 (16 chips), v5e-16, v6e-64, v4-16, or v5p:2x2x4")
  p.add_argument("--topology", help="topology of one slice (default: Google Cloud's default for the size)")
  p.add_argument("--num_slices", type=int, default=1, help="slices over DCN (multi-slice)")
  p.add_argument("--image", required=True, help="container image built from docker/Dockerfile")
  p.add_argument("--config", required=True, help="config file inside the image, e.g. configs/llama3_8b_v5p32.py")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/path: checkpoints, metrics, TensorBoard, export")
  p.add_argument("--name", help="JobSet name (default: from the config file name)")
  p.add_argument("--namespace")
  p.add_argument("--service_account", help="Kubernetes service account (Workload Identity to the bucket)")
  p.add_argument("--max_restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                 help="JobSet restarts after failures; preemptions do not count")
  p.add_argument("--backoff_limit", type=int, default=0, help="pod retries within a slice's Job (keep 0)")
  p.add_argument("--grace_period", type=int, default=DEFAULT_GRACE_PERIOD_S,
                 help="terminationGracePeriodSeconds: time to checkpoint on SIGTERM")
  p.add_argument("--spot", action="store_true", help="run on Spot TPU node pools")
  p.add_argument("--queue", help="Kueue LocalQueue")
  p.add_argument("--host_network", action=argparse.BooleanOptionalAction, default=None,
                 help="host networking (default: on for multi-slice)")
  p.add_argument("--gcsfuse", action="append", default=[], metavar="BUCKET",
                 help="mount gs://BUCKET read-only at /gcs/BUCKET (repeatable)")
  p.add_argument("--no_failure_rules", action="store_true",
                 help="only failurePolicy.maxRestarts (for JobSet versions without failurePolicy.rules)")
  p.add_argument("--output", "-o", help="write the manifest here instead of stdout")
  p.add_argument("--apply", action="store_true", help="submit with kubectl apply -f -")
  p.add_argument("--kubectl", default="kubectl")
  return p


def default_name(config: str) -> str:
  stem = re.sub(r"\.py$", "", config.rsplit("/", 1)[-1]).lower()
  return ("dpo-" + re.sub(r"[^a-z0-9]+", "-", stem).strip("-"))[:40].rstrip("-")


def spec_from_args(argv: Sequence[str]) -> tuple[JobSpec, argparse.Namespace]:
  """Parses the CLI; arguments ``--config.a.b=v`` become overrides."""
  args, rest = _parser().parse_known_args(list(argv))
  overrides = []
  for item in rest:
    if not item.startswith("--config.") or "=" not in item:
      raise LaunchError(f"unexpected argument {item!r} (config overrides are --config.section.key=value)")
    overrides.append(normalize_override(item))
  spec = JobSpec(
      name=args.name or default_name(args.config), tpu=parse_slice(args.tpu, args.topology), image=args.image,
      config=args.config, workdir=args.workdir, overrides=tuple(overrides), num_slices=args.num_slices,
      max_restarts=args.max_restarts, backoff_limit=args.backoff_limit, grace_period_s=args.grace_period,
      namespace=args.namespace, service_account=args.service_account, spot=args.spot, queue=args.queue,
      host_network=args.host_network, gcsfuse_buckets=tuple(args.gcsfuse),
      failure_rules=not args.no_failure_rules)
  spec.validate()
  return spec, args


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    spec, args = spec_from_args(argv)
    text = to_yaml(render_jobset(spec), header=f"Rendered by launch/gke.py\n{summary(spec)}")
  except LaunchError as e:
    print(f"launch.gke: error: {e}", file=sys.stderr)
    return 2
  print(summary(spec), file=sys.stderr)
  if args.output:
    with open(args.output, "w") as f:
      f.write(text)
  elif not args.apply:
    sys.stdout.write(text)
  if args.apply:
    return apply(text, kubectl=args.kubectl)
  return 0


if __name__ == "__main__":
  sys.exit(main())
