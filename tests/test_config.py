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
  from artifex_dpo.setup import build_optimizer

  c = _cfg(optim__weight_decay=0.1)
  tx, _ = build_optimizer(c)
  model = LlamaModel(get_preset("llama-tiny", attention_bias=True), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(updates) if bool(jnp.any(v.get_value() != 0))}
  assert moved == {"embed", "lm_head", "layers/q_proj", "layers/k_proj", "layers/v_proj", "layers/o_proj",
                   "layers/gate_proj", "layers/up_proj", "layers/down_proj"}


def test_resume_refuses_only_changes_that_change_the_data():
  from artifex_dpo.setup import check_config_change

  def saved(**data):
    c = config_lib.default_config()
    c.data.update(data)
    return {"config": c.to_dict(), "train_fingerprint": "same"}

  def check(old, **data):
    c = config_lib.default_config()
    c.data.update(data)
    check_config_change(old, {"config": c.to_dict(), "train_fingerprint": "same"}, c, "/ckpt/5")

  check(saved(share_prompt=True))  # no data-set packing plan: only the layout of a step changes
  with pytest.raises(config_lib.ConfigError, match="config key data.share_prompt:.*/ckpt/5"):
    check(saved(packing=True, share_prompt=True), packing=True)
  older = saved(packing=True)
  del older["config"]["data"]["share_prompt"]  # written before the key existed
  check(older, packing=True)
  with pytest.raises(config_lib.ConfigError, match="config key data.max_length"):
    check(saved(max_length=128))


def _readme_config_table() -> str:
  """The table of the README's "### Config keys" section, as text."""
  section = (ROOT / "README.md").read_text().split("### Config keys\n", 1)[1].split("\n### ", 1)[0]
  lines = section.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| key |"))
  end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
  return "\n".join(lines[start:end]) + "\n"


def test_readme_config_table_is_rendered_from_the_declaration():
  assert _readme_config_table() == config_lib.readme_table(), (
      "README.md's '### Config keys' table differs from the declaration in artifex_dpo/config.py: regenerate "
      "it with `python -m artifex_dpo.config --markdown` and paste it over the old table")


def test_dpo_keys_are_the_fields_of_dpo_config():
  """The dpo section and DPOConfig are one declaration: same names, the defaults of DPOConfig's constructor."""
  import dataclasses

  from artifex_dpo.dpo_config import DPOConfig

  c = config_lib.default_config()
  assert set(c.dpo.keys()) == {f.name for f in dataclasses.fields(DPOConfig)}
  assert config_lib.dpo_config(c) == DPOConfig()  # the library's own defaults
  c.dpo.update(beta=0.3, loss_type="ipo,sft", loss_weights="1,0.5", rpo_alpha=0.25, logits_chunk_size=64)
  got = config_lib.dpo_config(c)
  assert (got.beta, got.loss_types, got.loss_settings().loss_weights, got.rpo_alpha, got.logits_chunk_size) == (
      0.3, ("ipo", "sft"), (1.0, 0.5), 0.25, 64)


def _with(**section_values):
  """A config (built from a plain dict, so no ml_collections type check) with ``section__key=value`` set."""
  d = _cfg().to_dict()
  for key, value in section_values.items():
    *parents, last = key.split("__")
    node = d
    for p in parents:
      node = node[p]
    node[last] = value
  return config_lib.ml_collections.ConfigDict(d)


@pytest.mark.parametrize("values,key,message", [
    (dict(train__steps=2.5), "train.steps", "must be an int"),
    (dict(train__steps=True), "train.steps", "must be an int"),
    (dict(data__packing=1), "data.packing", "must be True or False"),
    (dict(optim__learning_rate="fast"), "optim.learning_rate", "must be a number"),
    (dict(data__tokenizer=7), "data.tokenizer", "must be a string or unset"),
    (dict(dpo__beta=0.0), "dpo.beta", "must be > 0"),
    (dict(dpo__loss_type="sigmoid,typo"), "dpo.loss_type", "lists 'typo', which is not one of sigmoid"),
    (dict(dpo__logp_reduction="max"), "dpo.logp_reduction", "must be one of sum, mean"),
    (dict(data__format="xml"), "data.format", "must be one of"),
    (dict(lora__base_dtype="fp8"), "lora.base_dtype", "must be one of"),
    (dict(optim__end_lr_fraction=1.5), "optim.end_lr_fraction", r"must be in \[0, 1\]"),
    (dict(mesh__dcn__fsdp=-2), "mesh.dcn.fsdp", "must be >= 1 or -1"),
])
def test_declared_type_choices_and_bounds_are_checked(values, key, message):
  with pytest.raises(config_lib.ConfigError, match=f"^config key {key}: {message}") as e:
    config_lib.validate(_with(**values))
  assert "\n" not in str(e.value)


def test_every_reader_format_is_accepted(tmp_path):
  """data.format takes each format the reader knows (json was refused before)."""
  import json

  from artifex_dpo.data import sources

  path = tmp_path / "train.json"
  path.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
  for fmt in sources.FORMATS:
    config_lib.validate(_cfg(data__format=fmt))
  config_lib.validate(_cfg(data__format="json", data__train_files=str(path)))
  assert [r for _, r in sources.read_records(str(path), "json")] == [{"prompt": "p", "chosen": "a", "rejected": "b"}]


def test_retired_train_seed_still_loads(caplog):
  """An old config file or checkpoint that sets train.seed loads; the key is read by nothing."""
  from artifex_dpo.setup import check_config_change as _check_config_change

  assert "train.seed" not in config_lib.flat_keys(config_lib.default_config())
  c = _cfg()
  c.train.seed = 1  # an old config file
  with caplog.at_level("WARNING"):
    config_lib.validate(c)
  assert "train.seed is retired" in caplog.text
  old = config_lib.default_config()
  old.train.seed = 0  # a checkpoint written before the key was retired
  _check_config_change({"config": old.to_dict(), "train_fingerprint": "x"},
                       {"config": config_lib.default_config().to_dict(), "train_fingerprint": "x"},
                       config_lib.default_config(), "/ckpt/5")


def test_cli_refuses_train_seed_override_with_exit_2(tmp_path):
  import subprocess
  import sys

  r = subprocess.run([sys.executable, "-m", "artifex_dpo.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                      "--config.train.seed=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert "config key train.seed: unknown key" in r.stderr


@pytest.mark.parametrize("bounds,inside,outside", [
    ("> 0", [1e-9, 3], [0, -1]),
    (">= 1", [1, 2.5], [0.999, 0]),
    ("[0, 0.5)", [0, 0.49], [0.5, -0.01]),
    ("[0, 1]", [0, 1], [1.01, -1e-9]),
    (">= 1 or -1", [-1, 1, 64], [0, -2, 0.5]),
])
def test_bounds(bounds, inside, outside):
  from artifex_dpo.config_schema import Key

  key = Key("x.y", 1.0, "doc", bounds=bounds)
  assert [key.problem(v) for v in inside] == [None] * len(inside)
  assert all(key.problem(v) for v in outside)


def test_none_is_allowed_only_where_the_default_is_unset():
  from artifex_dpo.dpo_config import DPOConfig

  for name in ("logp_reduction", "f_divergence_type", "logits_chunk_size", "beta"):
    with pytest.raises(ValueError, match=f"DPOConfig.{name} "):
      DPOConfig(**{name: None})
  assert DPOConfig(rpo_alpha=None, ld_alpha=None, loss_type=None) == DPOConfig()
