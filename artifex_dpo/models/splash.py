"""TPU attention with JAX's Pallas splash-attention kernel (``jax.experimental.pallas.ops.tpu``).

The kernel computes causal (optionally sliding-window) softmax attention block by block in VMEM:
nothing of size ``[T, T]`` reaches HBM in either pass, and key blocks that the static mask rules
out wholly (the future; outside the window) are skipped. Packed rows keep their sequences apart
with the kernel's segment ids (query i sees key j only where ``seg[i] == seg[j]``).

Semantics against :func:`artifex_dpo.models.llama.make_attention_mask` (the XLA path): the same
for every non-padding query. Padding queries (segment 0) see the padding keys before them here,
only themselves there; no real token ever sees padding in either, so the losses, metrics and
gradients are unchanged.

Shared-prompt rows (``prefix_ids``) let a branch token see a second segment (its prompt). Plain
segment ids cannot express that; :func:`splash_attention` takes ``prefix_ids`` and runs two
kernel passes whose softmaxes are merged by their log-sum-exps (the union of two disjoint key
sets): one over each token's own segment, one from each branch token to its prompt.

Sharding: the kernel is a custom call that XLA cannot partition, so it runs under ``shard_map``
over the model's mesh: batch rows over ``(data, fsdp)``, heads over ``tensor`` (each shard keeps
whole GQA groups when the KV heads divide by ``tensor``). Every device runs the same program; no
host-dependent shapes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
# Rows are padded to a multiple of this (the TPU lane width); blocks are the largest of
# _BLOCKS dividing the padded length (MaxText's v5p default is 512).
_ALIGN = 128
_BLOCKS = (512, 256, 128)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logging.warning("%s", message)


def _block(length: int) -> int:
  return next(b for b in _BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=32)
def _kernel(length: int, heads: int, window: int | None, interpret: bool, save_residuals: bool) -> Any:
  """The kernel for ``heads`` query heads over rows of ``length`` (mask analysis is numpy, cached)."""
  if window is None:
    one = sm.CausalMask((length, length))
  else:
    # Key j is visible to query i iff i - window < j <= i: HF Mistral's rule on row indices.
    one = sm.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  mask = sm.MultiHeadMask([one] * heads)
  b = _block(length)
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  # The kernel holds its block tables as arrays: make them constants even when first built inside a
  # trace (a scan, a remat, a grad), so the cached kernel never holds a tracer.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret,
                              save_residuals=save_residuals)


def _local_attention(q, k, v, seg, prefix, *, window, interpret):
  """One shard: ``q [b, T, n, H]``, ``k, v [b, T, k, H]``, ``seg``/``prefix [b, T]`` -> ``[b, T, n, H]``."""
  b, t, n, h = q.shape
  pad = -t % _ALIGN
  if pad:
    # Padding at the end (segment 0) is never seen by a real token: the mask is causal.
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)))
    prefix = None if prefix is None else jnp.pad(prefix, ((0, 0), (0, pad)))
  length = t + pad
  # [b, T, heads, H] -> [b, heads, T, H]; the kernel takes unscaled scores: scale q here.
  qt = jnp.swapaxes(q * jnp.asarray(h ** -0.5, q.dtype), 1, 2)
  kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  if prefix is None:
    kernel = _kernel(length, n, window, interpret, False)
    out = jax.vmap(kernel)(qt, kt, vt, sk.SegmentIds(seg, seg))
  else:
    from artifex_dpo.models.splash_prefix import prefix_attention

    out = prefix_attention(_kernel(length, n, window, interpret, True), qt, kt, vt, seg, prefix)
  return jnp.swapaxes(out, 1, 2)[:, :t]


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    prefix_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    mesh: Any = None,
    interpret: bool = False,
) -> jax.Array:
  """Causal GQA attention of packed rows with the splash kernel.

  Args:
    q: ``[B, T, N, H]`` queries (unscaled; ``1/sqrt(H)`` is applied here).
    k: ``[B, T, K, H]`` keys, ``N % K == 0``.
    v: ``[B, T, K, H]`` values.
    segment_ids: int ``[B, T]``; 0 = padding, k > 0 = k-th packed sequence.
    prefix_ids: int ``[B, T]`` or None; per token, an earlier segment it also attends to (shared
      prompts, see :func:`artifex_dpo.models.llama.make_attention_mask`).
    sliding_window: HF Mistral window (in row positions) or None.
    mesh: the ``(data, fsdp, tensor)`` Mesh to ``shard_map`` over, or None (one device; on more,
      XLA gathers the inputs of the kernel, which it cannot partition).
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``[B, T, N, H]`` in ``q.dtype``.
  """
  local = functools.partial(_local_attention, window=sliding_window, interpret=interpret)
  if mesh is None or mesh.empty or mesh.size == 1:
    return local(q, k, v, segment_ids, prefix_ids)
  shape = dict(mesh.shape)
  batch_axes = tuple(a for a in BATCH_AXES if shape.get(a, 1) > 1)
  rows = int(np.prod([shape[a] for a in batch_axes]))
  heads = shape.get(HEAD_AXIS, 1)
  if q.shape[0] % rows:
    _warn_once(f"splash attention: {q.shape[0]} rows do not divide over {batch_axes} ({rows}); "
               "running it unsharded (XLA gathers the inputs)")
    return local(q, k, v, segment_ids, prefix_ids)
  head_axis = HEAD_AXIS if heads > 1 and k.shape[2] % heads == 0 else None
  if heads > 1 and head_axis is None:
    _warn_once(f"splash attention: {k.shape[2]} KV heads do not divide over tensor={heads}; heads stay "
               "replicated within each row shard")
  row = batch_axes or None
  qkv = P(row, None, head_axis, None)
  ids = P(row, None)
  if prefix_ids is None:
    fn, args, specs = lambda q, k, v, s: local(q, k, v, s, None), (q, k, v, segment_ids), (qkv, qkv, qkv, ids)
  else:
    fn, args, specs = local, (q, k, v, segment_ids, prefix_ids), (qkv, qkv, qkv, ids, ids)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)
