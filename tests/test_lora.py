"""LoRA / QLoRA: step-0 equality, the base as reference, adapter-only training, quantized bases, PEFT export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer, GeneratedSequenceBatch, PreferenceBatch
from artifex_dpo import config as config_lib
from artifex_dpo.models import LlamaModel, export_hf, get_preset, load_hf_params
from artifex_dpo.models import lora as lora_lib
from artifex_dpo.models.lora import FrozenParam, LoraConfig, LoraLlamaModel

CFG = get_preset("llama-tiny", vocab_size=64)


def _tokens(seed=0, b=2, t=20, vocab=64):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@pytest.fixture(scope="module")
def base():
  model = LlamaModel(CFG, rngs=nnx.Rngs(0))
  return model, nnx.state(model, nnx.Param)


def _lora(params, config=CFG, seed=1, **kw):
  return LoraLlamaModel(config, LoraConfig(**{"rank": 4, "base_dtype": "float32", **kw}), rngs=nnx.Rngs(seed),
                        base_params=params)


def _logits(model, tokens):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


def _randomize_adapters(model, seed=3, scale=0.05):
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    var.set_value(jax.random.normal(next(keys), var.get_value().shape) * scale)
  nnx.update(model, nnx.from_flat_state(list(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))))


def test_step0_policy_equals_the_base_bitwise(base):
  model, params = base
  tokens = _tokens()
  lora = _lora(params)
  want = _logits(model, tokens)
  np.testing.assert_array_equal(_logits(lora, tokens), want)  # B = 0: x W + s (x A) 0 == x W
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: lora.base_view()(t))(tokens)), want)
  # A is PEFT's kaiming-uniform (nonzero), B is the zero factor.
  a, b = lora.layers.q_proj_lora_a[...], lora.layers.q_proj_lora_b[...]
  assert float(jnp.abs(a).max()) > 0 and float(jnp.abs(a).max()) <= 1 / np.sqrt(CFG.hidden_size)
  assert not np.any(np.asarray(b))
  # Only the adapters are Params (differentiated, in the optimizer); the base is frozen.
  assert {p[-1] for p, _ in nnx.to_flat_state(nnx.state(lora, nnx.Param))} == {
      f"{n}_lora_{f}" for n in lora_lib.PROJECTIONS for f in "ab"}
  assert len(nnx.to_flat_state(nnx.state(lora, FrozenParam))) == len(nnx.to_flat_state(params))


def test_adapters_change_exactly_the_targeted_projections(base):
  model, params = base
  tokens = _tokens(1)
  only_q = _lora(params, targets=r"layers/q_proj$")
  assert only_q.layers.targets == ("q_proj",)
  _randomize_adapters(only_q)
  a, b = only_q.layers.q_proj_lora_a[...], only_q.layers.q_proj_lora_b[...]
  scale = only_q.lora.scale
  # Oracle: the plain model with W_q + s * A B merged in by hand.
  merged = nnx.clone(model)
  merged.layers.q_proj.set_value(merged.layers.q_proj[...] + scale * jnp.einsum("ldr,lrnh->ldnh", a, b))
  np.testing.assert_allclose(_logits(only_q, tokens), _logits(merged, tokens), atol=2e-5)
  assert not np.allclose(_logits(only_q, tokens), _logits(model, tokens), atol=1e-3)
  np.testing.assert_allclose(_logits(lora_lib.merged_model(only_q), tokens), _logits(merged, tokens), atol=2e-5)


def _pref(seed=0, b=4, t=12, prompt=4):
  rng = np.random.default_rng(seed)
  cs, rs = rng.integers(0, 64, (b, t)), rng.integers(0, 64, (b, t))
  mask = np.zeros((b, t), np.int32)
  mask[:, prompt:] = 1
  return PreferenceBatch(chosen=GeneratedSequenceBatch.from_sequences(cs, response_mask=mask),
                         rejected=GeneratedSequenceBatch.from_sequences(rs, response_mask=mask))


def test_trainer_base_reference_trains_only_adapters(base):
  model, params = base
  lora = _lora(params)
  _randomize_adapters(lora)  # the policy differs from the base, so the reference matters
  with pytest.raises(ValueError, match="reference_model='base'"):
    DPOTrainer(model=lora, reference_model=None, optimizer=nnx.Optimizer(lora, optax.sgd(0.1), wrt=nnx.Param))
  with pytest.raises(ValueError, match="LoRA model"):
    DPOTrainer(model=model, reference_model="base", optimizer=nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param))
  opt = nnx.Optimizer(lora, optax.adam(1e-2), wrt=nnx.Param)
  trainer = DPOTrainer(model=lora, reference_model=lora_lib.BASE, optimizer=opt)
  batch = _pref()
  # Oracle: the same policy against an explicit copy of the base as reference model.
  explicit = DPOTrainer(model=nnx.clone(lora), reference_model=model,
                        optimizer=nnx.Optimizer(nnx.clone(lora), optax.adam(1e-2), wrt=nnx.Param))
  got, gm = trainer.compute_loss(batch)
  want, wm = explicit.compute_loss(batch)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(gm["rewards/margins"]), float(wm["rewards/margins"]), rtol=1e-5, atol=1e-7)
  assert abs(float(gm["rewards/margins"])) > 1e-4
  frozen_before = jax.tree.map(np.asarray, nnx.state(lora, FrozenParam))
  adapters_before = jax.tree.map(np.asarray, nnx.state(lora, nnx.Param))
  trainer.train_step(batch)
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, nnx.state(lora, FrozenParam)))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), adapters_before,
                         nnx.state(lora, nnx.Param))
  assert all(jax.tree.leaves(changed))
  # Optimizer state (Adam's moments) only for the adapters: its size is the adapters' size.
  n_adapters = sum(x.size for x in jax.tree.leaves(nnx.state(lora, nnx.Param)))
  n_opt = sum(x.size for x in jax.tree.leaves(nnx.state(opt, nnx.optimizer.OptState)) if x.ndim)
  assert n_opt == 2 * n_adapters


def _nf4_oracle(w: np.ndarray, axis: int) -> np.ndarray:
  """QLoRA's NF4 round trip written directly: per block of 64 along ``axis``, absmax, nearest code."""
  w = np.moveaxis(w.astype(np.float32), axis, -1)
  blocks = w.reshape(*w.shape[:-1], -1, lora_lib.nf4_block(w.shape[-1]))
  absmax = np.abs(blocks).max(-1, keepdims=True)
  idx = np.abs((blocks / absmax)[..., None] - lora_lib.NF4_CODE).argmin(-1)
  return np.moveaxis((lora_lib.NF4_CODE[idx] * absmax).reshape(w.shape), -1, axis)


