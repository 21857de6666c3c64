"""Building a run: tokenizer, data, mesh, model, states, optimizer, reference log-probs, steps, resume.

Everything a run holds before its first step is built here, in one place, and used by the
training loop (:mod:`artifex_dpo.train`), the ahead-of-time compile (:mod:`artifex_dpo.aot`) and
the benchmarks:

- :func:`build` -> :class:`Setup`: tokenizer, data sets, mesh, model config, the sharded policy +
  optimizer state, the reference (or its precomputed log-probs), the loader and FLOP counts;
- :func:`resume` -> :class:`Checkpoints`: the run's checkpoints, the restored state and step;
- :class:`CompiledSteps`: the compiled train / eval steps, one per batch shape.

Bad config or data raise :class:`~artifex_dpo.config.ConfigError` /
:class:`~artifex_dpo.data.DataError` (exit code 2 in main).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from artifex_dpo import checkpoint as ckpt_lib
from artifex_dpo import config as config_lib
from artifex_dpo import memory
from artifex_dpo import reference
from artifex_dpo import sharding
from artifex_dpo import state as state_lib
from artifex_dpo import storage
from artifex_dpo.data import DataError, PreferenceDataset, PreferenceLoader, build_datasets, load_tokenizer
from artifex_dpo.data.unpaired_loader import UnpairedLoader
from artifex_dpo.models import config_from_hf, forward_flops_per_token, get_preset
from artifex_dpo.models import lora as lora_lib
from artifex_dpo.models.attention import resolve_attention_impl
from artifex_dpo.models.config import ModelConfig

# Config keys whose change makes a checkpoint unusable (unless checkpoint.allow_change).
FROZEN_KEYS = ("model.preset", "model.hf_checkpoint", "model.param_dtype", "data.train_files", "data.packing",
               "data.share_prompt", "data.pack_length", "data.max_pairs_per_row",
               "data.tokenizer", "data.max_length", "data.max_prompt_length", "data.truncation_mode",
               "data.seed", "data.shuffle", "data.synthetic_pairs", "data.eval_split",
               "train.global_batch_size", "lora.rank", "lora.alpha", "lora.targets", "lora.base_dtype",
               "dpo.sync_ref_model")


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def build_tokenizer(c: ml_collections.ConfigDict):
  """The configured tokenizer (``data.tokenizer``, else the HF checkpoint's); a bad one is a config error."""
  spec = c.data.tokenizer or c.model.hf_checkpoint
  try:
    return load_tokenizer(spec)
  except DataError:
    raise
  except (ValueError, OSError) as e:
    raise config_lib.ConfigError("data.tokenizer", f"{spec}: {e}") from None




def build_model_config(c, tokenizer=None, platform: str | None = None) -> ModelConfig:
  """The model's shape and options; ``llama-tiny`` takes its vocabulary from the tokenizer (if given).

  ``platform`` (default: JAX's backend) decides ``model.attention_impl=auto``: the splash kernel on
  TPU, the XLA attention elsewhere; the choice is logged.
  """
  kw = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat)
  platform = platform or jax.default_backend()
  try:
    impl = resolve_attention_impl(c.model.attention_impl, platform)
  except ValueError as e:
    raise config_lib.ConfigError("model.attention_impl", str(e)) from None
  logging.info("attention: %s (model.attention_impl=%s, backend %s)", impl, c.model.attention_impl, platform)
  runtime = dict(scan_unroll=c.model.scan_unroll, attention_block=c.model.attention_block, attention_impl=impl)
  if c.model.hf_checkpoint:
    mcfg = dataclasses.replace(config_from_hf(c.model.hf_checkpoint, **kw), **runtime)
  elif c.model.preset == "llama-tiny" and tokenizer is not None:  # from scratch: the tokenizer's vocabulary
    mcfg = get_preset("llama-tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                      bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id, **runtime, **kw)
  else:
    mcfg = get_preset(c.model.preset, **runtime, **kw)
  if tokenizer is not None and tokenizer.vocab_size > mcfg.vocab_size:
    raise config_lib.ConfigError("data.tokenizer", f"has {tokenizer.vocab_size} ids, more than the model's "
                                                   f"vocabulary of {mcfg.vocab_size}")
  return mcfg


def build_optimizer(c) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (default) with warmup + cosine/linear decay, clipping, decay masked off norms/biases."""
  o = c.optim
  steps = c.train.steps
  end = o.learning_rate * o.end_lr_fraction
  decay_steps = max(1, steps - o.warmup_steps)
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(o.learning_rate, decay_steps, alpha=o.end_lr_fraction)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.learning_rate, end, decay_steps)
  else:
    after = optax.constant_schedule(o.learning_rate)
  schedule = after
  if o.warmup_steps:
    schedule = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), after],
                                    [o.warmup_steps])
  # Weight decay on the weight matrices only (every one has an "embed" axis) and on LoRA factors;
  # norms and the q/k/v biases are excluded.
  decay_mask = lambda params: jax.tree.map(lambda p: bool({"embed", "lora_rank"} & set(_axes(p))), params,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  if o.name == "adamw":
    core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
  elif o.name == "adam":
    core = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps)
  else:
    core = optax.sgd(schedule)
  parts = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm else []
  return optax.chain(*parts, core), schedule


def _axes(v) -> tuple:
  return tuple(v.get_metadata().get("logical_axes") or ()) if isinstance(v, nnx.Variable) else ()


def compilation_cache_dir(c, workdir: str) -> str | None:
  """``train.compilation_cache``: 'workdir' -> WORKDIR/jax_cache, 'off' -> None, else that folder.

  The cache holds compiled executables that JAX loads and runs: whoever can write the folder can
  plant code in the run (README, "Preemption and resume").
  """
  value = c.train.compilation_cache
  if value == "off":
    return None
  return storage.join(workdir, "jax_cache") if value == "workdir" else value


# ------------------------------------------------------------------------------------------
# The run's setup
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step (shared by the loop, aot and the benchmarks)."""

  tokenizer: Any
  train_ds: PreferenceDataset
  eval_ds: PreferenceDataset | None
  mesh: Any
  model_config: Any
  dpo_config: Any
  schedule: Any
  spec: state_lib.StateSpec
  state: Any
  ref_state: Any
  train_ref: Any  # np.ndarray [N, 2]; KTO: data.unpaired_loader.UnpairedReference; None: live reference
  eval_ref: Any
  counters: dict[str, int]

  def loader(self, c, start_step: int = 0, num_steps: int | None = None) -> PreferenceLoader | UnpairedLoader:
    """This process's share of the training batches from ``start_step`` (the order is a function of the step)."""
    if self.dpo_config.unpaired:
      return UnpairedLoader(self.train_ds, c.train.global_batch_size, seed=c.data.seed, shuffle=c.data.shuffle,
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            pad_multiple=c.data.pad_multiple, max_length=c.data.max_length,
                            with_kl="kto" in self.dpo_config.loss_types, start_step=start_step, num_steps=num_steps,
                            pack_batches=c.data.pack_batches, row_length=c.data.pack_length or None,
                            max_pairs_per_row=c.data.max_pairs_per_row or None, share_prompt=c.data.share_prompt,
                            row_multiple=max(1, sharding.batch_parallelism(self.mesh) // jax.process_count()),
                            reference=self.train_ref, packing=c.data.packing)
    return PreferenceLoader(
        self.train_ds, c.train.global_batch_size, seed=c.data.seed, shuffle=c.data.shuffle,
        process_index=jax.process_index(), process_count=jax.process_count(), pad_multiple=c.data.pad_multiple,
        max_length=c.data.max_length, start_step=start_step, num_steps=num_steps, packing=c.data.packing,
        row_length=c.data.pack_length or None, max_pairs_per_row=c.data.max_pairs_per_row or None,
        pack_batches=c.data.pack_batches, share_prompt=c.data.share_prompt,
        # Per-batch packed rows: a multiple of grad_accum_steps x the batch shards, so that each
        # microbatch's rows divide over the devices.
        row_multiple=max(1, sharding.batch_parallelism(self.mesh) // jax.process_count()) * c.train.grad_accum_steps)

  def step_flops(self, local: dict[str, Any], c) -> tuple[float, float, float]:
    """``(tokens, pairs, model FLOPs)`` of a loaded batch (policy fwd+bwd, reference fwd if in memory).

    ``tokens`` counts both sequences of every pair in full (padding never); the FLOPs count the
    tokens the model actually runs, which are fewer with ``data.share_prompt``.
    """
    tokens = float(local["global_num_tokens"])
    computed = float(local.get("global_computed_tokens", tokens))
    pairs = float(local.get("global_num_pairs", c.train.global_batch_size))
    # Attention FLOPs follow the real sequence lengths, not the padded or packed row length.
    mean_len = max(1, round(tokens / (2 * pairs)))
    ref_forward = 1.0 if self.ref_state is not None or self.spec.reference_is_base else 0.0
    # LoRA's backward computes no gradient of the (frozen) base weights: forward + input gradients.
    policy = 2.0 if self.spec.lora is not None else 3.0
    return tokens, pairs, computed * forward_flops_per_token(self.model_config, mean_len) * (policy + ref_forward)


def build(c: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Data, mesh, sharded policy/optimizer/reference (and the reference pass when precomputing)."""
  storage.makedirs(workdir)
  cache = compilation_cache_dir(c, workdir)
  if cache:  # JAX's persistent cache reads and writes gs:// itself (through etils.epath)
    jax.config.update("jax_compilation_cache_dir", cache)

  # --- Data ---------------------------------------------------------------------------------
  tokenizer = build_tokenizer(c)
  mcfg = build_model_config(c, tokenizer)
  # Pre-tokenized ids are checked against the model's vocabulary (the tokenizer plays no part).
  train_ds, eval_ds = build_datasets(c, tokenizer, workdir, id_limit=mcfg.vocab_size)
  logging.info("data: %d train pairs, %d eval pairs, %d invalid skipped, %d dropped by truncation, %d dropped "
               "with identical chosen and rejected", len(train_ds), len(eval_ds) if eval_ds else 0,
               train_ds.num_skipped_invalid, train_ds.num_dropped_truncated, train_ds.num_identical_pairs)
  n = max(1, len(train_ds) + (len(eval_ds) if eval_ds is not None and not c.data.eval_files else 0))
  logging.info("truncation: %d prompts (%.1f%% of pairs) cut to data.max_prompt_length=%d, %d responses "
               "(%.1f%% of responses) cut to fit data.max_length=%d (a cut response has no EOS)",
               train_ds.num_truncated_prompts, 100 * train_ds.num_truncated_prompts / n, c.data.max_prompt_length,
               train_ds.num_truncated_responses,
               100 * train_ds.num_truncated_responses / (train_ds.RESPONSES_PER_EXAMPLE * n),
               c.data.max_length)
  counters = {"data/skipped_invalid": train_ds.num_skipped_invalid,
              "data/dropped_truncated": train_ds.num_dropped_truncated,
              "data/identical_pairs": train_ds.num_identical_pairs,
              "data/truncated_prompts": train_ds.num_truncated_prompts,
              "data/truncated_responses": train_ds.num_truncated_responses, "train/nonfinite_steps": 0}

  # --- Mesh, model, optimizer, reference ----------------------------------------------------
  try:
    mesh = sharding.make_mesh(c.mesh)
  except sharding.MeshError as e:
    raise config_lib.ConfigError("mesh", str(e)) from None
  parallel = sharding.batch_parallelism(mesh)
  for key, size in (("train.global_batch_size", c.train.global_batch_size // c.train.grad_accum_steps),
                    ("train.eval_batch_size", c.train.eval_batch_size)):
    if size % parallel or size % jax.process_count():
      raise config_lib.ConfigError(key, f"{size} pairs per (micro)batch do not divide over {parallel} "
                                        f"batch shards (mesh data x fsdp) and {jax.process_count()} processes")
  dpo_cfg = config_lib.dpo_config(c)
  tx, schedule = build_optimizer(c)
  lora = config_lib.lora_config(c)
  spec = state_lib.build_state_spec(mcfg, tx, mesh, init_seed=c.model.init_seed,
                                    ref_dtype=c.model.ref_dtype if dpo_cfg.needs_reference else None,
                                    lora=lora, reference_is_base=not c.model.ref_hf_checkpoint)
  try:
    state = state_lib.init_state(spec, c.model.hf_checkpoint)
  except ValueError as e:  # a bad model folder: missing or mismatched tensors, an index pointing elsewhere
    raise config_lib.ConfigError("model.hf_checkpoint", str(e).splitlines()[0]) from None
  # The reference is rebuilt from its source on every start (never saved): before any restore.
  try:
    ref_state = state_lib.init_reference(spec, state, c.model.ref_hf_checkpoint)
  except ValueError as e:
    raise config_lib.ConfigError("model.ref_hf_checkpoint", str(e).splitlines()[0]) from None
  train_ref = eval_ref = None
  if c.dpo.precompute_ref_logps and dpo_cfg.unpaired and (ref_state is not None or spec.reference_is_base):
    # KTO: completions per example, KL rows per (step, position) of the order this run uses.
    kw = dict(with_kl="kto" in dpo_cfg.loss_types, batch_size=c.train.eval_batch_size,
              pad_multiple=c.data.pad_multiple, max_length=c.data.max_length, chunk_size=c.dpo.logits_chunk_size)
    scorer = state if spec.reference_is_base else ref_state
    order = {"steps": c.train.steps, "seed": c.data.seed, "shuffle": c.data.shuffle,
             "global_batch_size": c.train.global_batch_size}
    if c.data.packing and kw["with_kl"]:  # the plan fixes each example's KL partner (a rotation within its row)
      order = {"partners": UnpairedLoader(train_ds, c.train.global_batch_size, seed=c.data.seed,
                                          shuffle=c.data.shuffle, process_index=0, process_count=1,
                                          pad_multiple=c.data.pad_multiple, max_length=c.data.max_length,
                                          with_kl=True, packing=True, row_length=c.data.pack_length or None,
                                          max_pairs_per_row=c.data.max_pairs_per_row or None,
                                          share_prompt=c.data.share_prompt).kl_partners}
    train_ref = reference.load_or_compute_unpaired(workdir, "train", spec, scorer, train_ds, kl_order=order, **kw)
    eval_ref = reference.load_or_compute_unpaired(workdir, "eval", spec, scorer, eval_ds, **kw,
                                                  kl_order={"eval_batch_size": c.train.eval_batch_size}) \
        if eval_ds else None
    spec = dataclasses.replace(spec, ref_graphdef=None, abstract_ref=None, ref_shardings=None)
    ref_state = None
  elif c.dpo.precompute_ref_logps and (ref_state is not None or spec.reference_is_base):
    kw = dict(batch_size=c.train.eval_batch_size, pad_multiple=c.data.pad_multiple, max_length=c.data.max_length,
              chunk_size=c.dpo.logits_chunk_size, ld_alpha=c.dpo.ld_alpha)
    scorer = state if spec.reference_is_base else ref_state  # LoRA: the policy's base, adapters off
    train_ref = reference.load_or_compute(workdir, "train", spec, scorer, train_ds, **kw)
    eval_ref = reference.load_or_compute(workdir, "eval", spec, scorer, eval_ds, **kw) if eval_ds else None
    # From here on no reference model is held in memory and the step runs no reference forward.
    spec = dataclasses.replace(spec, ref_graphdef=None, abstract_ref=None, ref_shardings=None)
    ref_state = None
  return Setup(tokenizer, train_ds, eval_ds, mesh, mcfg, dpo_cfg, schedule, spec, state, ref_state, train_ref,
               eval_ref, counters)


# ------------------------------------------------------------------------------------------
# Checkpoints and resume
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoints:
  """The run's checkpoints: what a save holds, and the step the run resumed from (0: a fresh start).

  LoRA checkpoints hold the adapters and their optimizer state, not the base (rebuilt from its
  source on every start); TR-DPO's hold the mixed reference beside the policy.
  """

  checkpointer: ckpt_lib.Checkpointer
  meta: dict[str, Any]
  saved_part: Callable[[Any], Any]
  with_reference: bool
  start_step: int = 0

  def save(self, step: int, state: Any, ref_state: Any, counters: dict[str, int]) -> None:
    """Starts saving ``step`` (in the background when async).

    A collective: every process must call it for the same step (the caller's decision may depend
    only on the step number and on the preemption sync point, which all processes agree on).
    """
    saved = self.saved_part(state)
    if self.with_reference:
      saved = nnx.State({"train": saved, "reference": ref_state})
    self.checkpointer.save(step, saved, dict(self.meta, step=step, counters=counters))


def resume(c: ml_collections.ConfigDict, workdir: str, setup: Setup) -> Checkpoints:
  """Opens ``WORKDIR/checkpoints`` and restores the newest usable checkpoint into ``setup``.

  ``setup.state`` (and TR-DPO's ``setup.ref_state``) and the non-finite counter are replaced by the
  restored ones. A checkpoint of another model, data or batch size is refused (ConfigError naming the key).
  """
  spec, dpo_cfg = setup.spec, setup.dpo_config
  checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.max_to_keep,
                                       async_save=c.checkpoint.async_save)
  meta = {"config": json.loads(c.to_json()), "train_fingerprint": setup.train_ds.fingerprint()}
  saved_part = lora_lib.checkpointed if spec.lora is not None else (lambda s: s)
  if spec.lora is not None:  # ties a checkpoint to the base it was trained on
    meta["base_fingerprint"] = reference.weights_fingerprint(lora_lib.frozen(setup.state))
  checkpoints = Checkpoints(checkpointer, meta, saved_part, with_reference=dpo_cfg.sync_ref_model)
  abstract, shardings = saved_part(spec.abstract_state), saved_part(spec.shardings)
  if dpo_cfg.sync_ref_model:  # TR-DPO: the reference is training state, saved with the policy
    abstract = nnx.State({"train": abstract, "reference": spec.abstract_ref})
    shardings = nnx.State({"train": shardings, "reference": spec.ref_shardings})
  resumed = checkpointer.restore_latest(abstract, shardings,
                                        check_meta=lambda saved, path: check_config_change(saved, meta, c, path))
  if resumed is not None:
    latest, restored, saved_meta = resumed
    if dpo_cfg.sync_ref_model:
      restored, setup.ref_state = restored["train"], restored["reference"]
    setup.state = nnx.State.merge(setup.state, restored) if spec.lora is not None else restored
    checkpoints.start_step = int(saved_meta["step"])
    setup.counters["train/nonfinite_steps"] = int(saved_meta.get("counters", {}).get("train/nonfinite_steps", 0))
    logging.info("resumed from %s/%d", checkpointer.directory, latest)
  return checkpoints


def check_config_change(saved: dict, current: dict, c, path: str) -> None:
  """Refuses a checkpoint ``saved`` whose model, data or batch differ from this run's (ConfigError naming the key)."""
  if ("base_fingerprint" in current) != ("base_fingerprint" in saved):
    raise config_lib.ConfigError("lora.rank", f"checkpoint {path} is of {'full' if 'base_fingerprint' in current else 'LoRA'}"
                                              " training; this run is not")
  if "base_fingerprint" in current and saved["base_fingerprint"] != current["base_fingerprint"]:
    # Not overridable: adapters trained on other base weights are meaningless on these.
    raise config_lib.ConfigError("model.hf_checkpoint", f"the base weights differ from those checkpoint {path} was "
                                                        "trained on (LoRA adapters only fit their own base)")
  if c.checkpoint.allow_change:
    return
  for key in FROZEN_KEYS:
    if key == "data.share_prompt" and not c.data.packing:
      continue  # without a data-set packing plan it changes the layout of a step, not its pairs
    old, new = _lookup(saved.get("config", {}), key), _lookup(current["config"], key)
    if old is _MISSING:
      continue  # a key newer than the checkpoint
    if old != new:
      raise config_lib.ConfigError(key, f"is {new!r} but the checkpoint {path} was written with {old!r} (set "
                                        "checkpoint.allow_change=True to resume anyway)")
  if saved.get("train_fingerprint") != current["train_fingerprint"]:
    raise config_lib.ConfigError("data.train_files", f"the training data differ from those of checkpoint {path} "
                                                     "(set checkpoint.allow_change=True to resume anyway)")


_MISSING = object()


def _lookup(d: dict, key: str):
  for part in key.split("."):
    if not isinstance(d, dict) or part not in d:
      return _MISSING
    d = d[part]
  return d


# ------------------------------------------------------------------------------------------
# Compiled steps
# ------------------------------------------------------------------------------------------


class CompiledSteps:
  """The run's compiled steps: train and eval, one executable per batch shape (bucketed lengths give a few).

  Each is compiled when a new shape first comes, not on its first call, so that the compiler's
  freed heap is returned before the step allocates its temporaries (else it adds to the peak
  resident set).
  """

  def __init__(self, setup: Setup, grad_accum_steps: int):
    self._spec, self._dpo_config, self._grad_accum_steps = setup.spec, setup.dpo_config, grad_accum_steps
    self._compiled: dict[Any, Any] = {}
    self._sync_reference = None  # jitted at the first sync

  def train(self, state, ref_state, batch) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer update: ``(new state, metrics)``; ``state``'s buffers are donated."""
    return self._get("train", batch, state, ref_state)(state, ref_state, batch)

  def eval(self, state, ref_state, batch, normalizers) -> dict[str, jax.Array]:
    """The metrics of one eval batch, as its share of the eval set's (``normalizers``)."""
    return self._get("eval", batch, state, ref_state, normalizers)(state, ref_state, batch, normalizers)

  def sync_reference(self, ref_state, state):
    """TR-DPO: the policy mixed into the reference by ``dpo.ref_model_mixup_alpha`` (``ref_state`` is donated)."""
    if self._sync_reference is None:
      self._sync_reference = state_lib.jit_sync_reference(self._spec, float(self._dpo_config.ref_model_mixup_alpha))
    return self._sync_reference(ref_state, state)

  def _get(self, kind: str, batch, state, ref_state, *extra):
    key = (kind, jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
    if key not in self._compiled:
      if kind == "train":
        fn = state_lib.jit_train_step(self._spec, self._dpo_config, batch, grad_accum_steps=self._grad_accum_steps)
      else:
        fn = state_lib.jit_eval_step(self._spec, self._dpo_config, batch)
      self._compiled[key] = memory.compile_now(fn, state, ref_state, batch, *extra)
    return self._compiled[key]
