"""Precomputed reference log-probs (``dpo.precompute_ref_logps``): one pass, cached next to the run.

The reference model scores every pair once (the sums of its response log-probs, chosen and
rejected); training then runs with no reference model in memory and no reference forward. The
cache file is keyed by a fingerprint of the tokenized data (which covers the tokenizer and the
truncation settings) and of the reference weights themselves, so a stale cache is never used.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from artifex_dpo import losses
from artifex_dpo import memory
from artifex_dpo import sharding
from artifex_dpo import state as state_lib
from artifex_dpo import storage
from artifex_dpo.data import PreferenceDataset, eval_batches
from artifex_dpo.models.lora import frozen
from artifex_dpo.trainer import concat_sides, token_log_probs


def weights_fingerprint(params: nnx.State) -> str:
  """A digest of parameter values: two weighted sums per array, computed on device."""

  def digest(x):
    x = x.astype(jnp.float32).reshape(-1)
    ramp = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.618)
    return jnp.stack([jnp.sum(x), jnp.sum(x * ramp)])

  leaves = jax.device_get(jax.jit(lambda p: [digest(x) for x in jax.tree.leaves(p)])(params))
  h = hashlib.sha256()
  for v in leaves:
    h.update(np.asarray(v, np.float32).tobytes())
  return h.hexdigest()[:16]


def cache_key(dataset: PreferenceDataset, ref_fingerprint: str, chunk_size: int, ld_alpha: float | None = None) -> str:
  extra = "" if ld_alpha is None else f":ld={ld_alpha!r}"
  h = hashlib.sha256(f"{dataset.fingerprint()}:{ref_fingerprint}:{chunk_size}{extra}".encode())
  return h.hexdigest()[:20]


def compute_reference_table(spec: state_lib.StateSpec, ref_state: nnx.State, dataset: PreferenceDataset, *,
                            batch_size: int, pad_multiple: int, max_length: int, chunk_size: int,
                            ld_alpha: float | None = None) -> np.ndarray:
  """float32 ``[N, 2]``: the reference's summed response log-probs of (chosen, rejected) per pair.

  With ``ld_alpha`` (LD-DPO) the sums carry its token weights, as the live reference forward would.

  Every process runs the same batches (each loads its slice) and receives the whole result, so
  every process ends with the whole table.
  """
  mesh = spec.mesh
  table = np.zeros((len(dataset), 2), np.float32)
  chunk_size *= sharding.batch_parallelism(mesh)  # tokens per device (see state.per_device_chunks)
  # LoRA: ``ref_state`` is the policy's state and the reference its base with the adapters off.
  ref_shardings = spec.shardings if spec.reference_is_base else spec.ref_shardings

  def sums(ref_state, batch):
    if spec.reference_is_base:
      ref = nnx.merge(spec.graphdef, ref_state)[0].base_view()
    else:
      ref = nnx.merge(spec.ref_graphdef, ref_state)
    both = concat_sides(batch)
    logps, _ = token_log_probs(ref, both.sequences, both.segment_ids, None, chunk_size)
    n = batch.chosen.batch_size
    weights = None
    if ld_alpha is not None:
      counts = jnp.sum(both.response_mask, axis=-1).astype(jnp.float32)
      shared = jnp.minimum(counts[:n], counts[n:])
      rows = jnp.broadcast_to(jnp.arange(2 * n)[:, None], both.response_mask.shape)
      weights = losses.ld_token_weights(both.response_mask, rows, jnp.concatenate([shared, shared]), ld_alpha)
    s = losses.sequence_stats(logps, both.response_mask, token_weights=weights).logp_sum
    return jnp.stack([s[:n], s[n:]], axis=1)

  compiled: dict[Any, Any] = {}
  for i, local in enumerate(eval_batches(dataset, batch_size, jax.process_index(), jax.process_count(),
                                         pad_multiple, max_length)):
    batch = state_lib.global_batch(local, mesh, with_pair_mask=False)
    key = batch.chosen.length
    if key not in compiled:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      compiled[key] = memory.compile_now(
          jax.jit(sums, in_shardings=(ref_shardings, state_lib.batch_shardings(batch)),
                  out_shardings=replicated), ref_state, batch)
    with mesh:
      out = np.asarray(jax.device_get(compiled[key](ref_state, batch)))
    start = i * batch_size
    real = min(batch_size, len(dataset) - start)
    table[start:start + real] = out[:real]
  return table


def load_or_compute(workdir: str, name: str, spec, ref_state, dataset: PreferenceDataset, **kwargs) -> np.ndarray:
  """The cached table for this data and these reference weights, computed (and saved) if absent."""
  weights = frozen(ref_state) if spec.reference_is_base else ref_state  # LoRA: the base only
  key = cache_key(dataset, weights_fingerprint(weights), kwargs["chunk_size"], kwargs.get("ld_alpha"))
  path = storage.join(workdir, "ref_logps", f"{name}-{key}.npz")
  if storage.isfile(path):
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
      if z["table"].shape == (len(dataset), 2):
        logging.info("reference log-probs: using the cache %s", path)
        return z["table"]
  table = compute_reference_table(spec, ref_state, dataset, **kwargs)
  if jax.process_index() == 0:
    buf = io.BytesIO()
    np.savez(buf, table=table)
    storage.write_bytes(path, buf.getvalue())  # complete or invisible (local or gs://)
  logging.info("reference log-probs: computed for %d pairs (%s)", len(dataset), path)
  return table