def test_quantized_bases_match_oracles_and_the_bf16_base(base):
  model, params = base
  w = np.asarray(model.layers.o_proj[...])  # [L, N, H, D]: blocks along H
  packed, scale = lora_lib.quantize_nf4(jnp.asarray(w), 2)
  assert packed.dtype == jnp.uint8 and packed.shape == (w.shape[0], w.shape[1], w.shape[2] // 2, w.shape[3])
  np.testing.assert_allclose(np.asarray(lora_lib.dequantize_nf4(packed, scale, 2, jnp.float32)),
                             _nf4_oracle(w, 2), atol=1e-6)
  codes, s8 = lora_lib.quantize_int8(jnp.asarray(w), (1, 2))
  want8 = np.round(w / (np.abs(w).max((1, 2), keepdims=True) / 127)) * (np.abs(w).max((1, 2), keepdims=True) / 127)
  np.testing.assert_allclose(np.asarray(lora_lib.dequantize_int8(codes, s8, jnp.float32)), want8, atol=1e-6)
  # Logits against the bf16 base (the model a QLoRA user would otherwise train): stated tolerances,
  # relative to the logits' spread. int8 per-channel: 2%; NF4: 20%.
  tokens = _tokens(2)
  ref = _logits(_lora(params, base_dtype="bfloat16"), tokens)
  spread = float(ref.std())
  for dtype, tol in (("int8", 0.02), ("nf4", 0.2)):
    q = _lora(params, base_dtype=dtype)
    err = float(np.sqrt(np.mean((_logits(q, tokens) - ref) ** 2)))
    assert err < tol * spread, (dtype, err / spread)
    assert err > 0  # really quantized
  assert nnx.state(_lora(params, base_dtype="nf4").layers, FrozenParam)["q_proj"].get_value().dtype == jnp.uint8


@pytest.mark.parametrize("overrides,key", [
    ({"rank": -1}, "lora.rank"), ({"rank": 4, "alpha": 0.0}, "lora.alpha"),
    ({"rank": 4, "targets": "layers/(nope"}, "lora.targets"), ({"rank": 4, "targets": "embed"}, "lora.targets"),
    ({"rank": 4, "dropout": 1.5}, "lora.dropout"), ({"rank": 4, "base_dtype": "int4"}, "lora.base_dtype"),
])
def test_bad_lora_keys_name_the_key(overrides, key):
  c = config_lib.default_config()
  c.data.tokenizer = "byte"
  for k, v in overrides.items():
    c.lora[k] = v
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert e.value.key == key


def test_peft_export_requires_lora():
  c = config_lib.default_config()
  c.data.tokenizer = "byte"
  c.export.format = "peft"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert e.value.key == "export.format"


# ---- PEFT / transformers round trips -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    rms_norm_eps=1e-6, tie_word_embeddings=False)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  path = tmp_path_factory.mktemp("hf_base")
  model.save_pretrained(path)
  from artifex_dpo.models import config_from_hf

  ours_cfg = config_from_hf(path)
  abstract = nnx.eval_shape(lambda: LlamaModel(ours_cfg, rngs=nnx.Rngs(0)))
  lora = LoraLlamaModel(ours_cfg, LoraConfig(rank=4, alpha=8.0, base_dtype="float32"), rngs=nnx.Rngs(0),
                        base_params=load_hf_params(path, abstract))
  _randomize_adapters(lora, scale=0.2)
  return path, lora


def _torch_logits(model, tokens):
  import torch

  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def test_peft_export_loads_in_peft_with_the_same_logits(hf_base, tmp_path):
  peft = pytest.importorskip("peft")
  import transformers

  path, lora = hf_base
  out = tmp_path / "adapter"
  lora_lib.export_peft(lora, str(out), base_model_name_or_path=str(path), info={"step": 7})
  cfg = json.loads((out / "adapter_config.json").read_text())
  # Like the HF export: the marker names the step and the files, every file is readable by others.
  marker = json.loads((out / "artifex_dpo_export.json").read_text())
  assert marker["step"] == 7 and marker["files"] == ["adapter_config.json", "adapter_model.safetensors"]
  assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["peft_type"] == "LORA"
  base_model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32").eval()
  peft_model = peft.PeftModel.from_pretrained(base_model, str(out)).eval()
  tokens = _tokens(4, b=2, t=10)
  ours = _logits(lora, tokens)
  np.testing.assert_allclose(_torch_logits(peft_model, tokens), ours, atol=1e-4)
  # The adapters matter: without them PEFT's base gives other logits.
  with peft_model.disable_adapter():
    assert np.abs(_torch_logits(peft_model, tokens) - ours).max() > 1e-2


def test_merged_export_loads_in_transformers_with_the_same_logits(hf_base, tmp_path):
  import transformers

  _, lora = hf_base
  out = tmp_path / "merged"
  export_hf(lora_lib.merged_model(lora), out)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype="float32").eval()
  tokens = _tokens(5, b=2, t=10)
  np.testing.assert_allclose(_torch_logits(model, tokens), _logits(lora, tokens), atol=1e-4)


