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


# ------------------------------------------------------------------------------------------
# KTO (unpaired): completions once per example, KL rows for the batch order the run uses
# ------------------------------------------------------------------------------------------


def compute_sequence_sums(spec: state_lib.StateSpec, ref_state: nnx.State, rows, *, batch_size: int,
                          pad_multiple: int, max_length: int, chunk_size: int, pad_id: int = 0) -> np.ndarray:
  """float32 ``[M]``: the reference's summed completion log-probs of ``(prompt_ids, completion_ids)`` rows.

  Each row is laid out as KTO's padded rows (prompt + completion cut to ``max_length``, the
  completion scored), ``batch_size`` rows a batch; every process runs the same batches (each
  loads its slice) and receives the whole result.

  Args:
    spec: The run's state spec (mesh, reference graph and shardings).
    ref_state: The reference weights (with LoRA: the policy's state, scored with the adapters off).
    rows: ``(prompt_ids, completion_ids)`` pairs.
    batch_size: Rows per batch (``train.eval_batch_size``).
    pad_multiple: ``data.pad_multiple``.
    max_length: ``data.max_length``: rows are cut to it, as KTO's padded rows.
    chunk_size: ``dpo.logits_chunk_size``.
    pad_id: The padding id.
  """
  from artifex_dpo.data.order import process_slice
  from artifex_dpo.data.unpaired import UnpairedExample, make_unpaired_batch

  mesh = spec.mesh
  sums = np.zeros(len(rows), np.float32)
  chunk_size *= sharding.batch_parallelism(mesh)  # tokens per device (see state.per_device_chunks)
  ref_shardings = spec.shardings if spec.reference_is_base else spec.ref_shardings
  sl = process_slice(batch_size, jax.process_index(), jax.process_count())

  def score(ref_state, batch):
    if spec.reference_is_base:
      ref = nnx.merge(spec.graphdef, ref_state)[0].base_view()
    else:
      ref = nnx.merge(spec.ref_graphdef, ref_state)
    r = batch.completions
    logps, _ = token_log_probs(ref, r.sequences, r.segment_ids, r.positions, chunk_size)
    return losses.sequence_stats(logps, r.response_mask).logp_sum

  compiled: dict[Any, Any] = {}
  for start in range(0, len(rows), batch_size):
    part = [UnpairedExample(np.asarray(p, np.int32), np.asarray(c, np.int32), False)
            for p, c in rows[start:start + batch_size]]
    arrays = make_unpaired_batch(part, pad_id=pad_id, with_kl=False, pad_multiple=pad_multiple, max_length=max_length,
                                 num_rows=batch_size)
    local = {k: v[sl] for k, v in arrays.items()}
    batch = state_lib.global_batch(local, mesh, with_pair_mask=True)
    key = batch.completions.sequences.shape
    if key not in compiled:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      compiled[key] = memory.compile_now(
          jax.jit(score, in_shardings=(ref_shardings, state_lib.batch_shardings(batch)), out_shardings=replicated),
          ref_state, batch)
    with mesh:
      out = np.asarray(jax.device_get(compiled[key](ref_state, batch)))
    sums[start:start + len(part)] = out[:len(part)]
  return sums


