"""The service's configuration: every key declared once, and validation.

Each key is one :class:`~artifex_dpo.config_schema.Key` (type, default, allowed values, one-line doc) in
:func:`keys`; the ``dpo.*`` keys are the fields of :class:`~artifex_dpo.dpo_config.DPOConfig`. Config files in
``configs/`` start from :func:`default_config` and override what they need; ``--config.a.b=v`` flags override
further. :func:`validate` checks keys, types, values and files before anything heavy happens (no devices
needed) and raises :class:`ConfigError`, whose message is one line naming the key.

``python -m artifex_dpo.config --markdown`` prints the README's table of keys.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import sys

import ml_collections
from absl import logging
from ml_collections import config_dict

from artifex_dpo.config_schema import Key, dataclass_keys, dataclass_kwargs, markdown_table

placeholder = config_dict.placeholder

# The service's own choices (read by train.py): no other module holds them.
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
EXPORT_FORMATS = ("hf", "merged", "peft")
# Keys that once existed and are read by nothing: an old config file or checkpoint that sets one still
# loads (validate() logs a warning); --config.<key>=v on the command line is an unknown key (exit 2).
RETIRED_KEYS = {"train.seed": "read by nothing (the data order follows data.seed, the initialisation "
                              "model.init_seed)"}


class ConfigError(ValueError):
  """A bad configuration value: one line naming the key (the CLI exits with code 2)."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config key {key}: {message}")
    self.key = key