def test_resume_onto_another_base_is_refused(base):
  """A LoRA checkpoint records its base's fingerprint; another base is a config error (exit 2)."""
  from artifex_dpo import reference, setup

  model, params = base
  other = nnx.state(LlamaModel(CFG, rngs=nnx.Rngs(7)), nnx.Param)
  fingerprint = lambda p: reference.weights_fingerprint(lora_lib.frozen(nnx.state(_lora(p))))
  mine = fingerprint(params)
  assert mine == fingerprint(params) and mine != fingerprint(other)
  c = config_lib.default_config()
  saved = {"config": {}, "train_fingerprint": "data", "base_fingerprint": mine}
  setup.check_config_change(saved, dict(saved), c, "ckpt/5")  # the same base resumes
  with pytest.raises(config_lib.ConfigError) as e:
    setup.check_config_change(saved, dict(saved, base_fingerprint=fingerprint(other)), c, "ckpt/5")
  assert e.value.key == "model.hf_checkpoint"
  c.checkpoint.allow_change = True  # not overridable: adapters only fit their own base
  with pytest.raises(config_lib.ConfigError):
    setup.check_config_change(saved, dict(saved, base_fingerprint=fingerprint(other)), c, "ckpt/5")
  full = {k: v for k, v in saved.items() if k != "base_fingerprint"}  # a full-training checkpoint
  for a, b in ((full, saved), (saved, full)):
    with pytest.raises(config_lib.ConfigError) as e:
      setup.check_config_change(a, b, c, "ckpt/5")
    assert e.value.key == "lora.rank"


