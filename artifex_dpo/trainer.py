"""``DPOTrainer``: the seed-compatible API over one pure, jit-compiled DPO step.

The step is a pure function of ``(state, ref_state, batch)`` built by :func:`make_train_step`;
the trainer splits its NNX objects into graph definitions and state once, calls the compiled
step, and writes the new state back. The training service calls the same step function with
explicit shardings, so there is one implementation of the DPO math.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from artifex_dpo import losses
from artifex_dpo.dpo_config import DPOConfig
from artifex_dpo.types import (GeneratedSequenceBatch, PackedPreferenceBatch, PackedUnpairedBatch, PreferenceBatch,
                                UnpairedBatch)

Metrics = dict[str, jax.Array]
# reference_model / ref_graphdef value meaning "the policy's frozen base, adapters off" (LoRA).
BASE_REFERENCE = "base"


def _is_base(ref: Any) -> bool:
  return isinstance(ref, str) and ref == BASE_REFERENCE


def _reference(ref_graphdef: Any, ref_state: Any, policy: Any) -> Any:
  """The reference model of a step: None, the policy's base view (LoRA), or the merged reference."""
  if ref_graphdef is None:
    return None
  if _is_base(ref_graphdef):
    return policy.base_view()
  return nnx.merge(ref_graphdef, ref_state)


# --------------------------------------------------------------------------------------------
# Model forward -> per-token log-probs
# --------------------------------------------------------------------------------------------


def supports_chunked_logits(model: Any) -> bool:
  """Models exposing ``hidden_states`` and ``unembedding`` get the chunked log-softmax."""
  return callable(getattr(model, "hidden_states", None)) and callable(getattr(model, "unembedding", None))


def accepts_segment_ids(model: Any) -> bool:
  """Whether ``model(tokens, segment_ids=..., positions=...)`` is supported."""
  if supports_chunked_logits(model):
    return True
  try:
    params = inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    return False
  return "segment_ids" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def accepts_prefix_ids(model: Any) -> bool:
  """Whether the model's forward takes ``prefix_ids`` (needed by shared-prompt packed rows)."""
  fn = model.hidden_states if supports_chunked_logits(model) else getattr(model, "__call__", None)
  try:
    return "prefix_ids" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def token_log_probs(
    model: Any,
    tokens: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array | None,
    chunk_size: int,
    prefix_ids: jax.Array | None = None,
    with_log_sum_sq: bool = False,
) -> tuple[jax.Array, ...]:
  """Per-token float32 log-probs and mean logits ``[B, T]`` of ``tokens`` under ``model``.

  Models with ``hidden_states``/``unembedding`` never build ``[B, T, V]`` float32 logits; other
  models are called as ``model(tokens)`` (plus ``segment_ids``/``positions`` when they accept
  them, and ``prefix_ids`` for shared-prompt rows) and must return logits ``[B, T, V]``.
  ``with_log_sum_sq`` adds WPO's per-token ``log sum_v p_v^2`` as a third output.
  """
  extra = {} if prefix_ids is None else {"prefix_ids": prefix_ids}
  if supports_chunked_logits(model):
    hidden = model.hidden_states(tokens, segment_ids=segment_ids, positions=positions, **extra)
    return losses.chunked_token_log_probs(hidden, model.unembedding(), tokens, chunk_size=chunk_size,
                                          with_log_sum_sq=with_log_sum_sq)
  if accepts_segment_ids(model):
    logits = model(tokens, segment_ids=segment_ids, positions=positions, **extra)
  else:
    logits = model(tokens)
  if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
    raise ValueError(f"the model must map tokens {tuple(tokens.shape)} to logits [B, T, V], got {tuple(logits.shape)}")
  return losses.token_log_probs_from_logits(logits, tokens, with_log_sum_sq=with_log_sum_sq)


def continued_token_mask(segment_ids: jax.Array, prefix_ids: jax.Array | None = None) -> jax.Array:
  """1 on real tokens predicted from a token of their own context: the token before is of the same
  segment, or (shared-prompt rows) of the prompt segment the token attends to as its prefix."""
  prev = segment_ids[:, :-1]
  same = prev == segment_ids[:, 1:]
  if prefix_ids is not None:
    same = same | ((prefix_ids[:, 1:] > 0) & (prev == prefix_ids[:, 1:]))
  return jnp.concatenate([jnp.zeros_like(same[:, :1]), same & (segment_ids[:, 1:] > 0)], axis=1)


