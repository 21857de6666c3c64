"""The service's configuration: every key with its default, type and one-line doc, and validation.

Config files in ``configs/`` start from :func:`default_config` and override what they need;
``--config.a.b=v`` flags override further. :func:`validate` checks keys, types, values and
files before anything heavy happens (no devices needed) and raises :class:`ConfigError`, whose
message is one line naming the key.
"""

from __future__ import annotations

import glob
import os
import re

import ml_collections
from ml_collections import config_dict

placeholder = config_dict.placeholder


class ConfigError(ValueError):
  """A bad configuration value: one line naming the key (the CLI exits with code 2)."""

  def __init__(self, key: str, message: str):
    super().__init__(f"config key {key}: {message}")
    self.key = key


# key -> one-line doc. Every key of default_config() is listed here (a test checks it).
DOCS: dict[str, str] = {
    "model.preset": "model shape preset (llama-tiny, llama3-8b, llama3-70b, qwen2-0.5b, qwen2-7b, mistral-7b)",
    "model.hf_checkpoint": "Hugging Face model folder (config.json + *.safetensors); overrides the preset",
    "model.ref_hf_checkpoint": "reference model folder; unset: the reference is the policy's initial weights",
    "model.dtype": "compute dtype: float32 | bfloat16",
    "model.param_dtype": "policy parameter (master weight) dtype: float32 | bfloat16",
    "model.ref_dtype": "reference parameter dtype: float32 | bfloat16 (bf16 halves its memory)",
    "model.remat": "activation rematerialisation: none | full | dots_saveable",
    "model.init_seed": "seed of the random initialisation when no checkpoint is given",
    "model.scan_unroll": "layers per iteration of the layer scan (small models on CPU run faster fully unrolled)",
    "model.attention_block": "query positions per attention block; blocks skip keys wholly in their future (0: dense)",
    "model.attention_impl": "attention: auto (the Pallas splash kernel on TPU, XLA elsewhere) | splash | xla",
    "data.train_files": "training files: globs, comma-separated (.jsonl, .parquet, .array_record); "
                        "unset: the built-in synthetic preference set",
    "data.eval_files": "eval files (globs); unset: hold out data.eval_split of the training data",
    "data.eval_split": "fraction of training pairs held out for eval when no eval files are given",
    "data.format": "file format override: auto | jsonl | parquet | array_record",
    "data.tokenizer": "tokenizer.json, a folder with one, a sentencepiece .model, or 'byte'; "
                      "unset with model.hf_checkpoint: the checkpoint folder's tokenizer",
    "data.max_length": "max tokens of prompt + response, per side",
    "data.max_prompt_length": "max prompt tokens (truncated by data.truncation_mode)",
    "data.truncation_mode": "which end of a long prompt is kept: keep_end | keep_start",
    "data.pad_multiple": "pad each batch to a multiple of this many tokens (buckets; max_length caps it)",
    "data.packing": "pack whole pairs into rows of data.pack_length tokens (padding-free; segment ids keep them "
                    "apart); train.global_batch_size then counts rows, and the pairs per step vary",
    "data.pack_batches": "lay each global batch's pairs out padding-free in a fixed number of rows of "
                         "data.pack_length (the same pairs per step and losses as padded batches; ignored with "
                         "data.packing); unset: True for paired data, False (padded) for unpaired (KTO); False: "
                         "padded batches",
    "data.share_prompt": "packed rows (data.packing or data.pack_batches) run each pair's prompt once, shared by "
                         "chosen and rejected (same losses; fewer tokens to compute); unset: True with "
                         "data.pack_batches, else False",
    "data.pack_length": "tokens per packed row; 0: 2 * data.max_length",
    "data.max_pairs_per_row": "most pairs in one packed row; 0: pack_length // 32",
    "data.shuffle": "shuffle the global order each epoch (a function of data.seed and the epoch)",
    "data.seed": "seed of the data order",
    "data.skip_invalid": "skip (and count) invalid records instead of stopping with exit code 2",
    "data.synthetic_pairs": "number of pairs of the built-in synthetic set (when no train files)",
    "dpo.beta": "reward scale beta (KL strength)",
    "dpo.label_smoothing": "cDPO / robust label-flip rate, in [0, 0.5)",
    "dpo.reference_free": "score against a uniform reference (SimPO when loss_type is left empty)",
    "dpo.loss_type": "loss name(s), comma-separated, e.g. sigmoid or sigmoid,sft; empty: sigmoid "
                     "(simpo when reference-free)",
    "dpo.loss_weights": "comma-separated weights, one per loss; empty: all 1",
    "dpo.logp_reduction": "sequence log-prob reduction: sum | mean",
    "dpo.simpo_gamma": "SimPO target margin gamma",
    "dpo.rpo_alpha": "weight of the chosen NLL term (RPO); unset: off",
    "dpo.discopop_tau": "DiscoPOP temperature",
    "dpo.logits_chunk_size": "tokens (rows x positions) per device in one chunk of the chunked output projection + "
                             "log-softmax: each device holds about this many tokens' float32 logits at a time",
    "dpo.precompute_ref_logps": "score the data with the reference once before training (cached in "
                                "workdir/ref_logps); then no reference model in memory and no reference forward",
    "dpo.f_divergence_type": "f-DPO divergence: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence "
                             "(non-default only with sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft)",
    "dpo.f_alpha_divergence_coef": "alpha of f_divergence_type=alpha_divergence",
    "dpo.use_weighting": "WPO: weight each pair by the policy's length-normalised probabilities of both responses",
    "dpo.ld_alpha": "LD-DPO: weight of response tokens beyond the pair's shorter response, in [0, 1]; unset: off",
    "dpo.cpo_alpha": "CPO: weight of the chosen NLL term with reference_free=True (TRL's default 1.0); unset: off",
    "dpo.alpha": "AlphaPO reward shape (1 - p^-alpha)/alpha for reference-free sigmoid/hinge/ipo/simpo/alphapo; 0: off",
    "dpo.desirable_weight": "KTO: weight of desirable (label true) examples",
    "dpo.undesirable_weight": "KTO: weight of undesirable (label false) examples",
    "dpo.sync_ref_model": "TR-DPO: every ref_model_sync_steps updates, reference = a * policy + (1 - a) * reference",
    "dpo.ref_model_mixup_alpha": "TR-DPO mix a in [0, 1] (1: hard copy)",
    "dpo.ref_model_sync_steps": "TR-DPO: updates between reference syncs",
    "optim.name": "optimizer: adamw | adam | sgd",
    "optim.learning_rate": "peak learning rate",
    "optim.schedule": "learning-rate schedule after warmup: cosine | linear | constant",
    "optim.warmup_steps": "linear warmup steps",
    "optim.end_lr_fraction": "final learning rate as a fraction of the peak (cosine / linear)",
    "optim.weight_decay": "decoupled weight decay (not applied to norms and biases)",
    "optim.grad_clip_norm": "clip gradients to this global norm; 0 = off",
    "optim.b1": "Adam beta1",
    "optim.b2": "Adam beta2",
    "optim.eps": "Adam epsilon",
    "train.steps": "optimizer updates to run",
    "train.global_batch_size": "preference pairs per update, over all processes",
    "train.grad_accum_steps": "microbatches per update (global_batch_size must divide); the update equals one "
                              "over the whole batch (refused for the aot losses)",
    "train.log_every": "write metrics every N steps",
    "train.eval_every": "evaluate every N steps (0: only at the end)",
    "train.eval_batch_size": "pairs per eval batch",
    "train.seed": "training seed (RNG state)",
    "train.max_nonfinite_steps": "stop (exit 3) after this many non-finite steps in a row",
    "train.profile_steps": "profile steps 'a,b' into workdir/profile (empty: off)",
    "train.compilation_cache": "persistent XLA compilation cache: 'workdir' (WORKDIR/jax_cache), a folder, or "
                               "'off'; it holds executables the run loads, so keep it where only the run writes",
    "train.lease_timeout_s": "seconds a workdir lease (WORKDIR/lease.json) outlives its holder's last renewal; "
                             "a second live run on the workdir is refused (exit 2); 0: no lease",
    "checkpoint.save_every": "save a checkpoint every N steps (0: only at the end)",
    "checkpoint.max_to_keep": "checkpoints kept",
    "checkpoint.async_save": "save in the background while training goes on",
    "checkpoint.allow_change": "allow resuming with a different model / data / batch size",
    "mesh.ici.data": "data-parallel axis size within a slice (-1: fill)",
    "mesh.ici.fsdp": "FSDP axis size within a slice (-1: fill)",
    "mesh.ici.tensor": "tensor-parallel axis size within a slice",
    "mesh.dcn.data": "data-parallel axis size across slices (-1: fill)",
    "mesh.dcn.fsdp": "FSDP axis size across slices",
    "mesh.dcn.tensor": "tensor-parallel axis size across slices",
    "lora.rank": "LoRA rank r: train low-rank adapters on a frozen base (0: off, full training)",
    "lora.alpha": "LoRA scale numerator: the update is (alpha / rank) * x A B",
    "lora.targets": "regex over layer weight paths (layers/q_proj ... layers/down_proj) that get adapters",
    "lora.dropout": "dropout rate on the adapter inputs in training steps (PEFT's lora_dropout), in [0, 1)",
    "lora.base_dtype": "storage of the frozen base: bfloat16 | float32 | int8 | nf4 (int8 / nf4: QLoRA)",
    "export.hf": "export the final policy in Hugging Face format to workdir/export",
    "export.format": "hf: full HF weights (with LoRA: adapters merged in) | merged: the same, LoRA only | "
                     "peft: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), LoRA only",
    "export.dtype": "dtype of the exported weights: float32 | bfloat16",
}


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default (see DOCS for what each means)."""
  c = ml_collections.ConfigDict()
  c.model = dict(preset="llama-tiny", hf_checkpoint=placeholder(str), ref_hf_checkpoint=placeholder(str),
                 dtype="float32", param_dtype="float32", ref_dtype="float32", remat="none", init_seed=0,
                 scan_unroll=1, attention_block=128, attention_impl="auto")
  c.data = dict(train_files=placeholder(str), eval_files=placeholder(str), eval_split=0.1, format="auto",
                tokenizer=placeholder(str), max_length=512, max_prompt_length=256, truncation_mode="keep_end",
                pad_multiple=64, packing=False, pack_batches=placeholder(bool), share_prompt=placeholder(bool), pack_length=0, max_pairs_per_row=0, shuffle=True, seed=0, skip_invalid=False, synthetic_pairs=1024)
  c.dpo = dict(beta=0.1, label_smoothing=0.0, reference_free=False, loss_type="", loss_weights="",
               logp_reduction="sum", simpo_gamma=0.0, rpo_alpha=placeholder(float), discopop_tau=0.05,
               logits_chunk_size=512, precompute_ref_logps=False, f_divergence_type="reverse_kl",
               f_alpha_divergence_coef=0.5, use_weighting=False, ld_alpha=placeholder(float),
               cpo_alpha=placeholder(float), alpha=0.0, desirable_weight=1.0, undesirable_weight=1.0,
               sync_ref_model=False, ref_model_mixup_alpha=0.6, ref_model_sync_steps=512)
  c.optim = dict(name="adamw", learning_rate=1e-6, schedule="cosine", warmup_steps=0, end_lr_fraction=0.0,
                 weight_decay=0.0, grad_clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
  c.train = dict(steps=100, global_batch_size=8, grad_accum_steps=1, log_every=10, eval_every=0,
                 eval_batch_size=8, seed=0, max_nonfinite_steps=10, profile_steps="",
                 lease_timeout_s=120.0, compilation_cache="workdir")
  c.checkpoint = dict(save_every=0, max_to_keep=3, async_save=True, allow_change=False)
  c.mesh = dict(ici=dict(data=1, fsdp=-1, tensor=1), dcn=dict(data=-1, fsdp=1, tensor=1))
  c.lora = dict(rank=0, alpha=16.0, targets=r"layers/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$",
                dropout=0.0, base_dtype="bfloat16")
  c.export = dict(hf=False, dtype="float32", format="hf")
  return c


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(flat_keys(v, key + "."))
    else:
      out.append(key)
  return out


def _choice(c, key: str, options) -> None:
  value = _get(c, key)
  if value not in options:
    raise ConfigError(key, f"must be one of {', '.join(map(str, options))}, got {value!r}")


def _get(c, key: str):
  node = c
  for part in key.split("."):
    node = node[part]
  return node


def _positive(c, key: str, allow_zero: bool = False) -> None:
  value = _get(c, key)
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


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

  ``check_files=False`` skips the checks of data/model/tokenizer paths (for the AOT compile,
  which needs only shapes).
  """
  expected = set(DOCS)
  got = set(flat_keys(c))
  for key in sorted(got - expected):
    raise ConfigError(key, "unknown key")
  for key in sorted(expected - got):
    raise ConfigError(key, "missing")
  _choice(c, "model.dtype", ("float32", "bfloat16"))
  _choice(c, "model.param_dtype", ("float32", "bfloat16"))
  _choice(c, "model.ref_dtype", ("float32", "bfloat16"))
  _choice(c, "model.remat", ("none", "full", "dots_saveable"))
  _choice(c, "model.attention_impl", ("auto", "splash", "xla"))
  from artifex_dpo.models import presets  # light import: no devices

  if not c.model.hf_checkpoint:
    _choice(c, "model.preset", tuple(presets.PRESETS))
  if check_files:
    _check_files(c)
  _choice(c, "data.format", ("auto", "jsonl", "parquet", "array_record"))
  _choice(c, "data.truncation_mode", ("keep_end", "keep_start"))
  for key in ("data.max_length", "data.max_prompt_length", "data.pad_multiple", "data.synthetic_pairs",
              "train.steps", "train.global_batch_size", "train.grad_accum_steps", "train.log_every",
              "train.eval_batch_size", "train.max_nonfinite_steps", "checkpoint.max_to_keep",
              "dpo.logits_chunk_size", "model.scan_unroll"):
    _positive(c, key)
  for key in ("model.attention_block", "data.pack_length", "data.max_pairs_per_row",
              "train.eval_every", "checkpoint.save_every", "train.lease_timeout_s", "optim.warmup_steps",
              "optim.weight_decay",
              "optim.grad_clip_norm", "optim.learning_rate"):
    _positive(c, key, allow_zero=True)
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
  if not 0.0 <= c.data.eval_split < 1.0:
    raise ConfigError("data.eval_split", f"must be in [0, 1), got {c.data.eval_split}")
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
  _choice(c, "optim.name", ("adamw", "adam", "sgd"))
  _choice(c, "optim.schedule", ("cosine", "linear", "constant"))
  if not 0.0 <= c.optim.end_lr_fraction <= 1.0:
    raise ConfigError("optim.end_lr_fraction", f"must be in [0, 1], got {c.optim.end_lr_fraction}")
  _choice(c, "export.dtype", ("float32", "bfloat16"))
  _choice(c, "export.format", ("hf", "merged", "peft"))
  rank = c.lora.rank
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    raise ConfigError("lora.rank", f"must be an int >= 0, got {rank!r}")
  if rank:
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
  for axis in ("data", "fsdp", "tensor"):
    for level in ("ici", "dcn"):
      key = f"mesh.{level}.{axis}"
      value = _get(c, key)
      if not isinstance(value, int) or (value < 1 and value != -1):
        raise ConfigError(key, f"must be a positive size or -1 (fill), got {value!r}")
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
  if dpo_cfg.unpaired:  # KTO in the service: padded batches, live reference (what is not there yet is refused)
    if c.dpo.precompute_ref_logps:
      raise ConfigError("dpo.precompute_ref_logps", "cannot be used with KTO here: its KL rows pair each prompt with "
                                                    "another completion of the same batch, so they change with the "
                                                    "batch order and cannot be scored once per example")
    for key in ("data.packing", "data.pack_batches", "data.skip_invalid"):
      if _get(c, key):
        raise ConfigError(key, f"is not supported with the unpaired loss {c.dpo.loss_type!r} (KTO) yet")
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
  if tok and tok != "byte" and not os.path.exists(tok):
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
  """The library's DPOConfig from the ``dpo.*`` keys."""
  from artifex_dpo.dpo_config import DPOConfig

  return DPOConfig(
      beta=c.dpo.beta,
      label_smoothing=c.dpo.label_smoothing,
      reference_free=c.dpo.reference_free,
      loss_type=c.dpo.loss_type or None,
      loss_weights=c.dpo.loss_weights or None,
      simpo_gamma=c.dpo.simpo_gamma,
      rpo_alpha=c.dpo.rpo_alpha,
      logp_reduction=c.dpo.logp_reduction,
      discopop_tau=c.dpo.discopop_tau,
      logits_chunk_size=c.dpo.logits_chunk_size,
      precompute_ref_logps=c.dpo.precompute_ref_logps,
      f_divergence_type=c.dpo.f_divergence_type,
      f_alpha_divergence_coef=c.dpo.f_alpha_divergence_coef,
      use_weighting=c.dpo.use_weighting,
      ld_alpha=c.dpo.ld_alpha,
      cpo_alpha=c.dpo.cpo_alpha,
      alpha=c.dpo.alpha,
      desirable_weight=c.dpo.desirable_weight,
      undesirable_weight=c.dpo.undesirable_weight,
      sync_ref_model=c.dpo.sync_ref_model,
      ref_model_mixup_alpha=c.dpo.ref_model_mixup_alpha,
      ref_model_sync_steps=c.dpo.ref_model_sync_steps,
  )