def load_or_compute_unpaired(workdir: str, name: str, spec, ref_state, dataset, *, with_kl: bool,
                             kl_order: dict[str, Any], batch_size: int, pad_multiple: int, max_length: int,
                             chunk_size: int):
  """KTO's precomputed reference sums (:class:`~artifex_dpo.data.unpaired_loader.UnpairedReference`), cached.

  The completions are scored once per example. A KL row pairs an example's prompt with the
  completion of the example before it in its batch, so its score depends on the batch order:

  * training (``kl_order = {"steps": S, "global_batch_size": B, "seed": ..., "shuffle": ...}``): the
    KL rows of steps ``0 .. S-1`` in the run's order (:func:`train_kl_partners`), ``[S, B]``; the
    distinct (example, partner) pairs are scored once. A later run with more steps extends the
    cached table (only the new steps are scored).
  * eval (``kl_order = {"eval_batch_size": B}``): each example's KL row in the eval batches, ``[N]``.
  * ``data.packing`` (``kl_order = {"partners": [N] example indices}``): the KL rows the packing plan fixes
    (:func:`~artifex_dpo.data.unpaired.row_kl_partners`), ``[N]``; keyed by the partners themselves.

  The cache file is keyed by the data, the reference weights, the chunk size and the order's
  settings (seed, shuffle, batch size), never by the step count.

  Args:
    workdir: The run's workdir (the cache is ``ref_logps/<name>-kto-<key>.npz``).
    name: ``train`` or ``eval``.
    spec: The run's state spec.
    ref_state: The reference weights (LoRA: the policy's state).
    dataset: The :class:`~artifex_dpo.data.unpaired_loader.UnpairedDataset`.
    with_kl: Whether the loss reads KL rows (``kto``; not ``apo_zero_unpaired``).
    kl_order: The order the KL rows are paired in (above).
    batch_size: Rows per scoring batch.
    pad_multiple: ``data.pad_multiple``.
    max_length: ``data.max_length``.
    chunk_size: ``dpo.logits_chunk_size``.

  Returns:
    The :class:`~artifex_dpo.data.unpaired_loader.UnpairedReference`.
  """
  from artifex_dpo.data.unpaired_loader import UnpairedReference, eval_kl_partners, train_kl_partners

  weights = frozen(ref_state) if spec.reference_is_base else ref_state  # LoRA: the base only
  if "partners" in kl_order:  # data.packing: each example's KL partner is fixed by the packing plan
    fixed = np.asarray(kl_order["partners"], np.int64)
    kl_order = {"partners": hashlib.sha256(fixed.tobytes()).hexdigest()[:20]}
  order = sorted((k, v) for k, v in kl_order.items() if k != "steps") if with_kl else "no-kl"
  h = hashlib.sha256(f"kto:{dataset.fingerprint()}:{weights_fingerprint(weights)}:{chunk_size}:{max_length}:"
                     f"{order}".encode())
  path = storage.join(workdir, "ref_logps", f"{name}-kto-{h.hexdigest()[:20]}.npz")
  kw = dict(batch_size=batch_size, pad_multiple=pad_multiple, max_length=max_length, chunk_size=chunk_size,
            pad_id=dataset.pad_id)
  examples, n = dataset.examples, len(dataset)
  completions, kl = None, None
  if storage.isfile(path):
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
      if z["completions"].shape == (n,):
        completions = z["completions"]
        kl = z["kl"] if with_kl else None
  steps = kl_order.get("steps")
  have = 0 if kl is None else len(kl)
  if completions is not None and (not with_kl or (steps is None and have == n) or (steps is not None
                                                                                    and have >= steps)):
    logging.info("reference log-probs: using the cache %s", path)
    return UnpairedReference(completions, kl)
  fresh = completions is None
  if fresh:
    completions = compute_sequence_sums(spec, ref_state, [(e.prompt_ids, e.completion_ids) for e in examples], **kw)
    have, kl = 0, None
  if with_kl:
    if steps is None:  # eval (or data.packing): one KL row per example
      partners = fixed if "partners" in kl_order else eval_kl_partners(n, kl_order["eval_batch_size"])
      kl = compute_sequence_sums(spec, ref_state, [(examples[i].prompt_ids, examples[j].completion_ids)
                                                   for i, j in enumerate(partners)], **kw)
    else:  # training: the steps not cached yet, each distinct (example, partner) pair once
      b = kl_order["global_batch_size"]
      pairs = np.stack([np.stack(train_kl_partners(s, b, n, kl_order["seed"], kl_order["shuffle"]), axis=-1)
                        for s in range(have, steps)]).reshape(-1, 2)
      unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
      sums = compute_sequence_sums(spec, ref_state, [(examples[i].prompt_ids, examples[j].completion_ids)
                                                     for i, j in unique], **kw)
      new = sums[inverse.reshape(-1)].reshape(steps - have, b)
      kl = new if kl is None or have == 0 else np.concatenate([kl[:have], new])
  if jax.process_index() == 0:
    buf = io.BytesIO()
    np.savez(buf, completions=completions, **({"kl": kl} if with_kl else {}))
    storage.write_bytes(path, buf.getvalue())  # complete or invisible (local or gs://)
  what = "no KL rows" if not with_kl else (f"the KL rows of {n} examples" if steps is None else
                                           f"the KL rows of steps {have + 1}..{steps}")
  logging.info("reference log-probs: %d examples' completions%s, %s (%s)", n,
               "" if fresh else " (cached)", what, path)
  return UnpairedReference(completions, kl)
