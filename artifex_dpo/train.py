"""The training loop: build -> loop(step, eval, save) -> export.

``run(config, workdir)`` is what ``python -m artifex_dpo.main`` calls on every process. It
returns the exit code (0 finished, 3 diverged, 75 preempted); bad config or data raise
:class:`~artifex_dpo.config.ConfigError` / :class:`~artifex_dpo.data.DataError`, which main turns
into exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from artifex_dpo import checkpoint as ckpt_lib
from artifex_dpo import config as config_lib
from artifex_dpo import losses
from artifex_dpo import memory
from artifex_dpo import metrics as metrics_lib
from artifex_dpo import reference
from artifex_dpo import sharding
from artifex_dpo import signals as signals_lib
from artifex_dpo import state as state_lib
from artifex_dpo import storage
from artifex_dpo.data import DataError, PreferenceDataset, PreferenceLoader, eval_batches, eval_split, load_tokenizer
from artifex_dpo.data import cache as data_cache
from artifex_dpo.data.unpaired_loader import UnpairedDataset, UnpairedLoader, unpaired_eval_batches, unpaired_eval_split
from artifex_dpo.data.synthetic import write_synthetic
from artifex_dpo.models import config_from_hf, export_hf, forward_flops_per_token, get_preset
from artifex_dpo.models import lora as lora_lib
from artifex_dpo.models.attention import resolve_attention_impl
from artifex_dpo.models.hf import clean_stale_exports
from artifex_dpo.models.config import ModelConfig

EXIT_OK, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 3, 75
# Config keys whose change makes a checkpoint unusable (unless checkpoint.allow_change).
_FROZEN_KEYS = ("model.preset", "model.hf_checkpoint", "model.param_dtype", "data.train_files", "data.packing",
                "data.share_prompt", "data.pack_length", "data.max_pairs_per_row",
                "data.tokenizer", "data.max_length", "data.max_prompt_length", "data.truncation_mode",
                "data.seed", "data.shuffle", "data.synthetic_pairs", "data.eval_split",
                "train.global_batch_size", "lora.rank", "lora.alpha", "lora.targets", "lora.base_dtype",
                "dpo.sync_ref_model")


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def build_tokenizer(c: ml_collections.ConfigDict):
  spec = c.data.tokenizer or c.model.hf_checkpoint
  try:
    return load_tokenizer(spec)
  except DataError:
    raise
  except (ValueError, OSError) as e:
    raise config_lib.ConfigError("data.tokenizer", f"{spec}: {e}") from None


def build_datasets(c, tokenizer, workdir: str,
                   id_limit: int | None = None) -> tuple[PreferenceDataset, PreferenceDataset | None]:
  """The training and eval sets (first pass over the data; every process reads the same).

  ``id_limit``: pre-tokenized ids must lie below it (the model's vocabulary; None: the tokenizer's).
  """
  files = c.data.train_files
  if not files:
    files = storage.join(workdir, "synthetic", "train.jsonl")
    if jax.process_index() == 0:  # one writer, then everyone reads (and keys the data cache by) it
      write_synthetic(files, c.data.synthetic_pairs, c.data.seed)
    data_cache.barrier("artifex_synthetic", jax.process_count())
  # Tokenized once into <workdir>/data_cache (split over the processes), then read on demand.
  kwargs = dict(format=None if c.data.format == "auto" else c.data.format, max_length=c.data.max_length,
                max_prompt_length=c.data.max_prompt_length, truncation_mode=c.data.truncation_mode,
                skip_invalid=c.data.skip_invalid, id_limit=id_limit, process_index=jax.process_index(),
                process_count=jax.process_count())
  if config_lib.dpo_config(c).unpaired:  # KTO: labelled completions (paired records are unpaired), not cached
    for key in ("skip_invalid", "id_limit", "process_index", "process_count"):
      kwargs.pop(key)
    train = UnpairedDataset.from_files(files, tokenizer, **kwargs)
    if c.data.eval_files:
      return train, UnpairedDataset.from_files(c.data.eval_files, tokenizer, **kwargs)
    return unpaired_eval_split(train, c.data.eval_split, c.data.seed)
  cache_dir = storage.join(workdir, "data_cache")
  train = data_cache.load_or_tokenize(files, tokenizer, cache_dir, **kwargs)
  evals = data_cache.load_or_tokenize(c.data.eval_files, tokenizer, cache_dir, **kwargs) if c.data.eval_files else None
  # Earlier keys' caches go once every key this run reads is complete (process 0 only; rule in the function).
  data_cache.remove_stale_keys(cache_dir, [d.cache_key for d in (train, evals) if d is not None],
                               process_index=jax.process_index())
  if evals is not None:
    return train, evals
  return eval_split(train, c.data.eval_split, c.data.seed)  # the counters stay with the training part


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


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step (shared by the loop and the benchmarks)."""

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
  train_ref: np.ndarray | None
  eval_ref: np.ndarray | None
  counters: dict[str, int]

  def loader(self, c, start_step: int = 0, num_steps: int | None = None) -> PreferenceLoader | UnpairedLoader:
    if self.dpo_config.unpaired:
      return UnpairedLoader(self.train_ds, c.train.global_batch_size, seed=c.data.seed, shuffle=c.data.shuffle,
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            pad_multiple=c.data.pad_multiple, max_length=c.data.max_length,
                            with_kl="kto" in self.dpo_config.loss_types, start_step=start_step, num_steps=num_steps)
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


