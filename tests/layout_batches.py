"""The same preference pairs as padded, packed and shared-prompt batches, for the layout-equality tests.

:func:`tiny_models_and_pairs` tokenizes a few synthetic pairs with the byte tokenizer and builds two
llama-tiny models (policy, reference); :func:`padded_batch` and :func:`packed_batch` lay those pairs
out as the model's two input layouts.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_dpo.data import PreferenceDataset, load_tokenizer, make_batch
from artifex_dpo.data.formats import parse_record, tokenize_pairs
from artifex_dpo.data.packing import make_packed_batch, packed_lengths, plan_packing
from artifex_dpo.data.synthetic import synthetic_records
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.types import GeneratedSequenceBatch, PackedPreferenceBatch, PreferenceBatch


def tiny_models_and_pairs(num_pairs: int, seed: int):
  """``(dataset, policy, reference)``: ``num_pairs`` synthetic pairs (byte tokens) and two llama-tiny models."""
  tok = load_tokenizer("byte")
  texts = [parse_record(r, tok, "mem", i) for i, r in enumerate(synthetic_records(num_pairs, seed=seed))]
  ds = PreferenceDataset.from_pairs(tokenize_pairs(texts, tok), tok.pad_id)
  cfg = get_preset("llama-tiny", vocab_size=tok.vocab_size)
  return ds, LlamaModel(cfg, rngs=nnx.Rngs(0)), LlamaModel(cfg, rngs=nnx.Rngs(1))


def padded_batch(ds, idx, ref=None) -> PreferenceBatch:
  """Pairs ``idx`` of ``ds`` padded to their longest; ``ref``: optional ``[B, 2]`` reference sums (chosen, rejected)."""
  b = make_batch(ds, idx, int(ds.lengths[idx].max()))
  side = lambda s, r: GeneratedSequenceBatch(sequences=jnp.asarray(b[f"{s}_tokens"]),
                                            response_mask=jnp.asarray(b[f"{s}_response_mask"]),
                                            segment_ids=jnp.asarray(b[f"{s}_segment_ids"]),
                                            reference_sequence_log_probs=r)
  return PreferenceBatch(chosen=side("chosen", None if ref is None else ref[:, 0]),
                         rejected=side("rejected", None if ref is None else ref[:, 1]))


def packed_batch(ds, ref_table=None, share=False) -> PackedPreferenceBatch:
  """Every pair of ``ds`` packed into 160-token rows (several per row), the prompt shared if ``share``.

  ``ref_table``: optional ``[len(ds), 2]`` reference sums, laid out per row and pair slot.
  """
  plan = plan_packing(packed_lengths(ds.offsets, share), row_length=160, max_pairs_per_row=4)
  b = make_packed_batch(ds, plan, np.arange(plan.num_rows), share_prompt=share)
  assert plan.num_rows < len(ds)  # several pairs share rows
  ref = None
  if ref_table is not None:
    ref = jnp.asarray(np.where(b["pair_indices"][..., None] >= 0, ref_table[np.maximum(b["pair_indices"], 0)], 0.0))
  shared = {k: jnp.asarray(b[k]) for k in ("positions", "prefix_ids")} if share else {}
  return PackedPreferenceBatch(sequences=jnp.asarray(b["tokens"]), segment_ids=jnp.asarray(b["segment_ids"]),
                               response_mask=jnp.asarray(b["response_mask"]), pair_mask=jnp.asarray(b["pair_mask"]),
                               reference_sequence_log_probs=ref, **shared)
