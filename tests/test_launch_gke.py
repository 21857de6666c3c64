"""launch/gke.py: slice arithmetic, the JobSet manifest field by field, schema checks, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the launch/ folder is run from the repository root, not installed

from launch import gke  # noqa: E402

IMAGE = "us-docker.pkg.dev/proj/repo/artifex-dpo:v1"
WORKDIR = "gs://my-bucket/runs/dpo-1"


def render(tpu: str, *, num_slices: int = 1, config: str = "configs/llama3_8b_v5p32.py", **kw) -> dict:
  """Renders through the YAML text, as kubectl would read it."""
  overrides = kw.pop("overrides", ("model.hf_checkpoint=/gcs/my-bucket/models/m",
                                   "data.train_files=gs://my-bucket/data/*.jsonl"))
  spec = gke.JobSpec(name=kw.pop("name", "dpo-test"), tpu=gke.parse_slice(tpu), image=IMAGE, config=config,
                     workdir=WORKDIR, overrides=overrides, num_slices=num_slices, **kw)
  return yaml.safe_load(gke.to_yaml(gke.render_jobset(spec)))


def job_of(manifest: dict) -> dict:
  [rjob] = manifest["spec"]["replicatedJobs"]
  return rjob["template"]["spec"]


def pod_of(manifest: dict) -> dict:
  return job_of(manifest)["template"]["spec"]


def container_of(manifest: dict) -> dict:
  [c] = pod_of(manifest)["containers"]
  return c


def env_of(manifest: dict) -> dict:
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_of(manifest)["env"]}


# --------------------------------------------------------------------------------------------
# Slices (Google Cloud's naming and GKE's hosts)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, topology, chips, hosts, per_host, accelerator", [
    ("v5p-8", "2x2x1", 4, 1, 4, "tpu-v5p-slice"),
    ("v5p-16", "2x2x2", 8, 2, 4, "tpu-v5p-slice"),
    ("v5p-32", "2x2x4", 16, 4, 4, "tpu-v5p-slice"),
    ("v5p-64", "2x4x4", 32, 8, 4, "tpu-v5p-slice"),
    ("v5p-128", "4x4x4", 64, 16, 4, "tpu-v5p-slice"),
    ("v5p-256", "4x4x8", 128, 32, 4, "tpu-v5p-slice"),
    ("v5p-1024", "8x8x8", 512, 128, 4, "tpu-v5p-slice"),
    ("v4-32", "2x2x4", 16, 4, 4, "tpu-v4-podslice"),
    ("v5e-1", "1x1", 1, 1, 1, "tpu-v5-lite-podslice"),
    ("v5e-4", "2x2", 4, 1, 4, "tpu-v5-lite-podslice"),
    ("v5e-8", "2x4", 8, 1, 8, "tpu-v5-lite-podslice"),
    ("v5e-16", "4x4", 16, 4, 4, "tpu-v5-lite-podslice"),
    ("v5litepod-16", "4x4", 16, 4, 4, "tpu-v5-lite-podslice"),
    ("v5e-64", "8x8", 64, 16, 4, "tpu-v5-lite-podslice"),
    ("v5e-256", "16x16", 256, 64, 4, "tpu-v5-lite-podslice"),
    ("v6e-16", "4x4", 16, 4, 4, "tpu-v6e-slice"),
    ("v5p:2x2x4", "2x2x4", 16, 4, 4, "tpu-v5p-slice"),
])
def test_slice_names_topologies_and_hosts(name, topology, chips, hosts, per_host, accelerator):
  sl = gke.parse_slice(name)
  assert (sl.topology, sl.chips, sl.hosts, sl.chips_per_host) == (topology, chips, hosts, per_host)
  assert sl.generation.gke_accelerator == accelerator
  assert sl.hosts * sl.chips_per_host == sl.chips


def test_slice_name_round_trip_and_aot_topology():
  assert gke.parse_slice("v5p-32").name == "v5p-32"
  assert gke.parse_slice("v5p", "4x4x8").name == "v5p-256"
  assert gke.parse_slice("v5litepod-16").name == "v5e-16"
  assert gke.parse_slice("v5p-32").aot_topology == "v5p:2x2x4"
  assert gke.parse_slice("v5e-64").aot_topology == "v5e:8x8"
  assert gke.parse_slice("v5p-64", "4x4x2").hosts == 8  # a non-default shape of the same size


@pytest.mark.parametrize("tpu, topology, message", [
    ("v5p-33", None, "TensorCores"),
    ("v5e-12", None, "slices have"),
    ("v5p-32", "4x4x4", "16 chips"),
    ("v7-8", None, "expected a slice"),
    ("v5e", "2x2x4", "2 dimensions"),
    ("v5e", "3x3", "GKE offers"),
    ("v5p", "1x1x2", "whole hosts"),
    ("v5p", None, "give a size"),
    ("v5p-24", None, "no default"),
])
def test_bad_slices_are_refused(tpu, topology, message):
  with pytest.raises(gke.LaunchError, match=message):
    gke.parse_slice(tpu, topology)


# --------------------------------------------------------------------------------------------
# The manifest, field by field
# --------------------------------------------------------------------------------------------


def check_common(m: dict, *, hosts: int, chips_per_host: int, accelerator: str, topology: str, slices: int):
  assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
  assert m["kind"] == "JobSet"
  assert m["metadata"]["name"] == "dpo-test"
  assert m["metadata"]["annotations"] == {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  [rjob] = m["spec"]["replicatedJobs"]
  assert rjob["name"] == "slice"
  assert rjob["replicas"] == slices
  job = job_of(m)
  assert job["completionMode"] == "Indexed"
  assert job["parallelism"] == job["completions"] == hosts
  assert job["backoffLimit"] == 0
  pod = pod_of(m)
  assert pod["restartPolicy"] == "Never"
  assert pod["terminationGracePeriodSeconds"] == 300
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                 "cloud.google.com/gke-tpu-topology": topology}
  c = container_of(m)
  assert c["image"] == IMAGE
  assert c["resources"] == {"requests": {"google.com/tpu": chips_per_host}, "limits": {"google.com/tpu": chips_per_host}}
  assert c["args"] == ["--config=configs/llama3_8b_v5p32.py", f"--workdir={WORKDIR}",
                       "--config.model.hf_checkpoint=/gcs/my-bucket/models/m",
                       "--config.data.train_files=gs://my-bucket/data/*.jsonl"]
  assert "command" not in c  # the image's ENTRYPOINT (python -m artifex_dpo.main) runs
  assert m["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
  assert m["spec"]["failurePolicy"]["maxRestarts"] == 10


def test_v5e_16_manifest():
  m = render("v5e-16")
  check_common(m, hosts=4, chips_per_host=4, accelerator="tpu-v5-lite-podslice", topology="4x4", slices=1)
  env = env_of(m)
  assert not any(k.startswith("MEGASCALE") for k in env)  # one slice: JAX's TPU cluster detection suffices
  assert env["JOBSET_NAME"] == {"fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/jobset-name']"}}
  assert "hostNetwork" not in pod_of(m)


def test_v5p_64_manifest():
  m = render("v5p-64")
  check_common(m, hosts=8, chips_per_host=4, accelerator="tpu-v5p-slice", topology="2x4x4", slices=1)
  assert not any(k.startswith("MEGASCALE") for k in env_of(m))


def test_two_v5p_128_slices_manifest():
  m = render("v5p-128", num_slices=2)
  check_common(m, hosts=16, chips_per_host=4, accelerator="tpu-v5p-slice", topology="4x4x4", slices=2)
  env = container_of(m)["env"]
  names = [e["name"] for e in env]
  # $(VAR) references only see variables defined earlier in the list.
  assert names.index("JOBSET_NAME") < names.index("MEGASCALE_COORDINATOR_ADDRESS")
  assert names.index("REPLICATED_JOB_NAME") < names.index("MEGASCALE_COORDINATOR_ADDRESS")
  by_name = env_of(m)
  assert by_name["MEGASCALE_COORDINATOR_ADDRESS"] == "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)"
  assert by_name["MEGASCALE_NUM_SLICES"] == "2"
  assert by_name["MEGASCALE_SLICE_ID"] == {
      "fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/job-index']"}}
  # Expanded for pod 0 of Job 0, the address is that pod's JobSet DNS name.
  expanded = by_name["MEGASCALE_COORDINATOR_ADDRESS"].replace("$(JOBSET_NAME)", "dpo-test").replace(
      "$(REPLICATED_JOB_NAME)", "slice")
  assert expanded == "dpo-test-slice-0-0.dpo-test"
  pod = pod_of(m)
  assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"


def test_options_reach_the_manifest():
  m = render("v5e-16", grace_period_s=900, max_restarts=3, spot=True, queue="tpu-queue", namespace="ml",
             service_account="dpo-sa", gcsfuse_buckets=("my-models",), host_network=True)
  pod = pod_of(m)
  assert pod["terminationGracePeriodSeconds"] == 900
  assert m["spec"]["failurePolicy"]["maxRestarts"] == 3
  assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
  assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-queue"
  assert m["metadata"]["namespace"] == "ml"
  assert pod["serviceAccountName"] == "dpo-sa"
  assert pod["hostNetwork"] is True
  assert job_of(m)["template"]["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
  mounts = {v["mountPath"]: v for v in container_of(m)["volumeMounts"]}
  assert mounts["/gcs/my-models"]["readOnly"] is True
  [csi] = [v["csi"] for v in pod["volumes"] if "csi" in v]
  assert csi["driver"] == "gcsfuse.csi.storage.gke.io"
  assert csi["volumeAttributes"]["bucketName"] == "my-models"


def test_failure_policy_tells_preemption_from_bad_input():
  m = render("v5p-32")
  pod_rules = job_of(m)["podFailurePolicy"]["rules"]
  assert pod_rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                               "values": [75]}}
  assert pod_rules[1] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
  assert pod_rules[2]["onExitCodes"]["values"] == [2, 3]
  assert container_of(m)["name"] == pod_rules[0]["onExitCodes"]["containerName"]
  preempted, bad = m["spec"]["failurePolicy"]["rules"]
  assert preempted["action"] == "RestartJobSetAndIgnoreMaxRestarts"
  assert bad["action"] == "FailJobSet"
  assert preempted["onJobFailureReasons"] == bad["onJobFailureReasons"] == ["PodFailurePolicy"]

  # Kubernetes' Job failure messages for the pod rules above (pkg/controller/job/pod_failure_policy.go).
  def first_rule(message: str) -> str:
    for rule in m["spec"]["failurePolicy"]["rules"]:
      patterns = rule.get("onJobFailureMessagePatterns")
      if not patterns or any(re.search(p, message) for p in patterns):
        return rule["action"]
    return "RestartJobSet"  # JobSet's default when no rule matches (counts against maxRestarts)

  msg = "Container trainer for pod default/dpo-test-slice-0-1-x7 failed with exit code {} matching FailJob rule at index {}"
  assert first_rule(msg.format(75, 0)) == "RestartJobSetAndIgnoreMaxRestarts"
  assert first_rule("Pod default/dpo-test-slice-0-1-x7 has condition DisruptionTarget matching FailJob rule at "
                    "index 1") == "RestartJobSetAndIgnoreMaxRestarts"
  assert first_rule(msg.format(2, 2)) == "FailJobSet"
  assert first_rule(msg.format(3, 2)) == "FailJobSet"
  assert first_rule(msg.format(175, 2)) == "FailJobSet"  # never produced (175 is not a listed exit code)


def test_no_failure_rules_keeps_only_max_restarts():
  m = render("v5p-32", failure_rules=False)
  assert m["spec"]["failurePolicy"] == {"maxRestarts": 10}
  assert "podFailurePolicy" not in job_of(m)


@pytest.mark.parametrize("kw, message", [
    (dict(workdir="/tmp/run"), "gs://"),
    (dict(name="DPO_run"), "DNS label"),
    (dict(name="x" * 60), "63"),
    (dict(grace_period_s=10), "too short"),
    (dict(num_slices=0), "num_slices"),
    (dict(gcsfuse_buckets=("gs://b",)), "bucket name"),
])
def test_bad_requests_are_refused(kw, message):
  base = dict(name="dpo-test", tpu=gke.parse_slice("v5p-32"), image=IMAGE, config="configs/x.py", workdir=WORKDIR)
  with pytest.raises(gke.LaunchError, match=message):
    gke.render_jobset(gke.JobSpec(**{**base, **kw}))


def test_overrides_are_normalised_and_checked_against_the_config_keys():
  assert gke.normalize_override("--config.train.steps=10") == "train.steps=10"
  assert gke.normalize_override("config.optim.learning_rate=1e-6") == "optim.learning_rate=1e-6"
  assert gke.normalize_override("data.train_files=gs://b/x=1.jsonl") == "data.train_files=gs://b/x=1.jsonl"
  with pytest.raises(gke.LaunchError, match="unknown config key train.stepz"):
    gke.normalize_override("train.stepz=10")
  with pytest.raises(gke.LaunchError, match="expected --config"):
    gke.normalize_override("--config.train.steps")


# --------------------------------------------------------------------------------------------
# Schemas: Kubernetes' own (batch/v1 Job, strict) and JobSet v1alpha2's fields
# --------------------------------------------------------------------------------------------

# JobSet v1alpha2 (sigs.k8s.io/jobset api/jobset/v1alpha2/jobset_types.go): the fields of each object.
JOBSET_FIELDS = {
    "": {"apiVersion", "kind", "metadata", "spec"},
    "spec": {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
             "coordinator", "managedBy", "ttlSecondsAfterFinished", "volumeClaimPolicies"},
    "network": {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"},
    "failurePolicy": {"maxRestarts", "restartStrategy", "rules"},
    "rule": {"name", "action", "onJobFailureReasons", "onJobFailureMessagePatterns", "targetReplicatedJobs"},
    "replicatedJob": {"name", "groupName", "template", "replicas", "dependsOn"},
}
ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
           "RestartJobAndIgnoreMaxRestarts"}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
RULE_NAME = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")


def check_jobset_structure(m: dict) -> None:
  def keys(obj: dict, kind: str):
    extra = set(obj) - JOBSET_FIELDS[kind]
    assert not extra, f"{kind or 'JobSet'}: unknown fields {extra}"

  keys(m, "")
  assert DNS_LABEL.fullmatch(m["metadata"]["name"]) and len(m["metadata"]["name"]) <= 63
  keys(m["spec"], "spec")
  keys(m["spec"]["network"], "network")
  assert all(isinstance(v, bool) for v in m["spec"]["network"].values())
  policy = m["spec"]["failurePolicy"]
  keys(policy, "failurePolicy")
  assert isinstance(policy["maxRestarts"], int) and policy["maxRestarts"] >= 0
  for rule in policy.get("rules", []):
    keys(rule, "rule")
    assert RULE_NAME.fullmatch(rule["name"]), rule["name"]
    assert rule["action"] in ACTIONS
    for field in ("onJobFailureReasons", "onJobFailureMessagePatterns"):
      values = rule.get(field, [])
      assert isinstance(values, list) and len(set(values)) == len(values)  # UniqueItems
  names = [r["name"] for r in m["spec"]["replicatedJobs"]]
  assert len(set(names)) == len(names)
  for rjob in m["spec"]["replicatedJobs"]:
    keys(rjob, "replicatedJob")
    assert DNS_LABEL.fullmatch(rjob["name"])
    assert isinstance(rjob["replicas"], int) and rjob["replicas"] >= 1
    assert set(rjob["template"]) <= {"metadata", "spec"}


@pytest.mark.parametrize("tpu, slices", [("v5e-16", 1), ("v5p-64", 1), ("v5p-128", 2)])
def test_manifest_matches_the_jobset_and_kubernetes_schemas(tpu, slices):
  """Strict checks of what the renderer writes: a misspelt field in launch/gke.py (e.g. ``resource`` for the
  container's ``resources``, ``maxRestart`` in the failure policy) fails here."""
  m = render(tpu, num_slices=slices, gcsfuse_buckets=("my-models",), service_account="dpo-sa", spot=True)
  check_jobset_structure(m)
  kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extra) checks the Job "
                                                         "template against Kubernetes' schema offline")
  for rjob in m["spec"]["replicatedJobs"]:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{m['metadata']['name']}-{rjob['name']}-0"},
           "spec": rjob["template"]["spec"]}
    kv.validate(job, "1.33", strict=True)  # strict: unknown fields are errors


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------

