"""The config schema: every key documented (config.py and README), validation names the key."""

from pathlib import Path

import pytest

from artifex_dpo import config as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_every_key_is_documented_in_config_and_readme():
  keys = config_lib.flat_keys(config_lib.default_config())
  assert set(keys) == set(config_lib.DOCS)
  readme = (ROOT / "README.md").read_text()
  missing = [k for k in keys if f"`{k}`" not in readme]
  assert not missing, missing


def _cfg(**overrides):
  c = config_lib.default_config()
  c.data.tokenizer = "byte"
  for key, value in overrides.items():
    node = c
    *parents, last = key.split("__")
    for p in parents:
      node = node[p]
    node[last] = value
  return c


@pytest.mark.parametrize("overrides,key", [
    (dict(model__dtype="float16"), "model.dtype"),
    (dict(model__remat="some"), "model.remat"),
    (dict(lora__rank=4, dpo__sync_ref_model=True), "dpo.sync_ref_model"),
    (dict(data__max_prompt_length=600), "data.max_prompt_length"),
    (dict(data__truncation_mode="middle"), "data.truncation_mode"),
    (dict(data__eval_split=1.0), "data.eval_split"),
    (dict(train__steps=0), "train.steps"),
    (dict(optim__schedule="step"), "optim.schedule"),
    (dict(mesh__ici__tensor=0), "mesh.ici.tensor"),
    (dict(train__profile_steps="5"), "train.profile_steps"),
    (dict(dpo__label_smoothing=0.7), "dpo.label_smoothing"),
    (dict(dpo__loss_type="ipo,sigmoid", dpo__loss_weights="1"), "dpo.loss_weights"),
    (dict(data__tokenizer="/nonexistent/tok.json"), "data.tokenizer"),
    (dict(model__hf_checkpoint="/nonexistent"), "model.hf_checkpoint"),
    (dict(data__pack_batches=False, data__share_prompt=True), "data.share_prompt"),  # padded rows share nothing
    (dict(model__attention_block=-1), "model.attention_block"),
    (dict(model__scan_unroll=0), "model.scan_unroll"),
])
def test_validation_names_the_key(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=f"config key {key}:"):
    config_lib.validate(_cfg(**overrides))


def test_defaults_validate_and_unknown_keys_are_refused():
  config_lib.validate(_cfg())
  c = _cfg()
  with c.unlocked():
    c.train.stepz = 3
  with pytest.raises(config_lib.ConfigError, match="train.stepz"):
    config_lib.validate(c)


def test_weight_decay_skips_norms_and_biases():
  """A zero-gradient AdamW update moves exactly the weight matrices (decay), nothing else."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from artifex_dpo.models import LlamaModel, get_preset
  from artifex_dpo.train import build_optimizer

  c = _cfg(optim__weight_decay=0.1)
  tx, _ = build_optimizer(c)
  model = LlamaModel(get_preset("llama-tiny", attention_bias=True), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(updates) if bool(jnp.any(v.get_value() != 0))}
  assert moved == {"embed", "lm_head", "layers/q_proj", "layers/k_proj", "layers/v_proj", "layers/o_proj",
                   "layers/gate_proj", "layers/up_proj", "layers/down_proj"}


def test_resume_refuses_only_changes_that_change_the_data():
  from artifex_dpo.train import _check_config_change

  def saved(**data):
    c = config_lib.default_config()
    c.data.update(data)
    return {"config": c.to_dict(), "train_fingerprint": "same"}

  def check(old, **data):
    c = config_lib.default_config()
    c.data.update(data)
    _check_config_change(old, {"config": c.to_dict(), "train_fingerprint": "same"}, c, "/ckpt/5")

  check(saved(share_prompt=True))  # no data-set packing plan: only the layout of a step changes
  with pytest.raises(config_lib.ConfigError, match="config key data.share_prompt:.*/ckpt/5"):
    check(saved(packing=True, share_prompt=True), packing=True)
  older = saved(packing=True)
  del older["config"]["data"]["share_prompt"]  # written before the key existed
  check(older, packing=True)
  with pytest.raises(config_lib.ConfigError, match="config key data.max_length"):
    check(saved(max_length=128))
