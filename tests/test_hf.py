"""HF import/export, checked against real transformers PyTorch models (float32, CPU)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artifex_dpo import sharding
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from artifex_dpo.models import LlamaModel, config_from_hf, export_hf, load_hf_checkpoint, load_hf_params  # noqa: E402
from artifex_dpo.models import hf_export, hf_layout, hf_read  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB, T = 98, 12
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_config(arch: str):
  if arch == "llama":  # GQA, llama3 rope scaling, untied, head_dim != hidden / heads
    return transformers.LlamaConfig(
        **COMMON, head_dim=16, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False
    )
  if arch == "qwen2":  # tied embeddings, q/k/v bias
    return transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
  if arch == "mistral":  # sliding window shorter than the test sequence
    return transformers.MistralConfig(**COMMON, sliding_window=4, tie_word_embeddings=False)
  raise ValueError(arch)


def _build(arch: str, seed: int):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch)).eval()
  with torch.no_grad():  # make norms and biases non-trivial
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  out = {}
  for seed, arch in enumerate(("llama", "qwen2", "mistral")):
    model = _build(arch, seed)
    path = tmp_path_factory.mktemp(arch)
    model.save_pretrained(path)
    out[arch] = (model, path)
  return out


def _batch():
  """Tokens and attention mask: row 0 full, row 1 right-padded, row 2 left-padded."""
  tokens = np.random.RandomState(0).randint(0, VOCAB, (3, T)).astype(np.int32)
  mask = np.ones((3, T), np.int32)
  mask[1, 9:] = 0
  mask[2, :4] = 0
  return tokens, mask


def _torch_logits(model, tokens, mask):
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )
  return out.logits.float().numpy()


def _ours_logits(model, tokens, mask):
  return np.asarray(model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))


def _max_diff(a, b, mask):
  return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_load_matches_transformers(hf_models, arch):
  torch_model, path = hf_models[arch]
  ours = load_hf_checkpoint(path)
  cfg = ours.config
  assert cfg.architecture == arch and cfg.num_kv_heads == 2
  assert cfg.tie_word_embeddings == (arch == "qwen2") and cfg.attention_bias == (arch == "qwen2")
  assert (ours.lm_head is None) == (arch == "qwen2")
  if arch == "llama":
    assert cfg.head_dim == 16 and cfg.rope_type == "llama3" and cfg.rope_theta == 500000.0
  if arch == "mistral":
    assert cfg.sliding_window == 4
  tokens, mask = _batch()
  ref = _torch_logits(torch_model, tokens, mask)
  got = _ours_logits(ours, tokens, mask)
  assert np.isfinite(got).all()
  assert _max_diff(got, ref, mask) <= 1e-4
  if arch == "mistral":  # the window must actually matter for this comparison to mean something
    no_window = cfg.replace(sliding_window=None)
    abstract = nnx.eval_shape(lambda: LlamaModel(no_window, rngs=nnx.Rngs(0)))
    full = nnx.merge(nnx.split(abstract)[0], load_hf_params(path, abstract))
    assert _max_diff(_ours_logits(full, tokens, mask), ref, mask) > 1e-3


def test_config_from_hf_fields(hf_models):
  raw = json.loads((hf_models["llama"][1] / "config.json").read_text())
  cfg = config_from_hf(raw)
  assert cfg.rope_scaling["factor"] == 8.0 and cfg.rope_scaling["original_max_position_embeddings"] == 16
  legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}  # transformers-4 style keys
  legacy.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), eos_token_id=[5, 6], torch_dtype="bfloat16")
  legacy.pop("dtype", None)
  cfg4 = config_from_hf(legacy)
  assert cfg4.rope_scaling == cfg.rope_scaling and cfg4.rope_theta == cfg.rope_theta
  assert cfg4.eos_token_id == 5 and cfg4.dtype == "bfloat16" and cfg4.param_dtype == "bfloat16"
  assert config_from_hf(legacy, dtype="float32", remat="full").remat == "full"
  qwen = json.loads((hf_models["qwen2"][1] / "config.json").read_text())
  assert config_from_hf(qwen).sliding_window is None  # use_sliding_window=False
  with pytest.raises(ValueError, match="rope_type"):
    config_from_hf({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})


def test_sharded_index_checkpoint(hf_models, tmp_path):
  torch_model, _ = hf_models["llama"]
  torch_model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  ours = load_hf_checkpoint(tmp_path)
  tokens, mask = _batch()
  assert _max_diff(_ours_logits(ours, tokens, mask), _torch_logits(torch_model, tokens, mask), mask) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_export_roundtrip_transformers(hf_models, arch, tmp_path):
  ours = load_hf_checkpoint(hf_models[arch][1])
  out = tmp_path / "export"
  small = 30_000 if arch == "llama" else 2 * 1024**3  # llama: several shards + index
  export_hf(ours, out, max_shard_bytes=small)
  config = json.loads((out / "config.json").read_text())
  assert config["model_type"] == arch and len(config["architectures"]) == 1
  assert (out / "generation_config.json").is_file()
  assert (out / "model.safetensors.index.json").is_file() == (arch == "llama")
  if arch == "llama":
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded).__name__ == config["architectures"][0]
  tokens, mask = _batch()
  assert _max_diff(_torch_logits(reloaded, tokens, mask), _ours_logits(ours, tokens, mask), mask) <= 1e-4


def test_bf16_export_roundtrip(hf_models, tmp_path):
  torch_model, path = hf_models["llama"]
  ours = load_hf_checkpoint(path)
  export_hf(ours, tmp_path, dtype="bfloat16")
  with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  back = load_hf_checkpoint(tmp_path)
  assert back.config.dtype == "bfloat16" and back.embed[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(back.layers.q_proj[...], np.float32),
      np.asarray(ours.layers.q_proj[...].astype(jnp.bfloat16), np.float32),
  )
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert next(reloaded.parameters()).dtype == torch.bfloat16
  tokens, mask = _batch()
  ref = _torch_logits(torch_model, tokens, mask)
  assert _max_diff(_torch_logits(reloaded.float(), tokens, mask), ref, mask) < 0.1


def test_unknown_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
    config_from_hf(tmp_path)
  assert str(tmp_path / "config.json") in str(e.value)
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    load_hf_checkpoint(tmp_path)


def _rewrite(src: Path, dst: Path, edit) -> None:
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  with safe_open(str(src / "model.safetensors"), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_bad_checkpoints(hf_models, tmp_path):
  src = hf_models["llama"][1]
  name = "model.layers.1.self_attn.k_proj.weight"
  _rewrite(src, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
    load_hf_checkpoint(tmp_path / "missing")
  _rewrite(src, tmp_path / "extra", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'.*model.safetensors"):
    load_hf_checkpoint(tmp_path / "extra")
  _rewrite(src, tmp_path / "shape", lambda t: t.update({name: t[name][:-1]}))
  with pytest.raises(ValueError, match=f"'{name}'.*model.safetensors.*shape"):
    load_hf_checkpoint(tmp_path / "shape")
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  (no_weights / "config.json").write_text((src / "config.json").read_text())
  with pytest.raises(ValueError, match="model.safetensors"):
    load_hf_checkpoint(no_weights)


def test_tokenizer_files_and_atomic_write(hf_models, tmp_path, monkeypatch):
  ours = load_hf_checkpoint(hf_models["qwen2"][1])
  tok = tmp_path / "tok"
  tok.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    (tok / name).write_text(f'{{"file": "{name}"}}')
  (tok / "unrelated.txt").write_text("x")
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.bin").write_text("old export")
  export_hf(ours, out, tokenizer_dir=tok)
  assert not (out / "stale.bin").exists() and not (out / "unrelated.txt").exists()
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    assert (out / name).read_text() == (tok / name).read_text()

  calls = []

  original = hf_export.write_safetensors

  def failing_save(path, entries, arrays):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    original(path, entries, arrays)

  monkeypatch.setattr(hf_export, "write_safetensors", failing_save)
  fresh = tmp_path / "fresh"
  with pytest.raises(OSError, match="disk full"):
    export_hf(ours, fresh, max_shard_bytes=20_000)
  assert len(calls) == 2
  assert not fresh.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tok"]  # no temp leftovers
  calls.clear()
  with pytest.raises(OSError, match="disk full"):
    export_hf(ours, out, max_shard_bytes=20_000)
  assert (out / "tokenizer.json").is_file()  # a failed re-export keeps the previous one


# Parameter axes only ("batch" maps to a tuple of axes and is not a parameter axis).
RULES = {k: v for k, v in sharding.LOGICAL_RULES.items() if k != "batch"}


def _shardings(abstract, mesh):
  def one(v):
    spec = jax.sharding.PartitionSpec(*(RULES[a] for a in v.get_metadata()["logical_axes"]))
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree.map(one, nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_load_with_shardings_one_device_mesh(hf_models, monkeypatch):
  path = hf_models["llama"][1]
  plain = load_hf_checkpoint(path)
  abstract = nnx.eval_shape(lambda: LlamaModel(plain.config, rngs=nnx.Rngs(0)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tensor"))
  shardings = _shardings(abstract, mesh)
  reads = []
  original = hf_read.CheckpointReader.read
  monkeypatch.setattr(hf_read.CheckpointReader, "read", lambda self, n, i: reads.append(n) or original(self, n, i))
  state = load_hf_params(path, abstract, shardings)
  flat_sh = dict(nnx.to_flat_state(shardings))
  for p, var in nnx.to_flat_state(state):
    arr = var.get_value()
    assert arr.sharding == flat_sh[p], p
    assert var.get_metadata()["logical_axes"] == abstract_axes(abstract, p)
  plain_flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
  for p, var in nnx.to_flat_state(state):
    np.testing.assert_array_equal(var.get_value(), plain_flat[p].get_value())
  assert len(reads) == len(hf_read.CheckpointReader(path).weight_map)  # every tensor read once


def abstract_axes(abstract, path):
  return dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))[path].get_metadata()["logical_axes"]


@pytest.mark.parametrize(
    "param,index",
    [
        (("layers", "q_proj"), (slice(1, 2), slice(8, 24), slice(2, 4), slice(None))),
        (("layers", "k_proj"), (slice(0, 2), slice(0, 16), slice(1, 2), slice(None))),
        (("layers", "o_proj"), (slice(0, 1), slice(1, 3), slice(None), slice(16, 32))),
        (("layers", "down_proj"), (slice(1, 2), slice(24, 48), slice(0, 16))),
        (("layers", "q_proj"), (slice(0, 1), slice(None), slice(0, 1), slice(4, 12))),
        (("lm_head",), (slice(0, 16), slice(50, 98))),
        (("embed",), (slice(10, 20), slice(None))),
    ],
)
def test_callback_reads_only_requested_slice(hf_models, param, index):
  path = hf_models["llama"][1]
  plain = load_hf_checkpoint(path)
  full = np.asarray(dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))[param].get_value())
  reader = hf_read.CheckpointReader(path)
  reads = []
  original = reader.read

  def spy(name, idx):
    out = original(name, idx)
    reads.append((name, out.size))
    return out

  reader.read = spy
  spec = hf_layout.param_specs(plain.config)[param]
  block = hf_read.make_block_reader(reader, spec, full.shape, np.float32)(index)
  np.testing.assert_array_equal(block, full[index])
  read_names = {n for n, _ in reads}
  if spec.stacked:
    layers = range(*index[0].indices(full.shape[0]))
    assert read_names == {spec.hf_name.format(i=i) for i in layers}
  head_dim_split = param == ("layers", "q_proj") and index[3] != slice(None)
  total = sum(s for _, s in reads)
  if head_dim_split:  # reads the enclosing heads only: 1 of 4 heads
    assert total == block.size * 16 // 8 and total <= full.size // 4
  else:
    assert total == block.size


_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from artifex_dpo.models import LlamaModel, hf_read, load_hf_checkpoint, load_hf_params

    RULES = json.loads(sys.argv[2])
    def _shardings(abstract, mesh):
      def one(v):
        spec = jax.sharding.PartitionSpec(*(RULES[a] for a in v.get_metadata()["logical_axes"]))
        return jax.sharding.NamedSharding(mesh, spec)
      return jax.tree.map(one, nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))

    path = sys.argv[1]
    assert len(jax.devices()) == 4
    plain = load_hf_checkpoint(path)
    abstract = nnx.eval_shape(lambda: LlamaModel(plain.config, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
    shardings = _shardings(abstract, mesh)
    reads = []
    original = hf_read.CheckpointReader.read
    def spy(self, name, index):
      out = original(self, name, index)
      reads.append([name, int(out.size), int(np.prod(self.shape(name)))])
      return out
    hf_read.CheckpointReader.read = spy
    state = load_hf_params(path, abstract, shardings)
    plain_flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    sh = dict(nnx.to_flat_state(shardings))
    for p, var in nnx.to_flat_state(state):
      arr = var.get_value()
      assert arr.sharding == sh[p], p
      np.testing.assert_array_equal(np.asarray(arr), np.asarray(plain_flat[p].get_value()))
    print("RESULT", json.dumps(reads))
    """
)


def test_sharded_load_on_four_cpu_devices(hf_models):
  """In a fresh process with 4 CPU devices: each shard reads only its own HF slice."""
  path = hf_models["llama"][1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  proc = subprocess.run(
      [sys.executable, "-c", _MULTI_DEVICE_SCRIPT, str(path), json.dumps(RULES)],
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  reads = json.loads(proc.stdout.split("RESULT", 1)[1])
  frac, count = {}, {}
  for name, size, whole in reads:
    frac.setdefault(name, set()).add(size / whole)
    count[name] = count.get(name, 0) + 1
  assert count["model.layers.1.self_attn.q_proj.weight"] == 4  # one read per device shard
  assert count["model.norm.weight"] == 1  # replicated on 4 devices, read once
  # 2-D sharded (fsdp x tensor) matrices: each read is a quarter of the tensor.
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
               "model.layers.0.self_attn.o_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
    assert frac[name] == {0.25}, (name, frac[name])
  assert frac["model.layers.0.input_layernorm.weight"] == {1.0}  # replicated
  assert max(max(v) for k, v in frac.items() if "layernorm" not in k and k != "model.norm.weight") == 0.25