def _pad_to(x: jax.Array | None, length: int) -> jax.Array | None:
  if x is None or x.shape[1] == length:
    return x
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def concat_sides(batch: PreferenceBatch) -> GeneratedSequenceBatch:
  """Chosen rows then rejected rows, right-padded to one length, for a single forward pass."""
  length = max(batch.chosen.length, batch.rejected.length)
  c, r = batch.chosen, batch.rejected

  def cat(name):
    a, b = getattr(c, name), getattr(r, name)
    if a is None or b is None:
      return None
    return jnp.concatenate([_pad_to(a, length), _pad_to(b, length)], axis=0)

  seq_ref = None
  if c.reference_sequence_log_probs is not None and r.reference_sequence_log_probs is not None:
    seq_ref = jnp.concatenate([c.reference_sequence_log_probs, r.reference_sequence_log_probs])
  return GeneratedSequenceBatch(  # not from_sequences: no host-side checks on traced values
      sequences=cat("sequences"),
      response_mask=cat("response_mask"),
      segment_ids=cat("segment_ids"),
      prompt_mask=cat("prompt_mask"),
      reference_log_probs=cat("reference_log_probs"),
      positions=cat("positions"),
      reference_sequence_log_probs=seq_ref,
  )


# --------------------------------------------------------------------------------------------
# The loss of one batch
# --------------------------------------------------------------------------------------------


def _reference_token_log_probs(reference_model, both: GeneratedSequenceBatch, settings, logps, chunk_size):
  if settings.reference_free:
    return jnp.zeros_like(logps)
  if both.reference_log_probs is not None:
    return both.reference_log_probs.astype(jnp.float32)
  if reference_model is not None:
    return token_log_probs(reference_model, both.sequences, both.segment_ids, both.positions, chunk_size)[0]
  return jnp.zeros_like(logps)  # only reached when no configured loss reads the reference


def dpo_loss(
    model: Any,
    reference_model: Any | None,
    batch: PreferenceBatch | PackedPreferenceBatch,
    settings: losses.LossSettings,
    *,
    chunk_size: int = 512,
    normalizers: losses.Normalizers | None = None,
) -> tuple[jax.Array, Metrics]:
  """The configured preference loss of ``batch`` and its metrics.

  Chosen and rejected go through the policy in one forward (concatenated, or packed in the same
  rows). Reference log-probs come from the batch when both sides carry them, else from
  ``reference_model`` (never differentiated), else they are zero (only valid when
  ``settings.reference_free`` or no loss needs them; the trainer refuses other cases when built).
  ``normalizers`` (see :func:`losses.preference_loss`): the counts of a whole batch that
  ``batch`` is a part of, making the loss and metrics ``batch``'s additive share of the whole's.
  """
  if isinstance(batch, PackedPreferenceBatch):
    return _packed_dpo_loss(model, reference_model, batch, settings, chunk_size, normalizers)
  if isinstance(batch, UnpairedBatch):
    return _unpaired_loss(model, reference_model, batch, settings, chunk_size)
  if isinstance(batch, PackedUnpairedBatch):
    return _packed_unpaired_loss(model, reference_model, batch, settings, chunk_size)
  both = concat_sides(batch)
  n = batch.chosen.batch_size
  logps, logit_means, *lss = token_log_probs(model, both.sequences, both.segment_ids, both.positions, chunk_size,
                                             with_log_sum_sq=settings.use_weighting)
  mask = both.response_mask
  weights = None
  if settings.ld_alpha is not None:  # LD-DPO: tokens beyond the pair's shorter response weigh ld_alpha
    counts = jnp.sum(mask, axis=-1).astype(jnp.float32)
    shared = jnp.minimum(counts[:n], counts[n:])
    rows = jnp.broadcast_to(jnp.arange(2 * n)[:, None], mask.shape)
    weights = losses.ld_token_weights(mask, rows, jnp.concatenate([shared, shared]), settings.ld_alpha)
  policy = losses.sequence_stats(logps, mask, logit_means, token_weights=weights,
                                 log_sum_sq=lss[0] if lss else None)
  if both.reference_sequence_log_probs is not None and not settings.reference_free:
    # Precomputed sums are used as given (the service's precompute applies LD-DPO's weights itself).
    ref = losses.SequenceStats(both.reference_sequence_log_probs.astype(jnp.float32), policy.num_tokens,
                               jnp.zeros_like(policy.logit_sum))
  else:
    ref_logps = _reference_token_log_probs(reference_model, both, settings, logps, chunk_size)
    ref = losses.sequence_stats(ref_logps, mask, token_weights=weights)
  ref = jax.tree.map(jax.lax.stop_gradient, ref)  # the reference is never differentiated
  split = lambda s: (jax.tree.map(lambda x: x[:n], s), jax.tree.map(lambda x: x[n:], s))
  (chosen, rejected), (ref_chosen, ref_rejected) = split(policy), split(ref)
  loss, metrics = losses.preference_loss(
      settings, chosen, rejected, ref_chosen, ref_rejected, logps[:n], mask[:n], batch.pair_mask,
      chosen_sequence_mask=continued_token_mask(both.segment_ids[:n]), normalizers=normalizers)
  metrics["tokens"] = jnp.sum(both.segment_ids > 0).astype(jnp.float32)
  return loss, metrics