def compilation_cache_dir(c, workdir: str) -> str | None:
  """``train.compilation_cache``: 'workdir' -> WORKDIR/jax_cache, 'off' -> None, else that folder.

  The cache holds compiled executables that JAX loads and runs: whoever can write the folder can
  plant code in the run (README, "Preemption and resume").
  """
  value = c.train.compilation_cache
  if value == "off":
    return None
  return storage.join(workdir, "jax_cache") if value == "workdir" else value


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
               train_ds.num_truncated_responses, 100 * train_ds.num_truncated_responses / (2 * n),
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
  if c.dpo.precompute_ref_logps and (ref_state is not None or spec.reference_is_base):
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


def run(c: ml_collections.ConfigDict, workdir: str) -> int:
  """Trains as configured; returns the exit code."""
  is_main = jax.process_index() == 0
  if is_main:  # what a killed export left (the workdir lease rules out a live one)
    for name in clean_stale_exports(storage.join(workdir, "export")):
      logging.warning("removed the stale export folder %s (left by an interrupted export)", storage.join(workdir, name))
  setup = build(c, workdir)
  train_ds, eval_ds, mesh = setup.train_ds, setup.eval_ds, setup.mesh
  dpo_cfg, schedule, spec, state, ref_state = setup.dpo_config, setup.schedule, setup.spec, setup.state, setup.ref_state
  train_ref, eval_ref, counters = setup.train_ref, setup.eval_ref, setup.counters

  # --- Resume ---------------------------------------------------------------------------------
  checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"), max_to_keep=c.checkpoint.max_to_keep,
                                       async_save=c.checkpoint.async_save)
  resolved = json.loads(c.to_json())
  meta = {"config": resolved, "train_fingerprint": train_ds.fingerprint()}
  # LoRA checkpoints hold the adapters and their optimizer state, not the base (rebuilt from its
  # source on every start); the base's fingerprint ties a checkpoint to the base it was trained on.
  saved_part = lora_lib.checkpointed if spec.lora is not None else (lambda s: s)
  if spec.lora is not None:
    meta["base_fingerprint"] = reference.weights_fingerprint(lora_lib.frozen(state))
  start = 0
  abstract, shardings = saved_part(spec.abstract_state), saved_part(spec.shardings)
  if dpo_cfg.sync_ref_model:  # TR-DPO: the reference is training state, saved with the policy
    abstract = nnx.State({"train": abstract, "reference": spec.abstract_ref})
    shardings = nnx.State({"train": shardings, "reference": spec.ref_shardings})
  resumed = checkpointer.restore_latest(abstract, shardings,
                                        check_meta=lambda saved, path: _check_config_change(saved, meta, c, path))
  if resumed is not None:
    latest, restored, saved_meta = resumed
    if dpo_cfg.sync_ref_model:
      restored, ref_state = restored["train"], restored["reference"]
    state = nnx.State.merge(state, restored) if spec.lora is not None else restored
    start = int(saved_meta["step"])
    counters["train/nonfinite_steps"] = int(saved_meta.get("counters", {}).get("train/nonfinite_steps", 0))
    logging.info("resumed from %s/%d", checkpointer.directory, latest)

  # --- Compile --------------------------------------------------------------------------------
  loader = setup.loader(c, start_step=start, num_steps=c.train.steps)
  if c.data.packing:
    logging.info("packing: %d pairs in %d rows of %d tokens (%.1f%% real tokens)", len(train_ds),
                 loader.plan.num_rows, loader.plan.row_length, 100 * loader.plan.fill)
  jit_cache: dict[Any, Any] = {}

  def compiled(kind, batch, *extra):
    """One compiled step per batch shape (bucketed lengths give a few); ``extra``: the eval normalizers."""
    key = (kind, jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch)))
    if key not in jit_cache:
      if kind == "train":
        fn = state_lib.jit_train_step(spec, dpo_cfg, batch, grad_accum_steps=c.train.grad_accum_steps)
      else:
        fn = state_lib.jit_eval_step(spec, dpo_cfg, batch)
      # Compiled here, not on first call, so that the compiler's freed heap is returned before the
      # step allocates its temporaries (else it adds to the peak resident set).
      jit_cache[key] = memory.compile_now(fn, state, ref_state, batch, *extra)
    return jit_cache[key]

  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  peak, peak_source = metrics_lib.device_peak_flops()
  logging.info("MFU peak: %.3g FLOP/s per device (%s), %d devices", peak, peak_source, jax.device_count())

  def evaluate(step: int) -> None:
    if eval_ds is None:
      return
    # Every eval batch is normalised by the counts of the whole eval set (pairs, scored tokens of
    # each side), so each batch's metrics are its share of the set's and the shares add up; the
    # filler pairs of a last, partial batch count nowhere (pair_mask).
    normalizers = None if dpo_cfg.unpaired else eval_normalizers(eval_ds)
    sums: dict[str, float] = {}
    if dpo_cfg.unpaired:  # KTO: each batch's means, weighted by its share of the examples
      batches = unpaired_eval_batches(eval_ds, c.train.eval_batch_size, jax.process_index(), jax.process_count(),
                                      c.data.pad_multiple, c.data.max_length, "kto" in dpo_cfg.loss_types)
      normalizers = losses.Normalizers(*(np.float32(1.0),) * 3)  # not read by the unpaired losses
    else:
      batches = eval_batches(eval_ds, c.train.eval_batch_size, jax.process_index(), jax.process_count(),
                             c.data.pad_multiple, c.data.max_length)
    for local in batches:
      share = local["global_num_pairs"] / len(eval_ds) if dpo_cfg.unpaired else 1.0
      batch = state_lib.global_batch(local, mesh, with_pair_mask=True, reference_table=eval_ref)
      m = jax.device_get(compiled("eval", batch, normalizers)(state, ref_state, batch, normalizers))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v) * (share if k != "tokens" else 1.0)
    row = {"step": step, "time": time.time()}
    row.update({f"eval/{k}": v for k, v in sums.items()})
    writer.write(row)
    if is_main:
      logging.info("eval at step %d: loss %.4f accuracy %.3f margin %.4f", step, row["eval/loss"],
                   row.get("eval/rewards/accuracies", float("nan")), row["eval/rewards/margins"])

  def save(step: int) -> None:
    # A collective: every process calls it for the same step (the decision depends only on the
    # step number and on the preemption sync point, which all processes agree on).
    saved = nnx.State({"train": saved_part(state), "reference": ref_state}) if dpo_cfg.sync_ref_model else saved_part(state)
    checkpointer.save(step, saved, dict(meta, step=step, counters=counters))

  # --- Loop -----------------------------------------------------------------------------------
  # SIGTERM / SIGINT: main installed the handlers at its first line; a library call gets them here.
  signals, own_signals = signals_lib.active(), False
  if signals is None:
    signals, own_signals = signals_lib.Signals(), True
    try:
      signals.install()
    except ValueError:  # not the main thread: no handlers
      own_signals = False
  nonfinite_run, exit_code = 0, EXIT_OK
  last_log_time, interval_tokens, interval_flops, interval_steps = time.time(), 0.0, 0.0, 0
  loop_start, steps_done = time.time(), 0
  pending = None  # the previous step's metrics, fetched one step late to keep the device busy
  profile = [int(x) for x in c.train.profile_steps.split(",")] if c.train.profile_steps else None

  def finish_step(step, m, tokens, flops, pairs) -> bool:
    """Host-side bookkeeping of a finished step; False when the run must stop (diverged)."""
    nonlocal nonfinite_run, last_log_time, interval_tokens, interval_flops, interval_steps
    m = jax.device_get(m)
    counters["train/nonfinite_steps"] += int(m["nonfinite"])
    nonfinite_run = nonfinite_run + 1 if m["nonfinite"] else 0
    interval_tokens += tokens
    interval_flops += flops
    interval_steps += 1
    if step % c.train.log_every == 0 or step == c.train.steps or nonfinite_run:
      now = time.time()
      elapsed = max(now - last_log_time, 1e-9)
      row = {"step": step, "time": now, "learning_rate": float(schedule(step - 1)),
             "tokens_per_s": interval_tokens / elapsed, "step_s": elapsed / interval_steps,
             "mfu": interval_flops / elapsed / (peak * jax.device_count())}
      row.update({k: float(v) for k, v in m.items()})
      row["tokens"], row["pairs"] = tokens, pairs
      row.update(counters)
      writer.write(row)
      eta = (c.train.steps - step) * (now - loop_start) / max(steps_done, 1)
      writer.progress(step, c.train.steps, row, eta)
      last_log_time, interval_tokens, interval_flops, interval_steps = now, 0.0, 0.0, 0
    if nonfinite_run >= c.train.max_nonfinite_steps:
      logging.error("stopping: %d non-finite steps in a row (loss or gradients NaN/inf); the last good "
                    "state is checkpointed", nonfinite_run)
      return False
    return True

  step, pairs_read = start, 0
  sync_reference = None
  try:
    with mesh:
      for step_index, local in loader:
        step = step_index + 1  # steps count optimizer updates from 1
        if profile and step == profile[0]:
          profile_dir = _profile_dir(workdir)
          jax.profiler.start_trace(profile_dir)
        batch = state_lib.global_batch(local, mesh, with_pair_mask=False, reference_table=train_ref)
        pairs_read += int(np.sum(local["pair_indices"] >= 0))
        state, m = compiled("train", batch)(state, ref_state, batch)
        signals.unsaved = True  # from now on a signal saves first (at the next step boundary)
        if dpo_cfg.sync_ref_model and step % dpo_cfg.ref_model_sync_steps == 0:
          if sync_reference is None:
            sync_reference = state_lib.jit_sync_reference(spec, float(dpo_cfg.ref_model_mixup_alpha))
          ref_state = sync_reference(ref_state, state)  # TR-DPO, after the step (as TRL's callback)
        tokens, pairs, flops = setup.step_flops(local, c)
        steps_done += 1
        # The previous step's metrics are fetched only now, so the device always has work queued.
        if pending is not None and not finish_step(*pending):
          exit_code = EXIT_DIVERGED
          break
        pending = (step, m, tokens, flops, pairs)
        if profile and step == profile[1]:
          jax.profiler.stop_trace()
          _upload_profile(profile_dir, workdir)
        preempted = signals.reached(step)  # every process gets the same answer at the same step
        do_eval = bool(c.train.eval_every) and step % c.train.eval_every == 0 and step < c.train.steps
        do_save = preempted or (bool(c.checkpoint.save_every) and step % c.checkpoint.save_every == 0
                                and step < c.train.steps)
        if do_eval or do_save:
          # Settle this step's bookkeeping first, so what is saved (counters) is up to date.
          ok, pending = finish_step(*pending), None
          if not ok:
            exit_code = EXIT_DIVERGED
            break
        if do_eval:
          evaluate(step)
        if do_save:
          save(step)
        if preempted:
          exit_code = signals.exit_code()
          logging.warning("%s: saved step %d; exiting with code %d", "interrupted (Ctrl-C)"
                          if exit_code == signals_lib.EXIT_INTERRUPTED else "preempted (SIGTERM)", step, exit_code)
          break
      if pending is not None and exit_code != EXIT_DIVERGED and not finish_step(*pending):
        exit_code = EXIT_DIVERGED
      if exit_code == EXIT_OK:
        evaluate(step)
      if checkpointer.latest_step() != step:
        save(step)
      checkpointer.wait()
      signals.unsaved = False  # all steps are committed: a signal from here on exits at once
      if exit_code == EXIT_OK and signals.requested:  # a signal during the final eval or save
        exit_code = signals.exit_code()
        logging.warning("stopped by a signal: saved step %d; exiting with code %d", step, exit_code)
      if exit_code == EXIT_OK and c.export.hf:
        model = nnx.merge(spec.graphdef, state)[0]
        tok_dir = _tokenizer_dir(c)
        out_dir = storage.join(workdir, "export")
        if spec.lora is not None and c.export.format == "peft":
          lora_lib.export_peft(model, out_dir, dtype=c.export.dtype, base_model_name_or_path=c.model.hf_checkpoint,
                               info={"step": step, "checkpoint": f"{checkpointer.directory}/{step}"})
        else:
          if spec.lora is not None:
            model = lora_lib.merged_model(model)
          export_hf(model, out_dir, dtype=c.export.dtype, tokenizer_dir=tok_dir,
                    info={"step": step, "checkpoint": f"{checkpointer.directory}/{step}"})
        logging.info("exported the policy at step %d to %s", step, out_dir)
      logging.info("process %d of %d read %d training pairs", jax.process_index(), jax.process_count(), pairs_read)
  finally:
    if own_signals:
      signals.uninstall()
    try:
      checkpointer.close()
    finally:
      writer.close()
  return exit_code


