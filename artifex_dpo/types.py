"""The typed preference contract: ``GeneratedSequenceBatch`` and ``PreferenceBatch``.

A ``GeneratedSequenceBatch`` holds token sequences ``[B, T]`` and says which tokens are scored.
``response_mask[b, t] = 1`` means token t of row b is scored, i.e. ``log p(x_t | x_<t)`` counts,
predicted from position t-1; position 0 has no context and can never be scored.

``segment_ids`` say which tokens are real: 0 is padding, 1 a real token (values > 1 appear in
packed rows, where each sequence of the row has its own id). Attention never crosses segments and
never sees padding, so padding (left or right) changes no score.

Both classes are JAX pytrees (``flax.struct``), so they pass straight into jitted functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _as_2d(name: str, x: Any, shape: tuple[int, ...] | None, dtype) -> jax.Array:
  arr = jnp.asarray(x, dtype=dtype)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D [batch, length], got shape {tuple(arr.shape)}")
  if shape is not None and tuple(arr.shape) != shape:
    raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {shape} (the shape of sequences)")
  return arr


@struct.dataclass
class GeneratedSequenceBatch:
  """Token sequences with the masks that say what is real and what is scored.

  Attributes:
    sequences: int32 ``[B, T]`` token ids.
    response_mask: int32 ``[B, T]``; 1 where a token is scored (predicted from the one before).
    segment_ids: int32 ``[B, T]``; 0 for padding, >0 for real tokens (one id per packed sequence).
    prompt_mask: int32 ``[B, T]`` or None; 1 on prompt tokens (informational).
    reference_log_probs: float32 ``[B, T]`` or None; precomputed per-token reference log-probs,
      aligned with ``sequences`` (entry t is ``log p_ref(x_t | x_<t)``), used where
      ``response_mask`` is 1.
    positions: int32 ``[B, T]`` or None; token positions (default: index within each segment).
    reference_sequence_log_probs: float32 ``[B]`` or None; precomputed reference log-probs already
      summed over each row's response tokens (what ``dpo.precompute_ref_logps`` stores). Used
      instead of ``reference_log_probs`` when given.
  """

  sequences: jax.Array
  response_mask: jax.Array
  segment_ids: jax.Array
  prompt_mask: jax.Array | None = None
  reference_log_probs: jax.Array | None = None
  positions: jax.Array | None = None
  reference_sequence_log_probs: jax.Array | None = None

  @classmethod
  def from_sequences(
      cls,
      sequences: Any,
      *,
      response_mask: Any | None = None,
      prompt_mask: Any | None = None,
      attention_mask: Any | None = None,
      segment_ids: Any | None = None,
      reference_log_probs: Any | None = None,
      positions: Any | None = None,
      pad_token_id: int | None = None,
  ) -> "GeneratedSequenceBatch":
    """Builds a batch, deriving the masks that are not given.

    Args:
      sequences: int ``[B, T]`` token ids.
      response_mask: ``[B, T]`` 0/1, 1 on scored tokens. Default: every real token that is not in
        ``prompt_mask`` and not at position 0.
      prompt_mask: ``[B, T]`` 0/1, 1 on prompt tokens.
      attention_mask: ``[B, T]`` 0/1, 1 on real tokens (Hugging Face style). Ignored when
        ``segment_ids`` is given.
      segment_ids: ``[B, T]`` int, 0 on padding, >0 per packed sequence.
      reference_log_probs: ``[B, T]`` precomputed per-token reference log-probs.
      positions: ``[B, T]`` token positions (default: index within each segment).
      pad_token_id: when neither ``attention_mask`` nor ``segment_ids`` is given, tokens equal to
        this id are padding. Without any of the three, every token is real.

    Raises:
      ValueError: on shapes that do not match, a scored padding token, or a scored position 0.
    """
    seq = _as_2d("sequences", sequences, None, jnp.int32)
    shape = tuple(seq.shape)
    if segment_ids is not None:
      seg = _as_2d("segment_ids", segment_ids, shape, jnp.int32)
    elif attention_mask is not None:
      seg = (_as_2d("attention_mask", attention_mask, shape, jnp.int32) != 0).astype(jnp.int32)
    elif pad_token_id is not None:
      seg = (seq != pad_token_id).astype(jnp.int32)
    else:
      seg = jnp.ones(shape, jnp.int32)
    prompt = None if prompt_mask is None else _as_2d("prompt_mask", prompt_mask, shape, jnp.int32)
    if response_mask is not None:
      resp = _as_2d("response_mask", response_mask, shape, jnp.int32)
    else:
      resp = (seg > 0).astype(jnp.int32).at[:, 0].set(0)
      if prompt is not None:
        resp = resp * (1 - prompt)
    ref = None
    if reference_log_probs is not None:
      ref = _as_2d("reference_log_probs", reference_log_probs, shape, jnp.float32)
    pos = None if positions is None else _as_2d("positions", positions, shape, jnp.int32)
    batch = cls(sequences=seq, response_mask=resp, segment_ids=seg, prompt_mask=prompt,
                reference_log_probs=ref, positions=pos)
    batch.validate()
    return batch

  @property
  def batch_size(self) -> int:
    return int(self.sequences.shape[0])

  @property
  def length(self) -> int:
    return int(self.sequences.shape[1])

  def validate(self) -> None:
    """Checks shapes and, for concrete arrays, that only real tokens after position 0 are scored."""
    shape = tuple(self.sequences.shape)
    for name in ("response_mask", "segment_ids", "prompt_mask", "reference_log_probs", "positions"):
      value = getattr(self, name)
      if value is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} (the shape of sequences)")
    if _is_concrete(self.response_mask) and _is_concrete(self.segment_ids):
      resp = np.asarray(self.response_mask)
      if resp.size and np.any(resp[:, 0] != 0):
        raise ValueError("response_mask[:, 0] must be 0: the first token has no context to be predicted from")
      if np.any((resp != 0) & (np.asarray(self.segment_ids) == 0)):
        raise ValueError("response_mask marks padding tokens (segment_ids/attention_mask == 0) as scored")
      seg = np.asarray(self.segment_ids)
      if seg.size and np.any((resp[:, 1:] != 0) & (seg[:, 1:] != seg[:, :-1])):
        raise ValueError("response_mask scores the first token of a packed segment, which has no context")


@struct.dataclass
class PreferenceBatch:
  """Chosen and rejected responses, aligned pair by pair (row b of each side is pair b).

  The two sides may have different lengths; they must have the same batch size.
  ``pair_mask`` (``[B]`` 0/1, optional) marks filler pairs (0) that count in no metric, e.g. the
  rows that fill up a last, partial eval batch.
  """

  chosen: GeneratedSequenceBatch
  rejected: GeneratedSequenceBatch
  pair_mask: jax.Array | None = None

  def __post_init__(self):
    for side in ("chosen", "rejected"):
      if not isinstance(getattr(self, side), GeneratedSequenceBatch):
        raise ValueError(f"PreferenceBatch.{side} must be a GeneratedSequenceBatch, got {type(getattr(self, side)).__name__}")
    if not (hasattr(self.chosen.sequences, "shape") and hasattr(self.rejected.sequences, "shape")):
      return  # a pytree of shardings or other placeholders, rebuilt by jax.tree.map
    cb, rb = self.chosen.sequences.shape[0], self.rejected.sequences.shape[0]
    if cb != rb:
      raise ValueError(f"PreferenceBatch: chosen has {cb} sequences but rejected has {rb}; they must pair up")

  @property
  def has_reference_log_probs(self) -> bool:
    """True when both sides carry precomputed reference log-probs (the reference forward is skipped)."""
    has = lambda s: s.reference_log_probs is not None or s.reference_sequence_log_probs is not None
    return has(self.chosen) and has(self.rejected)


@struct.dataclass
class PackedPreferenceBatch:
  """Padding-free rows, each holding several whole pairs (chosen and rejected in the same row).

  In row r, the j-th pair's chosen sequence has segment id ``2j + 1`` and its rejected sequence
  ``2j + 2`` (0 is padding, at the end of the row). Attention, positions and log-prob masks never
  cross a segment boundary, so every pair is scored exactly as it would be alone.

  Attributes:
    sequences: int32 ``[R, L]`` tokens.
    segment_ids: int32 ``[R, L]`` as above.
    response_mask: int32 ``[R, L]``; 1 on scored (response) tokens.
    pair_mask: int32 ``[R, K]``; 1 where slot j of row r holds a pair (K = max pairs per row).
    reference_sequence_log_probs: float32 ``[R, K, 2]`` or None; precomputed reference
      log-probs summed over the response tokens of (chosen, rejected) of each slot.
    positions: int32 ``[R, L]`` or None (default: index within each segment).
    prefix_ids: int32 ``[R, L]`` or None. Given, the rows use the shared-prompt layout of
      ``artifex_dpo.data.packing``: pair j's prompt has segment id ``3j + 1``, its chosen and
      rejected branches ``3j + 2`` and ``3j + 3``, and a branch token may also attend to the
      segment named by its ``prefix_ids`` entry (its prompt).
  """

  sequences: jax.Array
  segment_ids: jax.Array
  response_mask: jax.Array
  pair_mask: jax.Array
  reference_sequence_log_probs: jax.Array | None = None
  positions: jax.Array | None = None
  prefix_ids: jax.Array | None = None

  @property
  def shares_prompt(self) -> bool:
    return self.prefix_ids is not None

  def slots_and_sides(self) -> tuple[jax.Array, jax.Array]:
    """Per token ``[R, L]``: its pair's slot in the row, and its side: 0 chosen, 1 rejected,
    -1 a shared prompt, -2 padding (the segment-id layouts of ``artifex_dpo.data.packing``)."""
    seg = self.segment_ids
    per_pair = 3 if self.shares_prompt else 2
    side = jnp.where(seg > 0, (seg - 1) % per_pair - (per_pair - 2), -2)
    return (seg - 1) // per_pair, side

  @property
  def has_reference_log_probs(self) -> bool:
    return self.reference_sequence_log_probs is not None


@struct.dataclass
class UnpairedBatch:
  """Single labelled completions for the unpaired losses (KTO), with their KL pairs.

  Attributes:
    completions: ``[N, T]`` prompt + completion rows (``response_mask`` on the completion).
    labels: int32 ``[N]``: 1 desirable, 0 undesirable.
    kl: ``[N, T']`` mismatched rows (prompt i + the completion of another example of the batch),
      whose log-ratios estimate KTO's reference point; None for ``apo_zero_unpaired``.
    example_mask: ``[N]`` 0/1 or None; 0 marks filler examples that count nowhere.

  Precomputed reference log-probs ride on the two GeneratedSequenceBatches as in PreferenceBatch.
  """

  completions: GeneratedSequenceBatch
  labels: jax.Array
  kl: GeneratedSequenceBatch | None = None
  example_mask: jax.Array | None = None

  @property
  def has_reference_log_probs(self) -> bool:
    has = lambda s: s is not None and (s.reference_log_probs is not None or s.reference_sequence_log_probs is not None)
    return has(self.completions) and (self.kl is None or has(self.kl))

  @classmethod
  def from_arrays(cls, arrays: dict[str, Any]) -> "UnpairedBatch":
    """From :func:`artifex_dpo.data.unpaired.make_unpaired_batch`'s numpy arrays."""
    side = lambda p: GeneratedSequenceBatch(
        sequences=jnp.asarray(arrays[f"{p}_tokens"]), response_mask=jnp.asarray(arrays[f"{p}_response_mask"]),
        segment_ids=jnp.asarray(arrays[f"{p}_segment_ids"]))
    return cls(completions=side("completion"), labels=jnp.asarray(arrays["labels"]),
               kl=side("kl") if "kl_tokens" in arrays else None,
               example_mask=jnp.asarray(arrays["example_mask"]) if "example_mask" in arrays else None)


@struct.dataclass
class PackedUnpairedBatch:
  """KTO examples packed padding-free (``data.pack_batches``): each example and its KL row as one packed pair.

  Example i's completion row and KL row share its prompt, so they are laid out as the chosen and the
  rejected sequence of a :class:`PackedPreferenceBatch` pair (optionally with the prompt shared):
  slot ``(r, j)`` holds one example, its completion on the chosen side and its KL completion on the
  rejected side.

  Attributes:
    rows: The packed rows (``pair_mask`` marks the slots holding an example).
    labels: int32 ``[R, K]``: 1 desirable, 0 undesirable (0 in empty slots).
  """

  rows: PackedPreferenceBatch
  labels: jax.Array

  @property
  def has_reference_log_probs(self) -> bool:
    return self.rows.has_reference_log_probs

  @classmethod
  def from_arrays(cls, arrays: dict[str, Any]) -> "PackedUnpairedBatch":
    """From the numpy arrays of :func:`artifex_dpo.data.unpaired.make_packed_unpaired_batch`."""
    optional = {k: jnp.asarray(arrays[k]) for k in ("positions", "prefix_ids") if k in arrays}
    rows = PackedPreferenceBatch(sequences=jnp.asarray(arrays["tokens"]), segment_ids=jnp.asarray(arrays["segment_ids"]),
                                 response_mask=jnp.asarray(arrays["response_mask"]),
                                 pair_mask=jnp.asarray(arrays["pair_mask"]), **optional)
    return cls(rows=rows, labels=jnp.asarray(arrays["labels"]))
