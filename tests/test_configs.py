"""The TPU preset configs: they load, validate, document every key, and their meshes fill their slices."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # launch/ is run from the repository root, not installed

from artifex_dpo import config as config_lib  # noqa: E402
from artifex_dpo import sharding  # noqa: E402
from artifex_dpo.models import get_preset  # noqa: E402
from artifex_dpo.models.llama import count_params  # noqa: E402
from launch import gke  # noqa: E402

GIB = 1024**3
HBM = {"v5p": 95 * GIB, "v5e": 16 * GIB}

# file, preset, slice, chips, hosts, (data, fsdp, tensor) within the slice, AOT topology
PRESETS = [
    ("llama3_8b_v5p32", "llama3-8b", "v5p-32", 16, 4, (1, 16, 1), "v5p:2x2x4"),
    ("llama3_8b_v5p32_16k", "llama3-8b", "v5p-32", 16, 4, (1, 16, 1), "v5p:2x2x4"),
    ("llama3_70b_v5p256", "llama3-70b", "v5p-256", 128, 32, (1, 32, 4), "v5p:4x4x8"),
    ("qwen2_7b_v5e64", "qwen2-7b", "v5e-64", 64, 16, (1, 16, 4), "v5e:8x8"),
]


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def fake_hf(tmp_path_factory):
  """A folder that passes validate()'s check of model.hf_checkpoint (config.json only), and a data file."""
  root = tmp_path_factory.mktemp("hf")
  (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
  data = root / "train.jsonl"
  data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
  return root


@pytest.mark.parametrize("name, preset, slice_name, chips, hosts, ici, topology", PRESETS)
def test_preset_config(name, preset, slice_name, chips, hosts, ici, topology, fake_hf):
  module = load(name)
  assert module.SLICE == slice_name and module.NUM_CHIPS == chips
  sl = gke.parse_slice(module.SLICE)
  assert (sl.chips, sl.hosts, sl.aot_topology) == (chips, hosts, topology)
  c = module.get_config()

  # Every key is a documented key of default_config(), and none is added.
  assert set(config_lib.flat_keys(c)) == set(config_lib.DOCS) == set(config_lib.flat_keys(config_lib.default_config()))
  assert all(config_lib.DOCS[k].strip() for k in config_lib.DOCS)

  # Validates with the run-time overrides (a fake HF folder) and with the byte tokenizer alone.
  run = module.get_config()
  run.model.hf_checkpoint = str(fake_hf)
  run.data.train_files = str(fake_hf / "train.jsonl")
  config_lib.validate(run)
  byte = module.get_config()
  byte.data.tokenizer = "byte"
  config_lib.validate(byte)
  with pytest.raises(config_lib.ConfigError, match="data.tokenizer"):
    config_lib.validate(module.get_config())  # neither: refused, as documented

  # The choices the issue asks for.
  assert c.model.preset == preset
  assert (c.model.dtype, c.model.ref_dtype, c.model.remat) == ("bfloat16", "bfloat16", "full")
  assert c.model.param_dtype == "float32"
  assert c.data.max_length >= 4096 and c.data.max_prompt_length < c.data.max_length
  assert 5e-7 <= c.optim.learning_rate <= 1e-6
  assert c.checkpoint.save_every > 0 and c.checkpoint.save_every <= c.train.steps // 5
  assert c.export.hf is True

  # The mesh fills the slice exactly; multi-slice adds a data-parallel DCN axis.
  ici_shape, dcn_shape = sharding.mesh_shape(c.mesh.ici, c.mesh.dcn, chips)
  assert ici_shape == ici and dcn_shape == (1, 1, 1)
  assert math.prod(ici_shape) == chips
  ici2, dcn2 = sharding.mesh_shape(c.mesh.ici, c.mesh.dcn, 2 * chips, num_slices=2)
  assert ici2 == ici and dcn2 == (2, 1, 1)

  # Batches divide over the batch shards (data x fsdp) and the hosts, as train.run requires.
  shards = ici_shape[0] * ici_shape[1]
  micro = c.train.global_batch_size // c.train.grad_accum_steps
  assert c.train.global_batch_size % c.train.grad_accum_steps == 0
  for size in (micro, c.train.eval_batch_size):
    assert size % shards == 0 and size % hosts == 0, (size, shards, hosts)

  # Tensor parallelism divides what it shards (heads, KV heads, MLP, vocabulary).
  model = get_preset(preset)
  tensor = ici_shape[2]
  for dim in (model.num_heads, model.num_kv_heads, model.intermediate_size, model.vocab_size):
    assert dim % tensor == 0, (dim, tensor)

  # Sharded training state per chip (fp32 params + 2 Adam moments + fp32 grads, bf16 reference)
  # leaves most of the chip's HBM to activations.
  params = count_params(model)
  state_bytes = params * (4 + 8 + 4 + 2) / chips
  assert state_bytes < 0.25 * HBM[sl.generation.name], state_bytes / GIB

  # The docstring shows the AOT check and the run command with the run-time overrides.
  doc = module.__doc__
  assert f"python -m artifex_dpo.aot --config=configs/{name}.py --topology={topology}" in doc
  assert f"python -m artifex_dpo.main --config=configs/{name}.py --workdir=gs://" in doc
  for key in ("model.hf_checkpoint", "data.tokenizer", "data.train_files"):
    assert f"--config.{key}=" in doc