def eval_normalizers(dataset: PreferenceDataset) -> losses.Normalizers:
  """The denominators of the eval metrics: the set's pairs and scored chosen / rejected tokens.

  Every process holds the whole eval set, so each computes the same numbers without a collective.
  """
  scored = dataset.scored_lengths.sum(axis=0)
  # ORPO's NLL: every token of prompt + chosen but the first (each is predicted from the one before).
  sequence = np.maximum(dataset.offsets[:, 2] - dataset.offsets[:, 0] - 1, 0).sum()
  return losses.Normalizers(*(np.float32(x) for x in (len(dataset), scored[0], scored[1], sequence)))


def _tokenizer_dir(c) -> str | None:
  spec = c.data.tokenizer or c.model.hf_checkpoint
  if not spec or spec == "byte":
    return None
  return spec if storage.isdir(spec) else storage.dirname(spec)


def _profile_dir(workdir: str) -> str:
  """Where the profiler writes: the workdir's ``profile/``, or a local folder uploaded after."""
  if not storage.is_remote(workdir):
    return os.path.join(workdir, "profile")
  import tempfile

  return tempfile.mkdtemp(prefix="artifex-profile-")


def _upload_profile(local: str, workdir: str) -> None:
  """Copies a trace written locally (for a gs:// workdir) to ``profile/`` in the workdir."""
  if not storage.is_remote(workdir):
    return
  for root, _, names in os.walk(local):
    for name in names:
      src = os.path.join(root, name)
      storage.copy(src, storage.join(workdir, "profile", *os.path.relpath(src, local).split(os.sep)))


def _check_config_change(saved: dict, current: dict, c, path: str) -> None:
  if ("base_fingerprint" in current) != ("base_fingerprint" in saved):
    raise config_lib.ConfigError("lora.rank", f"checkpoint {path} is of {'full' if 'base_fingerprint' in current else 'LoRA'}"
                                              " training; this run is not")
  if "base_fingerprint" in current and saved["base_fingerprint"] != current["base_fingerprint"]:
    # Not overridable: adapters trained on other base weights are meaningless on these.
    raise config_lib.ConfigError("model.hf_checkpoint", f"the base weights differ from those checkpoint {path} was "
                                                        "trained on (LoRA adapters only fit their own base)")
  if c.checkpoint.allow_change:
    return
  for key in _FROZEN_KEYS:
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
