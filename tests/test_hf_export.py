"""Multi-host export: the plan, and two real processes (jax.distributed + gloo on 127.0.0.1) that each
write only their own files, fetching only the tensors they write, into an export equal to one process'."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from artifex_dpo.models import hf_export
from artifex_dpo.models.hf_layout import INDEX_FILE, LAYOUTS, SINGLE_FILE

from processes import free_port

REPO = Path(__file__).resolve().parents[1]


def _tensor(name, nbytes, holders):
  return hf_export.ExportTensor(name, (nbytes // 4,), nbytes, frozenset(holders), (name,), None, LAYOUTS["identity"])


def test_plan_prefers_holders_and_balances_the_rest():
  tensors = [_tensor("a", 400, {0}), _tensor("b", 400, {0, 1}), _tensor("c", 400, {1}), _tensor("d", 800, ()),
             _tensor("e", 400, {0}), _tensor("f", 100, {0, 1})]
  files = hf_export.plan_export(tensors, 2, max_shard_bytes=900)
  writer = {tensors[i].name: f.writer for f in files for i in f.tensors}
  # Held tensors go to a holder; b to the less loaded holder (1), d (held by nobody) to the less loaded.
  assert writer == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0, "f": 1}
  assert [f.name for f in files] == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
  assert [(f.writer, [tensors[i].name for i in f.tensors]) for f in files] == [
      (0, ["a"]), (0, ["d"]), (0, ["e"]), (1, ["b", "c", "f"])]
  assert [f.name for f in hf_export._round_robin(files, 2)] == [files[0].name, files[3].name, files[1].name,
                                                                files[2].name]
  # One process: the same files as the plain greedy grouping; a single file keeps the single name.
  one = hf_export.plan_export(tensors, 1, max_shard_bytes=900)
  assert [list(f.tensors) for f in one] == hf_export.plan_shards([t.nbytes for t in tensors], 900)
  assert [f.name for f in hf_export.plan_export(tensors, 1, 10**9)] == [SINGLE_FILE]


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, path, out, max_bytes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from artifex_dpo import sharding
    from artifex_dpo.models import LlamaModel, config_from_hf, hf_export, hf_read

    config = config_from_hf(path)
    abstract = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0)))
    # fsdp across the two processes, tensor across each one's two devices: the matrices are split
    # between the hosts (nobody holds them whole), norms and q/k/v biases are whole on both.
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))).reshape(2, 2)
    mesh = Mesh(devices, ("fsdp", "tensor"))
    rules = {k: v for k, v in sharding.LOGICAL_RULES.items() if k != "batch"}
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, PartitionSpec(*(rules[a] for a in v.get_metadata()["logical_axes"]))),
        nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
    model = nnx.merge(nnx.split(abstract)[0], hf_read.load_hf_params(path, abstract, shardings))
    copies, written = [], []
    host_copy, write = hf_export._host_copy, hf_export.write_safetensors
    hf_export._host_copy = lambda t, how, produce: copies.append([t.name, how, t.nbytes]) or host_copy(t, how, produce)
    hf_export.write_safetensors = lambda p, e, a: written.append(os.path.basename(p)) or write(p, e, a)
    hf_export.export_hf(model, out, max_shard_bytes=max_bytes, info={"step": 7})
    tensors, _ = hf_export.export_tensors(model, 4, 2)
    files = hf_export.plan_export(tensors, 2, max_bytes)
    print("RESULT", json.dumps({
        "copies": copies, "written": written,
        "planned": {f.name: [tensors[i].name for i in f.tensors] for f in files if f.writer == pid},
        "holders": {t.name: sorted(t.holders) for t in tensors}, "total": sum(t.nbytes for t in tensors)}))
    """
)


def _tensors(folder: Path) -> dict[str, np.ndarray]:
  index = folder / INDEX_FILE
  names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {SINGLE_FILE}
  out = {}
  for name in names:
    with safe_open(str(folder / name), framework="numpy") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def test_two_processes_write_their_own_files(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from artifex_dpo.models import export_hf, load_hf_checkpoint

  torch.manual_seed(0)
  hf_config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  torch_model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  with torch.no_grad():
    for p in torch_model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  src = tmp_path / "src"
  torch_model.save_pretrained(src)
  max_bytes = 20_000
  one = tmp_path / "one"
  export_hf(load_hf_checkpoint(src), one, max_shard_bytes=max_bytes, info={"step": 7})

  two = tmp_path / "two"
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i), str(src), str(two), str(max_bytes)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
    results.append(json.loads(out.split("RESULT", 1)[1]))

  # The same tensors, bit for bit, as the single-process export; a complete, atomic folder.
  got, want = _tensors(two), _tensors(one)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  info = json.loads((two / "artifex_dpo_export.json").read_text())
  assert info["step"] == 7 and info["files"] == sorted(set(json.loads((two / INDEX_FILE).read_text())["weight_map"].values()))
  assert not list(tmp_path.glob(".two.*"))

  holders = results[0]["holders"]
  assert holders == results[1]["holders"]  # the same plan on both processes
  assert holders["model.embed_tokens.weight"] == [] and holders["model.layers.0.self_attn.q_proj.bias"] == [0, 1]
  for r in results:
    # Each process wrote exactly its planned files, and copied to its host exactly their tensors.
    assert sorted(r["written"]) == sorted(r["planned"]) and r["planned"]
    mine = sorted(n for names in r["planned"].values() for n in names)
    assert sorted(n for n, _, _ in r["copies"]) == mine
    for name, how, _ in r["copies"]:
      assert how == ("local" if holders[name] else "fetched"), name
    assert sum(b for _, _, b in r["copies"]) < 0.75 * r["total"]  # nobody gathered the model
  hows = {how for r in results for _, how, _ in r["copies"]}
  assert hows == {"local", "fetched"}

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(two).eval()
  tokens = torch.tensor(np.random.RandomState(0).randint(0, 96, (2, 10)))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(tokens).logits.numpy(), torch_model(tokens).logits.numpy(), atol=1e-4)


def test_export_streams_one_tensor_at_a_time(tmp_path):
  """Peak host allocations while writing one 1.3 MB file: a few copies of the largest tensor, not the file."""
  import tracemalloc

  from flax import nnx

  from artifex_dpo.models import LlamaModel, export_hf, get_preset

  model = LlamaModel(get_preset("llama-tiny", vocab_size=256, num_layers=8), rngs=nnx.Rngs(0))
  tensors, _ = hf_export.export_tensors(model, 4, 1)
  largest, total = max(t.nbytes for t in tensors), sum(t.nbytes for t in tensors)
  export_hf(model, tmp_path / "warm")  # compiles and caches outside the measurement
  tracemalloc.start()
  try:
    export_hf(model, tmp_path / "out")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert (tmp_path / "out" / SINGLE_FILE).stat().st_size > total
  assert peak < 4 * largest < total / 4, (peak, largest, total)