@pytest.mark.parametrize("name,chips,base_dtype", [("llama3_8b_lora_v5e8", 8, "bfloat16"),
                                                   ("llama3_70b_qlora_v5p64", 32, "nf4")])
def test_lora_presets_validate_and_fill_their_slices(name, chips, base_dtype):
  from test_configs import load

  from artifex_dpo import sharding

  module = load(name)
  assert module.NUM_CHIPS == chips <= 32
  c = module.get_config()
  assert set(config_lib.flat_keys(c)) == set(config_lib.DOCS)
  c.data.tokenizer = "byte"
  config_lib.validate(c)
  assert c.lora.rank == 16 and c.lora.base_dtype == base_dtype and c.data.max_length == 4096
  ici, _ = sharding.mesh_shape(c.mesh.ici, c.mesh.dcn, chips)
  assert np.prod(ici) == chips
  micro = c.train.global_batch_size // c.train.grad_accum_steps
  assert micro % (ici[0] * ici[1]) == 0
  assert f"python -m artifex_dpo.aot --config=configs/{name}.py" in module.__doc__


def test_adapter_dropout_only_in_training_forwards(base):
  _, params = base
  plain, dropped = _lora(params), _lora(params, dropout=0.5)
  _randomize_adapters(plain)
  _randomize_adapters(dropped)
  batch = _pref(1)
  make = lambda m: DPOTrainer(model=m, reference_model="base", optimizer=nnx.Optimizer(m, optax.sgd(0.0), wrt=nnx.Param))
  t_plain, t_drop = make(plain), make(dropped)
  # Evaluation (and the reference) never drop: the same loss as without dropout.
  want = float(t_plain.compute_loss(batch)[0])
  assert float(t_drop.compute_loss(batch)[0]) == want
  # Training forwards drop (loss before the lr-0 update differs), with a fresh mask every step.
  first, second = float(t_drop.train_step(batch)[0]), float(t_drop.train_step(batch)[0])
  assert abs(first - want) > 1e-4 and abs(second - want) > 1e-4 and abs(first - second) > 1e-4
  assert int(dropped.dropout_state[...][-1]) == 2  # the counter a checkpoint saves
  assert plain.dropout_state is None
  np.testing.assert_allclose(float(t_plain.train_step(batch)[0]), want, rtol=1e-6)