def _unpaired_loss(model, reference_model, batch: UnpairedBatch, settings, chunk_size):
  """KTO: completions and their KL rows in one policy forward; the KL rows are not differentiated."""
  n = batch.completions.batch_size
  rows = batch.completions if batch.kl is None else concat_sides(PreferenceBatch(batch.completions, batch.kl))
  logps, logit_means = token_log_probs(model, rows.sequences, rows.segment_ids, rows.positions, chunk_size)
  policy = losses.sequence_stats(logps, rows.response_mask, logit_means)
  if rows.reference_sequence_log_probs is not None:
    ref_sums = rows.reference_sequence_log_probs.astype(jnp.float32)
  else:
    ref_sums = losses.sequence_stats(
        _reference_token_log_probs(reference_model, rows, settings, logps, chunk_size), rows.response_mask).logp_sum
  ref_sums = jax.lax.stop_gradient(ref_sums)  # the reference is never differentiated
  kl_logps = None if batch.kl is None else jax.lax.stop_gradient(policy.logp_sum[n:])
  loss, metrics = losses.unpaired_loss(settings, policy.logp_sum[:n], ref_sums[:n], batch.labels, kl_logps,
                                       None if batch.kl is None else ref_sums[n:], batch.example_mask)
  metrics["tokens"] = jnp.sum(rows.segment_ids > 0).astype(jnp.float32)
  return loss, metrics


def _packed_unpaired_loss(model, reference_model, batch: PackedUnpairedBatch, settings, chunk_size):
  """KTO on packed rows: each slot's chosen side is its completion, its rejected side its KL row (not
  differentiated); the same loss and metrics as :func:`_unpaired_loss` on the padded rows."""
  packed = batch.rows
  forward = lambda m: token_log_probs(m, packed.sequences, packed.segment_ids, packed.positions, chunk_size,
                                      packed.prefix_ids)
  logps, logit_means = forward(model)
  completion, kl_row = _packed_stats(logps, logit_means, packed)
  if packed.reference_sequence_log_probs is not None:  # precomputed: [R, K, 2] (completion, KL row) sums
    ref = packed.reference_sequence_log_probs.astype(jnp.float32).reshape(-1, 2)
    ref_completion, ref_kl = (losses.SequenceStats(ref[:, i], s.num_tokens, jnp.zeros_like(ref[:, i]))
                              for i, s in ((0, completion), (1, kl_row)))
  else:
    ref_completion, ref_kl = _packed_stats(forward(reference_model)[0], None, packed)
  ref_completion, ref_kl = jax.tree.map(jax.lax.stop_gradient, (ref_completion, ref_kl))  # never differentiated
  loss, metrics = losses.unpaired_loss(settings, completion.logp_sum, ref_completion.logp_sum,
                                       batch.labels.reshape(-1), jax.lax.stop_gradient(kl_row.logp_sum),
                                       ref_kl.logp_sum, packed.pair_mask.reshape(-1))
  _, side = packed.slots_and_sides()
  # Tokens of the completion and KL rows, as the padded layout counts them (a shared prompt twice).
  metrics["tokens"] = (jnp.sum(side > -2) + jnp.sum(side == -1)).astype(jnp.float32)
  return loss, metrics