@functools.cache
def keys() -> tuple[Key, ...]:
  """Every config key, in the order of the README's table.

  Built on first use (and cached): it imports the modules whose constants give the choices, which
  ``import artifex_dpo.config`` alone does not (the launchers import it without JAX).
  """
  from artifex_dpo.data import formats, sources
  from artifex_dpo.dpo_config import DPOConfig
  from artifex_dpo.models import attention, config as model_config, hf_export, lora, presets

  dtypes, fill = model_config.DTYPES, ">= 1 or -1"
  return (
      Key("model.preset", "llama-tiny", f"model shape preset ({', '.join(presets.PRESETS)}); "
          "model.hf_checkpoint overrides it"),
      Key("model.hf_checkpoint", None, "Hugging Face model folder (config.json + *.safetensors); overrides the "
          "preset", value_type=str),
      Key("model.ref_hf_checkpoint", None, "reference model folder; unset: the reference is the policy's initial "
          "weights", value_type=str),
      Key("model.dtype", "float32", "compute dtype", choices=dtypes),
      Key("model.param_dtype", "float32", "policy parameter (master weight) dtype", choices=dtypes),
      Key("model.ref_dtype", "float32", "reference parameter dtype (bf16 halves its memory)", choices=dtypes),
      Key("model.remat", "none", "activation rematerialisation", choices=model_config.REMAT_POLICIES),
      Key("model.init_seed", 0, "seed of the random initialisation when no checkpoint is given"),
      Key("model.scan_unroll", 1, "layers per iteration of the layer scan (small models on CPU run faster fully "
          "unrolled)", bounds="> 0"),
      Key("model.attention_block", 128, "query positions per attention block; blocks skip keys wholly in their "
          "future (0: dense)", bounds=">= 0"),
      Key("model.attention_impl", "auto", "attention: auto (the Pallas splash kernel on TPU, the XLA attention "
          "elsewhere; the choice is logged), splash (TPU only; exit 2 elsewhere) or xla",
          choices=attention.ATTENTION_IMPL_KEYS),
      Key("data.train_files", None, "training files: globs, comma-separated (.jsonl, .json, .parquet, "
          ".array_record); unset: the built-in synthetic preference set", value_type=str),
      Key("data.eval_files", None, "eval files (globs); unset: hold out data.eval_split of the training data",
          value_type=str),
      Key("data.eval_split", 0.1, "fraction of training pairs held out for eval when no eval files are given",
          bounds="[0, 1)"),
      Key("data.format", "auto", "file format override (auto: from each file's extension)",
          choices=("auto", *sources.FORMATS)),
      Key("data.tokenizer", None, "tokenizer.json, a folder with one, a sentencepiece .model, or 'byte'; unset "
          "with model.hf_checkpoint: the checkpoint folder's tokenizer", value_type=str),
      Key("data.max_length", 512, "max tokens of prompt + response, per side", bounds="> 0"),
      Key("data.max_prompt_length", 256, "max prompt tokens (truncated by data.truncation_mode)", bounds="> 0"),
      Key("data.truncation_mode", "keep_end", "which end of a long prompt is kept",
          choices=formats.TRUNCATION_MODES),
      Key("data.pad_multiple", 64, "pad each batch to a multiple of this many tokens (buckets; max_length caps "
          "it)", bounds="> 0"),
      Key("data.packing", False, "pack whole pairs into rows of data.pack_length tokens (padding-free; segment "
          "ids keep them apart); train.global_batch_size then counts rows, and the pairs per step vary"),
      Key("data.pack_batches", None, "lay each global batch's pairs out padding-free in a fixed number of rows of "
          "data.pack_length (the same pairs per step and losses as padded batches; ignored with data.packing); "
          "unset: True for paired data, False (padded) for unpaired (KTO); False: padded batches", value_type=bool),
      Key("data.share_prompt", None, "packed rows (data.packing or data.pack_batches) run each pair's prompt "
          "once, shared by chosen and rejected (same losses; fewer tokens to compute); unset: True with "
          "data.pack_batches, else False", value_type=bool),
      Key("data.pack_length", 0, "tokens per packed row; 0: 2 * data.max_length (4 * with KTO and data.packing)",
          bounds=">= 0"),
      Key("data.max_pairs_per_row", 0, "most pairs in one packed row; 0: pack_length // 32", bounds=">= 0"),
      Key("data.shuffle", True, "shuffle the global order each epoch (a function of data.seed and the epoch)"),
      Key("data.seed", 0, "seed of the data order"),
      Key("data.skip_invalid", False, "skip (and count) invalid records instead of stopping with exit code 2"),
      Key("data.synthetic_pairs", 1024, "number of pairs of the built-in synthetic set (when no train files)",
          bounds="> 0"),
      *dataclass_keys("dpo", DPOConfig),
      Key("optim.name", "adamw", "optimizer", choices=OPTIMIZERS),
      Key("optim.learning_rate", 1e-6, "peak learning rate", bounds=">= 0"),
      Key("optim.schedule", "cosine", "learning-rate schedule after warmup", choices=SCHEDULES),
      Key("optim.warmup_steps", 0, "linear warmup steps", bounds=">= 0"),
      Key("optim.end_lr_fraction", 0.0, "final learning rate as a fraction of the peak (cosine / linear)",
          bounds="[0, 1]"),
      Key("optim.weight_decay", 0.0, "decoupled weight decay (not applied to norms and biases)", bounds=">= 0"),
      Key("optim.grad_clip_norm", 1.0, "clip gradients to this global norm; 0 = off", bounds=">= 0"),
      Key("optim.b1", 0.9, "Adam beta1"),
      Key("optim.b2", 0.999, "Adam beta2"),
      Key("optim.eps", 1e-8, "Adam epsilon"),
      Key("train.steps", 100, "optimizer updates to run", bounds="> 0"),
      Key("train.global_batch_size", 8, "preference pairs per update, over all processes", bounds="> 0"),
      Key("train.grad_accum_steps", 1, "microbatches per update (global_batch_size must divide); the update "
          "equals one over the whole batch (refused for the aot losses)", bounds="> 0"),
      Key("train.log_every", 10, "write metrics every N steps", bounds="> 0"),
      Key("train.eval_every", 0, "evaluate every N steps (0: only at the end)", bounds=">= 0"),
      Key("train.eval_batch_size", 8, "pairs per eval batch", bounds="> 0"),
      Key("train.max_nonfinite_steps", 10, "stop (exit 3) after this many non-finite steps in a row",
          bounds="> 0"),
      Key("train.profile_steps", "", "profile steps 'a,b' into workdir/profile (empty: off)"),
      Key("train.lease_timeout_s", 120.0, "seconds a workdir lease (WORKDIR/lease.json) outlives its holder's "
          "last renewal; a second live run on the workdir is refused (exit 2); 0: no lease", bounds=">= 0"),
      Key("train.compilation_cache", "workdir", "persistent XLA compilation cache: 'workdir' "
          "(WORKDIR/jax_cache), a folder, or 'off'; it holds executables the run loads, so keep it where only "
          "the run writes"),
      Key("checkpoint.save_every", 0, "save a checkpoint every N steps (0: only at the end)", bounds=">= 0"),
      Key("checkpoint.max_to_keep", 3, "checkpoints kept", bounds="> 0"),
      Key("checkpoint.async_save", True, "save in the background while training goes on"),
      Key("checkpoint.allow_change", False, "allow resuming with a different model / data / batch size"),
      Key("mesh.ici.data", 1, "data-parallel axis size within a slice (-1: fill)", bounds=fill),
      Key("mesh.ici.fsdp", -1, "FSDP axis size within a slice (-1: fill)", bounds=fill),
      Key("mesh.ici.tensor", 1, "tensor-parallel axis size within a slice", bounds=fill),
      Key("mesh.dcn.data", -1, "data-parallel axis size across slices (-1: fill)", bounds=fill),
      Key("mesh.dcn.fsdp", 1, "FSDP axis size across slices", bounds=fill),
      Key("mesh.dcn.tensor", 1, "tensor-parallel axis size across slices", bounds=fill),
      Key("lora.rank", 0, "LoRA rank r: train low-rank adapters on a frozen base (0: off, full training)",
          bounds=">= 0"),
      Key("lora.alpha", 16.0, "LoRA scale numerator: the update is (alpha / rank) * x A B", bounds="> 0"),
      Key("lora.targets", lora.DEFAULT_TARGETS, "regex over layer weight paths (layers/q_proj ... "
          "layers/down_proj) that get adapters"),
      Key("lora.dropout", 0.0, "dropout rate on the adapter inputs in training steps (PEFT's lora_dropout)",
          bounds="[0, 1)"),
      Key("lora.base_dtype", "bfloat16", "storage of the frozen base (int8 / nf4: QLoRA)",
          choices=lora.BASE_DTYPES),
      Key("export.hf", False, "export the final policy in Hugging Face format to workdir/export"),
      Key("export.format", "hf", "hf: full HF weights (with LoRA: adapters merged in); merged: the same, LoRA "
          "only; peft: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), LoRA only",
          choices=EXPORT_FORMATS),
      Key("export.dtype", "float32", "dtype of the exported weights", choices=hf_export.EXPORT_DTYPES),
  )