CLI_ARGS = ["--tpu=v5p-128", "--num_slices=2", f"--image={IMAGE}", "--config=configs/llama3_8b_v5p32.py",
            f"--workdir={WORKDIR}", "--name=dpo-test", "--config.model.hf_checkpoint=/gcs/my-bucket/models/m",
            "--config.data.train_files=gs://my-bucket/data/*.jsonl"]


@pytest.mark.parametrize("entry", [["-m", "launch.gke"], ["launch/gke.py"]])
def test_cli_dry_run_prints_the_manifest(entry):
  proc = subprocess.run([sys.executable, *entry, *CLI_ARGS], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert yaml.safe_load(proc.stdout) == render("v5p-128", num_slices=2)
  assert "2 x v5p-128 (topology 4x4x4, 16 host(s) x 4 chips), 128 chips" in proc.stderr
  assert "--topology=v5p:4x4x4 --num_slices=2" in proc.stderr


def test_cli_bad_input_exits_2_with_one_line():
  proc = subprocess.run([sys.executable, "-m", "launch.gke", *CLI_ARGS, "--config.train.stepz=1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert proc.stderr.strip().splitlines() == ["launch.gke: error: override '--config.train.stepz=1': unknown config "
                                              "key train.stepz"]


def test_cli_output_file_and_apply(tmp_path, monkeypatch, capsys):
  out = tmp_path / "jobset.yaml"
  assert gke.main([*CLI_ARGS, f"--output={out}"]) == 0
  assert yaml.safe_load(out.read_text()) == render("v5p-128", num_slices=2)
  assert capsys.readouterr().out == ""
  calls = []

  class Done:
    returncode = 0

  def runner(cmd, **kw):
    calls.append((cmd, kw))
    return Done()

  assert gke.apply("kind: JobSet\n", kubectl="/usr/bin/kubectl", runner=runner) == 0
  assert calls == [(["/usr/bin/kubectl", "apply", "-f", "-"], {"input": "kind: JobSet\n", "text": True,
                                                                "check": False})]


def test_default_name_is_a_dns_label():
  assert gke.default_name("configs/llama3_8b_v5p32.py") == "dpo-llama3-8b-v5p32"
  assert DNS_LABEL.fullmatch(gke.default_name("configs/My_Config.v2.py"))
