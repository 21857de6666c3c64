"""Shared-prompt attention with the splash kernel: two segment-masked passes merged by log-sum-exp.

A branch token of a shared-prompt row (``prefix_ids > 0``) attends to its own segment and to its
prompt's segment: a union of two disjoint key sets, which one segment-id mask cannot express. Each
set is a plain segment mask, so the kernel runs twice over the row:

* pass A: queries and keys by ``segment_ids`` (every token, its own segment);
* pass B: query ids ``prefix_ids`` (branch tokens), keys by ``segment_ids``: branch -> prompt.

Softmax over a union of disjoint sets merges exactly (as in FlashAttention's split-KV and
cascade attention): ``lse = logaddexp(lse_A, lse_B)``, ``o = e^(lse_A - lse) o_A + e^(lse_B - lse)
o_B``. The kernel's own VJP cannot differentiate through its log-sum-exp output, so this has a
VJP of its own: the union's gradient is the sum of each pass's kernel backward run with the
*merged* ``o`` and ``lse`` (``p = exp(s - lse)``, ``D = rowsum(do * o)``), which is how the kernel
splits its backward over key blocks anyway. Tokens without a prefix give pass B no weight in the
forward and a zero cotangent in the backward. Cost: two kernel passes (the segment ids do not
skip blocks; the causal mask does), against the XLA path's dense ``[T, T]`` scores.

Uses the kernel module's backward function ``_splash_attention_bwd`` (private to JAX 0.10.2,
which the project pins).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk


def _pass_ids(seg: jax.Array, prefix: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pass B's query ids (own segment where no prefix: well defined, weighted 0) and the gate."""
  gate = (prefix > 0) & (prefix != seg)
  return jnp.where(gate, prefix, seg), gate


def _forward(kernel, q, k, v, seg, prefix):
  q_ids, gate = _pass_ids(seg, prefix)
  run = jax.vmap(kernel)
  o_a, (lse_a,) = run(q, k, v, sk.SegmentIds(seg, seg))
  o_b, (lse_b,) = run(q, k, v, sk.SegmentIds(q_ids, seg))
  lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
  lse_b = jnp.where(gate[:, None, :], lse_b, -jnp.inf)
  lse = jnp.logaddexp(lse_a, lse_b)
  w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
  o = (w_a * o_a.astype(jnp.float32) + w_b * o_b.astype(jnp.float32)).astype(q.dtype)
  return o, lse, q_ids, gate


def prefix_attention(kernel: Any, q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array,
                     prefix: jax.Array) -> jax.Array:
  """Attention of ``q [b, n, T, H]`` (already scaled) over ``k, v [b, kv, T, H]``.

  Args:
    kernel: a splash kernel built with ``save_residuals=True`` (returns ``(out, (lse,))``).
    q, k, v: head-major per-row arrays, as the kernel takes them (batch leading).
    seg: int ``[b, T]`` segment ids.
    prefix: int ``[b, T]`` prefix segment per token (0: none).

  Returns:
    ``[b, n, T, H]`` in ``q.dtype``.
  """
  kw = kernel.kwargs

  def bwd_one(q, k, v, ids, o, lse, do):
    res = (q, k, v, ids, None, o, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
    grads = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"],
                                     kw["residual_checkpoint_name"], kw["mask_function"],
                                     kw["attn_logits_soft_cap"], kw["interpret"], res, do)
    return grads[3:6]

  @jax.custom_vjp
  def attend(q, k, v, seg, prefix):
    return _forward(kernel, q, k, v, seg, prefix)[0]

  def fwd(q, k, v, seg, prefix):
    o, lse, q_ids, gate = _forward(kernel, q, k, v, seg, prefix)
    return o, (q, k, v, seg, q_ids, gate, o, lse)

  def bwd(res, do):
    q, k, v, seg, q_ids, gate, o, lse = res
    run = jax.vmap(bwd_one)
    da = run(q, k, v, sk.SegmentIds(seg, seg), o, lse, do)
    db = run(q, k, v, sk.SegmentIds(q_ids, seg), o, lse, jnp.where(gate[:, None, :, None], do, 0).astype(do.dtype))
    grads = tuple((a.astype(jnp.float32) + b.astype(jnp.float32)).astype(x.dtype) for a, b, x in zip(da, db, (q, k, v)))
    return (*grads, None, None)

  attend.defvjp(fwd, bwd)
  return attend(q, k, v, seg, prefix)