def _packed_stats(token_values, logit_means, batch: PackedPreferenceBatch, *, ld_alpha: float | None = None,
                  log_sum_sq: jax.Array | None = None) -> tuple[losses.SequenceStats, ...]:
  """Per-slot (chosen, rejected) statistics of packed rows: segment sums over ``[R * K]`` slots."""
  rows, _ = batch.sequences.shape
  k = batch.pair_mask.shape[1]
  slot_in_row, side = batch.slots_and_sides()
  slot = jnp.arange(rows)[:, None] * k + slot_in_row
  ids = jnp.where(side >= 0, slot * 2 + side, 2 * rows * k)  # prompts and padding -> one spare bucket
  mask = batch.response_mask.astype(jnp.float32)

  def per_sequence(x, m=mask):
    summed = jax.ops.segment_sum((x * m).reshape(-1), ids.reshape(-1), num_segments=2 * rows * k + 1)
    return summed[:-1].reshape(rows * k, 2)

  count = per_sequence(jnp.ones_like(mask))
  weighted = mask
  if ld_alpha is not None:  # LD-DPO over packed sequences (each one contiguous in its row)
    shared = jnp.min(count, axis=1)
    per_id = jnp.concatenate([jnp.repeat(shared, 2), jnp.zeros((1,), shared.dtype)])
    weighted = losses.ld_token_weights(mask, ids, per_id, ld_alpha)
  logp = per_sequence(token_values, weighted)
  logits = per_sequence(logit_means) if logit_means is not None else jnp.zeros_like(logp)
  wpo = None if log_sum_sq is None else jax.lax.stop_gradient(per_sequence(token_values - log_sum_sq))
  return tuple(losses.SequenceStats(logp[:, i], count[:, i], logits[:, i], None if wpo is None else wpo[:, i])
               for i in (0, 1))


def _packed_dpo_loss(model, reference_model, batch: PackedPreferenceBatch, settings, chunk_size, normalizers=None):
  forward = lambda m, wpo=False: token_log_probs(m, batch.sequences, batch.segment_ids, batch.positions, chunk_size,
                                                 batch.prefix_ids, with_log_sum_sq=wpo)
  logps, logit_means, *lss = forward(model, settings.use_weighting)
  chosen, rejected = _packed_stats(logps, logit_means, batch, ld_alpha=settings.ld_alpha,
                                   log_sum_sq=lss[0] if lss else None)
  if settings.reference_free or (batch.reference_sequence_log_probs is None and reference_model is None):
    ref_chosen = ref_rejected = losses.SequenceStats(jnp.zeros_like(chosen.logp_sum), chosen.num_tokens,
                                                     jnp.zeros_like(chosen.logp_sum))
  elif batch.reference_sequence_log_probs is not None:
    ref = batch.reference_sequence_log_probs.astype(jnp.float32).reshape(-1, 2)
    ref_chosen = losses.SequenceStats(ref[:, 0], chosen.num_tokens, jnp.zeros_like(ref[:, 0]))
    ref_rejected = losses.SequenceStats(ref[:, 1], rejected.num_tokens, jnp.zeros_like(ref[:, 1]))
  else:
    ref_logps = forward(reference_model)[0]
    ref_chosen, ref_rejected = _packed_stats(ref_logps, None, batch, ld_alpha=settings.ld_alpha)
  ref_chosen, ref_rejected = jax.tree.map(jax.lax.stop_gradient, (ref_chosen, ref_rejected))  # never differentiated
  _, side = batch.slots_and_sides()
  chosen_mask = batch.response_mask * (side == 0).astype(batch.response_mask.dtype)
  # ORPO's NLL: the whole chosen sequence (a shared prompt counts once, with its chosen branch).
  sequence_mask = continued_token_mask(batch.segment_ids, batch.prefix_ids) & ((side == 0) | (side == -1))
  loss, metrics = losses.preference_loss(settings, chosen, rejected, ref_chosen, ref_rejected, logps, chosen_mask,
                                         batch.pair_mask.reshape(-1), chosen_sequence_mask=sequence_mask,
                                         normalizers=normalizers)
  # Tokens of both sequences of every pair, as the unpacked layout counts them (a shared prompt twice).
  metrics["tokens"] = (jnp.sum(side > -2) + jnp.sum(side == -1)).astype(jnp.float32)
  return loss, metrics