def _keys_by_name() -> dict[str, Key]:
  return {k.name: k for k in keys()}


def __getattr__(name: str):
  """``DOCS`` (key -> one-line doc), derived from :func:`keys` on first use."""
  if name == "DOCS":
    return {k.name: k.doc for k in keys()}
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default (unset keys are placeholders of their type); see :func:`keys`."""
  sections: dict = {}
  for k in keys():
    *parents, last = k.name.split(".")
    node = sections
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = placeholder(k.value_type) if k.default is None else k.default
  c = ml_collections.ConfigDict()
  for name, section in sections.items():
    c[name] = section
  return c


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """The dotted names of every leaf of a config."""
  out = []
  for k, v in c.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(flat_keys(v, key + "."))
    else:
      out.append(key)
  return out


def _get(c, key: str):
  node = c
  for part in key.split("."):
    node = node[part]
  return node


def _check_globs(key: str, value: str | None) -> None:
  if not value:
    return
  for pattern in [p.strip() for p in value.split(",") if p.strip()]:
    if "://" in pattern:
      continue  # object stores are checked when read
    if not glob.glob(pattern):
      raise ConfigError(key, f"no file matches {pattern!r}")


def validate(c: ml_collections.ConfigDict, *, check_files: bool = True) -> None:
  """Checks a config before anything heavy; raises ConfigError naming the first bad key.

  First the checks every key declares (known key, type, choices, bounds), then the rules between keys.

  Args:
    c: the config.
    check_files: False skips the checks of data/model/tokenizer paths (for the AOT compile, which needs
      only shapes).
  """
  declared = _keys_by_name()
  got = set(flat_keys(c))
  for key in sorted(got & set(RETIRED_KEYS)):
    logging.warning("config key %s is retired and ignored: %s", key, RETIRED_KEYS[key])
  for key in sorted(got - set(declared) - set(RETIRED_KEYS)):
    raise ConfigError(key, "unknown key")
  for key in sorted(set(declared) - got):
    raise ConfigError(key, "missing")
  for key in declared.values():
    problem = key.problem(_get(c, key.name))
    if problem:
      raise ConfigError(key.name, problem)
  from artifex_dpo.models import presets  # light import: no devices

  if not c.model.hf_checkpoint and c.model.preset not in presets.PRESETS:
    raise ConfigError("model.preset", f"must be one of {', '.join(presets.PRESETS)} (or set model.hf_checkpoint), "
                                      f"got {c.model.preset!r}")
  if check_files:
    _check_files(c)
  if c.data.pack_batches is None or c.data.share_prompt is None:  # unset: the layout default, filled in here
    from artifex_dpo.data.packing import resolve_layout
    from artifex_dpo.losses import UNPAIRED_LOSSES

    unpaired = any(t.strip() in UNPAIRED_LOSSES for t in (c.dpo.loss_type or "").split(","))
    c.data.pack_batches, c.data.share_prompt = resolve_layout(c.data.pack_batches, c.data.share_prompt,
                                                              c.data.packing, unpaired)
  if (c.data.packing or c.data.pack_batches) and c.data.pack_length and c.data.pack_length < 2 * c.data.max_length:
    raise ConfigError("data.pack_length", f"{c.data.pack_length} cannot hold a pair of two sequences of "
                                          f"data.max_length={c.data.max_length} (use >= {2 * c.data.max_length} or 0)")
  if c.data.share_prompt and not (c.data.packing or c.data.pack_batches):
    raise ConfigError("data.share_prompt", "needs packed rows: set data.packing=True or data.pack_batches=True")
  if c.data.max_prompt_length >= c.data.max_length:
    raise ConfigError("data.max_prompt_length", f"must be < data.max_length ({c.data.max_length}), got "
                                                f"{c.data.max_prompt_length}")
  if c.train.global_batch_size % c.train.grad_accum_steps:
    raise ConfigError("train.global_batch_size", f"{c.train.global_batch_size} is not divisible by "
                                                 f"train.grad_accum_steps={c.train.grad_accum_steps}")
  if c.train.grad_accum_steps > 1:
    from artifex_dpo.losses import BATCH_COUPLED_LOSSES, UNPAIRED_LOSSES  # light import: no devices

    coupled = [t.strip() for t in (c.dpo.loss_type or "").split(",") if t.strip() in BATCH_COUPLED_LOSSES]
    if coupled:
      raise ConfigError("train.grad_accum_steps", f"must be 1 with dpo.loss_type={c.dpo.loss_type}: "
                                                  f"{','.join(coupled)} sorts over the whole batch, which "
                                                  "microbatches cannot add up to")
    if [t for t in (c.dpo.loss_type or "").split(",") if t.strip() in UNPAIRED_LOSSES]:
      raise ConfigError("train.grad_accum_steps", f"must be 1 with dpo.loss_type={c.dpo.loss_type}: KTO's KL "
                                                  "reference point is a mean over the batch, which microbatches "
                                                  "cannot add up to")
  if c.lora.rank:
    try:
      lora_config(c)
    except ValueError as e:
      m = re.search(r"LoraConfig\.(\w+)", str(e))
      raise ConfigError(f"lora.{m.group(1)}" if m else "lora", str(e)) from None
    if c.dpo.sync_ref_model:  # as TRL: the reference is the frozen base, there is no reference copy to mix
      raise ConfigError("dpo.sync_ref_model", "TR-DPO mixes the policy into a reference copy; with lora.rank > 0 "
                                              "the reference is the frozen base (TRL refuses this combination too)")
  elif c.export.format != "hf":
    raise ConfigError("export.format", f"{c.export.format!r} exports adapters: it needs lora.rank > 0")
  if not c.train.compilation_cache:
    raise ConfigError("train.compilation_cache", "must be 'workdir', 'off' or a folder, got an empty value")
  if c.train.profile_steps:
    try:
      a, b = (int(x) for x in c.train.profile_steps.split(","))
      assert 0 < a < b
    except (ValueError, AssertionError):
      raise ConfigError("train.profile_steps", f"must be 'start,stop' with 0 < start < stop, got "
                                               f"{c.train.profile_steps!r}") from None
  try:
    dpo_cfg = dpo_config(c)
  except ValueError as e:
    m = re.search(r"DPOConfig\.(\w+)", str(e))
    raise ConfigError(f"dpo.{m.group(1)}" if m and m.group(1) in c.dpo else "dpo", str(e)) from None
  if dpo_cfg.unpaired:  # KTO in the service (what is not there yet is refused)
    if c.data.packing and "kto" not in dpo_cfg.loss_types:
      raise ConfigError("data.packing", f"packs each example with its KL row: only with dpo.loss_type=kto, "
                                        f"not {c.dpo.loss_type!r}")
    if c.data.packing and c.data.pack_length and c.data.pack_length < 4 * c.data.max_length:
      raise ConfigError("data.pack_length", f"{c.data.pack_length} cannot hold two KTO examples with their KL rows "
                                            f"(a row holds at least two): use >= {4 * c.data.max_length} or 0")
    if c.data.packing and c.data.max_pairs_per_row and c.data.max_pairs_per_row < 3:
      raise ConfigError("data.max_pairs_per_row", f"must be >= 3 (or 0) with KTO and data.packing (rows hold "
                                                   f"groups of 2 or 3 examples), got {c.data.max_pairs_per_row}")
    if c.data.pack_batches and "kto" not in dpo_cfg.loss_types:
      raise ConfigError("data.pack_batches", f"packs each example with its KL row: only with dpo.loss_type=kto, "
                                             f"not {c.dpo.loss_type!r}")
    if "kto" in dpo_cfg.loss_types and c.train.global_batch_size // c.train.grad_accum_steps < 2:
      raise ConfigError("train.global_batch_size", "KTO needs at least 2 examples per (micro)batch: its KL "
                                                   "reference point pairs each prompt with another completion")


def _check_files(c: ml_collections.ConfigDict) -> None:
  for key in ("model.hf_checkpoint", "model.ref_hf_checkpoint"):
    path = _get(c, key)
    if path and "://" not in path and not os.path.isfile(os.path.join(path, "config.json")):
      raise ConfigError(key, f"{path!r} is not a folder with a config.json")
  _check_globs("data.train_files", c.data.train_files)
  _check_globs("data.eval_files", c.data.eval_files)
  tok = c.data.tokenizer
  if tok and tok != "byte" and "://" not in tok and not os.path.exists(tok):  # object stores: checked when read
    raise ConfigError("data.tokenizer", f"{tok!r} does not exist")
  if not tok and not c.model.hf_checkpoint:
    raise ConfigError("data.tokenizer", "unset, and no model.hf_checkpoint to take one from (use 'byte' for the "
                                        "built-in byte tokenizer)")


def lora_config(c: ml_collections.ConfigDict):
  """The LoraConfig from the ``lora.*`` keys, or None when ``lora.rank`` is 0 (full training)."""
  if not c.lora.rank:
    return None
  from artifex_dpo.models.lora import LoraConfig

  return LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=c.lora.targets, dropout=c.lora.dropout,
                    base_dtype=c.lora.base_dtype)


def dpo_config(c: ml_collections.ConfigDict):
  """The library's DPOConfig from the ``dpo.*`` keys (its fields; an empty string field is None)."""
  from artifex_dpo.dpo_config import DPOConfig

  return DPOConfig(**dataclass_kwargs(DPOConfig, c.dpo))


def readme_table() -> str:
  """The README's "Config keys" table, rendered from :func:`keys`."""
  return markdown_table(keys())


if __name__ == "__main__":
  if sys.argv[1:] != ["--markdown"]:
    sys.exit("usage: python -m artifex_dpo.config --markdown  (prints the README's table of config keys)")
  sys.stdout.write(readme_table())