# --------------------------------------------------------------------------------------------
# The pure train / eval steps
# --------------------------------------------------------------------------------------------


def batch_normalizers(batch: PreferenceBatch | PackedPreferenceBatch) -> losses.Normalizers:
  """The denominators of ``batch``'s means, counted from its masks alone (no forward pass).

  Real pairs and the scored response tokens of each side of the real pairs: what
  :func:`losses.preference_loss` counts itself on a whole batch, so handing these to each
  microbatch makes the microbatches' losses and metrics add up to the whole batch's.
  """
  f32 = lambda x: jnp.sum(x).astype(jnp.float32)
  if isinstance(batch, (UnpairedBatch, PackedUnpairedBatch)):
    return None  # KTO: means over the batch itself (accumulation is refused for it)
  if isinstance(batch, PackedPreferenceBatch):
    _, side = batch.slots_and_sides()
    mask = batch.response_mask
    sequence = continued_token_mask(batch.segment_ids, batch.prefix_ids) & ((side == 0) | (side == -1))
    return losses.Normalizers(f32(batch.pair_mask), f32(mask * (side == 0)), f32(mask * (side == 1)), f32(sequence))
  n = batch.chosen.batch_size
  w = jnp.ones((n,), jnp.int32) if batch.pair_mask is None else batch.pair_mask
  return losses.Normalizers(f32(w), f32(batch.chosen.response_mask * w[:, None]),
                            f32(batch.rejected.response_mask * w[:, None]),
                            f32(continued_token_mask(batch.chosen.segment_ids) * w[:, None]))


def check_accumulation(config: DPOConfig, grad_accum_steps: int) -> None:
  """Refuses accumulation for losses whose value over a batch is not a sum over its microbatches."""
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
  if grad_accum_steps > 1 and config.unpaired:
    raise ValueError(f"loss_type {','.join(config.loss_types)}: KTO's KL reference point is a mean over the batch, "
                     f"so microbatches cannot add up to it; use grad_accum_steps=1 (got {grad_accum_steps})")
  coupled = [t for t in config.loss_types if t in losses.BATCH_COUPLED_LOSSES]
  if grad_accum_steps > 1 and coupled:
    raise ValueError(f"loss_type {','.join(coupled)} sorts over the whole batch, so microbatches cannot add up to "
                     f"it: gradient accumulation (grad_accum_steps={grad_accum_steps}) would train a different "
                     "objective; use grad_accum_steps=1")


def _microbatches(batch: PreferenceBatch, num: int) -> PreferenceBatch:
  """``[G, ...]`` -> ``[num, G/num, ...]``; microbatch m holds rows m, m+num, ... .

  Strided rows keep each device's rows on that device when the batch dimension is sharded.
  """

  def split(x):
    if x is None:
      return None
    g = x.shape[0]
    if g % num:
      raise ValueError(f"batch size {g} is not divisible by grad_accum_steps={num}")
    return x.reshape(g // num, num, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def make_loss_fn(
    graphdef: nnx.GraphDef,
    ref_graphdef: nnx.GraphDef | None,
    config: DPOConfig,
) -> Callable[[nnx.State, nnx.State | None, PreferenceBatch], tuple[jax.Array, Metrics]]:
  """``loss_fn(state, ref_state, batch, normalizers=None) -> (loss, metrics)``: a pure evaluation of a batch.

  ``graphdef``/``state`` split either the model alone or ``(model, optimizer)``. With the
  ``normalizers`` of a whole eval set, the values are this batch's additive shares of the set's.
  """
  settings = config.loss_settings()

  def loss_fn(state, ref_state, batch, normalizers=None):
    model = nnx.merge(graphdef, state)
    if isinstance(model, tuple):
      model = model[0]
    ref = _reference(ref_graphdef, ref_state, model)
    return dpo_loss(model, ref, batch, settings, chunk_size=config.logits_chunk_size, normalizers=normalizers)

  return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    ref_graphdef: nnx.GraphDef | None,
    config: DPOConfig,
    *,
    grad_accum_steps: int = 1,
) -> Callable[[nnx.State, nnx.State | None, PreferenceBatch], tuple[nnx.State, Metrics]]:
  """Builds the pure step ``(state, ref_state, batch) -> (new_state, metrics)``.

  ``graphdef``/``state`` are ``nnx.split((model, optimizer))``. The step computes gradients of the
  policy's ``nnx.Param``s (accumulated over ``grad_accum_steps`` microbatches), applies the
  optimizer, and keeps the old state when the loss or the gradients are not finite (metric
  ``nonfinite`` = 1). ``grad_norm`` is measured before any clipping the optimizer does.

  Accumulation computes the loss of the whole batch, not a mean of microbatch means: every
  microbatch is normalised by the whole batch's counts (:func:`batch_normalizers`: real pairs,
  scored tokens), so microbatches holding different numbers of pairs or tokens (packed rows,
  padded pairs of varying lengths) weigh what they hold, and the summed gradients and metrics
  equal those of the batch taken at once. Losses that sort over the batch are refused
  (:func:`check_accumulation`).
  """
  settings = config.loss_settings()
  check_accumulation(config, grad_accum_steps)

  def step(state, ref_state, batch):
    # Arrays are immutable: keep the incoming ones (merge may reuse the state's Variables).
    old_leaves = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    # LoRA adapter dropout: one key per step (its counter is model state, so resume is bitwise).
    dropout_key = model.next_dropout_key() if callable(getattr(model, "next_dropout_key", None)) else None
    m_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ref = None if _is_base(ref_graphdef) else _reference(ref_graphdef, ref_state, None)

    # Counted over the whole global batch (under jit a sum over the sharded batch is a global
    # reduction, so every device and process uses the same counts), handed to every microbatch.
    normalizers = batch_normalizers(batch)

    def loss_of(p, rest_state, micro, index=0):
      m = nnx.merge(m_graphdef, p, rest_state)
      # LoRA's base reference reads only frozen (non-Param) weights: nothing flows back from it.
      reference = m.base_view() if _is_base(ref_graphdef) else ref
      # LoRA: the training forward applies adapter dropout (evaluation never does), a mask per microbatch.
      policy = m if dropout_key is None else m.training_view(jax.random.fold_in(dropout_key, index))
      loss, metrics = dpo_loss(policy, reference, micro, settings, chunk_size=config.logits_chunk_size,
                               normalizers=normalizers)
      _, _, new_rest = nnx.split(m, nnx.Param, ...)  # e.g. advanced dropout RNG counters
      return loss, (metrics, new_rest)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if grad_accum_steps == 1:
      (loss, (metrics, rest)), grads = grad_fn(params, rest, batch)
    else:
      micro = _microbatches(batch, grad_accum_steps)

      def body(carry, xs):
        grads_acc, rest_state = carry
        mb, index = xs
        (_, (m, rest_state)), g = grad_fn(params, rest_state, mb, index)
        return (jax.tree.map(jnp.add, grads_acc, g), rest_state), m

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, rest), per_micro = jax.lax.scan(body, (zeros, rest), (micro, jnp.arange(grad_accum_steps)))
      # Each microbatch's loss, gradient and metrics are its share of the whole batch's: sums.
      metrics = jax.tree.map(lambda x: jnp.sum(x, axis=0), per_micro)
      loss = metrics["loss"]

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    model = nnx.merge(m_graphdef, params, rest)
    optimizer.update(model, grads)
    new_state = nnx.state((model, optimizer))
    # A non-finite step leaves every parameter and optimizer statistic as it was.
    new_leaves, treedef = jax.tree.flatten(new_state)
    new_state = treedef.unflatten([jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves, strict=True)])
    metrics = dict(metrics, grad_norm=grad_norm, nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state, metrics

  return step


def mix_reference(reference: Any, policy: Any, alpha: float) -> Any:
  """TR-DPO (Gorbatovski et al. 2024): ``alpha * policy + (1 - alpha) * reference``, leaf by leaf.

  Computed in float32 and stored in each reference leaf's dtype; ``alpha = 1`` is a hard copy.
  ``reference`` and ``policy`` are parameter trees of the same structure.
  """
  def mix(r, p):
    return ((1.0 - alpha) * r.astype(jnp.float32) + alpha * p.astype(jnp.float32)).astype(r.dtype)

  return jax.tree.map(mix, reference, policy)


# --------------------------------------------------------------------------------------------
# The seed-compatible trainer
# --------------------------------------------------------------------------------------------


class DPOTrainer:
  """Trains ``model`` with a preference loss against a frozen ``reference_model``.

  Args:
    model: the policy, an ``nnx.Module`` mapping int tokens ``[B, T]`` to logits ``[B, T, V]``
      (or exposing ``hidden_states``/``unembedding`` like ``artifex_dpo.models.LlamaModel``).
    reference_model: the frozen reference; ``"base"`` (:data:`BASE_REFERENCE`) for a LoRA model
      (``artifex_dpo.models.lora.LoraLlamaModel``): the reference is the model's own frozen base
      with the adapters off (no second copy of the weights); or None when
      ``config.reference_free``, when ``config.precompute_ref_logps`` (batches carry reference
      log-probs), or when no configured loss reads the reference (``simpo``, ``sft``). None is
      never read as "the base": a LoRA model whose loss needs a reference must say ``"base"``.
    optimizer: an ``nnx.Optimizer`` over ``model``'s parameters.
    config: the loss configuration.
    grad_accum_steps: microbatches per update (the batch size, or the number of packed rows,
      must divide by it); the update equals that of the whole batch at once.

  Raises:
    ValueError: when the losses need a reference and none is available, or accumulation is
      asked of a loss that sorts over the batch (``aot``, ``aot_unpaired``).
  """

  def __init__(
      self,
      model: nnx.Module,
      reference_model: nnx.Module | None,
      optimizer: nnx.Optimizer,
      config: DPOConfig | None = None,
      *,
      grad_accum_steps: int = 1,
  ):
    self.config = config if config is not None else DPOConfig()
    if reference_model is None and self.config.needs_reference and not self.config.precompute_ref_logps:
      raise ValueError(
          "DPOTrainer: reference_model is None but the loss "
          f"{','.join(self.config.loss_types)} needs a reference; pass a reference model (or "
          "reference_model='base' for a LoRA model: its base with the adapters off), set "
          "DPOConfig.reference_free=True, or set DPOConfig.precompute_ref_logps=True and give batches "
          "reference_log_probs")
    if _is_base(reference_model) and not callable(getattr(model, "base_view", None)):
      raise ValueError(f"DPOTrainer: reference_model='base' needs a LoRA model with base_view() "
                       f"(artifex_dpo.models.lora.LoraLlamaModel), got {type(model).__name__}")
    if isinstance(reference_model, str) and not _is_base(reference_model):
      raise ValueError(f"DPOTrainer: reference_model must be a model, 'base' or None, got {reference_model!r}")
    check_accumulation(self.config, grad_accum_steps)
    if self.config.sync_ref_model and reference_model is not None:
      shapes = lambda m: jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(m, nnx.Param)))
      if shapes(reference_model) != shapes(model):
        raise ValueError("DPOConfig.sync_ref_model (TR-DPO) mixes the policy into the reference: they must have "
                         "the same parameters (names and shapes)")
    self.model = model
    self.reference_model = None if self.config.reference_free else reference_model
    self.optimizer = optimizer
    self.grad_accum_steps = grad_accum_steps
    self._graphdef, _ = nnx.split((model, optimizer))
    self._model_graphdef, _ = nnx.split(model)
    self._ref_graphdef, self._ref_state = (None, None)
    if _is_base(self.reference_model):
      self._ref_graphdef = BASE_REFERENCE
    elif self.reference_model is not None:
      self._ref_graphdef, self._ref_state = nnx.split(self.reference_model)
    self.step_fn = make_train_step(self._graphdef, self._ref_graphdef, self.config,
                                   grad_accum_steps=grad_accum_steps)
    self._train_step = jax.jit(self.step_fn)
    self._eval_step = jax.jit(make_loss_fn(self._model_graphdef, self._ref_graphdef, self.config))
    self._updates = 0
    alpha = float(self.config.ref_model_mixup_alpha)
    self._sync = jax.jit(lambda r, p: mix_reference(r, p, alpha))
    self._plain_model = not accepts_segment_ids(model) or (
        self.reference_model is not None and not _is_base(self.reference_model)
        and not accepts_segment_ids(self.reference_model))

  def _check_batch(self, batch: PreferenceBatch | PackedPreferenceBatch | UnpairedBatch) -> None:
    if self.config.unpaired:
      if not isinstance(batch, (UnpairedBatch, PackedUnpairedBatch)):
        raise ValueError(f"loss {','.join(self.config.loss_types)} is unpaired: train_step expects an UnpairedBatch "
                         f"(artifex_dpo.data.unpaired builds one), got {type(batch).__name__}")
      if isinstance(batch, PackedUnpairedBatch):  # packed: every slot carries its KL row
        if "kto" not in self.config.loss_types:
          raise ValueError(f"a PackedUnpairedBatch carries KL rows: it needs loss 'kto', not {self.config.loss_types}")
        batch = batch.rows  # the packed-row checks below
      elif "kto" in self.config.loss_types and batch.kl is None:
        raise ValueError("loss 'kto' needs the batch's KL rows (UnpairedBatch.kl: mismatched prompt/completion "
                         "pairs, see artifex_dpo.data.unpaired.make_unpaired_batch(with_kl=True))")
    elif not isinstance(batch, (PreferenceBatch, PackedPreferenceBatch)):
      raise ValueError(f"train_step expects a PreferenceBatch or PackedPreferenceBatch, got {type(batch).__name__}")
    needs_ref_values = self.config.needs_reference and self.reference_model is None
    if needs_ref_values and not batch.has_reference_log_probs:
      raise ValueError(
          "batch has no reference_log_probs on both sides, and the trainer has no reference model "
          "(DPOConfig.precompute_ref_logps=True)")
    if isinstance(batch, PackedPreferenceBatch) and batch.shares_prompt and not accepts_prefix_ids(self.model):
      raise ValueError("shared-prompt rows need a model accepting prefix_ids (e.g. artifex_dpo.models.LlamaModel)")
    if self._plain_model:
      if isinstance(batch, PackedPreferenceBatch):
        raise ValueError("packed rows need a model accepting segment_ids (e.g. artifex_dpo.models.LlamaModel)")
      # A model called as model(tokens) sees every token: only right padding keeps scores exact.
      sides = ("completions", "kl") if isinstance(batch, UnpairedBatch) else ("chosen", "rejected")
      for side in sides:
        if getattr(batch, side) is None:
          continue
        seg = np.asarray(getattr(batch, side).segment_ids)
        if np.any(seg > 1) or np.any(np.diff((seg > 0).astype(np.int8), axis=1) > 0):
          raise ValueError(
              f"{side}: the model takes no segment_ids, so only right-padded, unpacked rows are exact; "
              "left padding or packing needs a model accepting segment_ids (e.g. artifex_dpo.models.LlamaModel)")

  def train_step(self, batch: PreferenceBatch | PackedPreferenceBatch) -> tuple[jax.Array, Metrics]:
    """One optimizer update on ``batch``; returns ``(loss, metrics)`` computed before the update."""
    self._check_batch(batch)
    state = nnx.state((self.model, self.optimizer))
    new_state, metrics = self._train_step(state, self._ref_state, batch)
    nnx.update((self.model, self.optimizer), new_state)
    self._updates += 1
    if self.config.sync_ref_model and self._updates % self.config.ref_model_sync_steps == 0:
      # TR-DPO, as TRL's SyncRefModelCallback: after every ref_model_sync_steps-th update.
      mixed = self._sync(nnx.state(self.reference_model, nnx.Param), nnx.state(self.model, nnx.Param))
      nnx.update(self.reference_model, mixed)
      self._ref_state = nnx.state(self.reference_model)
    return metrics["loss"], metrics

  def compute_loss(self, batch: PreferenceBatch | PackedPreferenceBatch) -> tuple[jax.Array, Metrics]:
    """``(loss, metrics)`` of ``batch`` without updating anything."""
    self._check_batch(batch)
    return self._eval_step(nnx.state(self.model), self._ref_state, batch)

  eval_step = compute_loss
