"""Masked grouped-query attention with a memory-lean, recompute-based backward pass.

The forward keeps only ``q, k, v``, the output and the per-query log-sum-exp; the backward
recomputes the probabilities from them (the FlashAttention-2 backward, done densely):

    p  = exp(s - lse)              s = q k^T / sqrt(d) + bias
    dv = p^T do      dp = do v^T   D = rowsum(do * o)
    ds = p * (dp - D) / sqrt(d)    dq = ds k     dk = ds^T q

Compared with differentiating a plain softmax attention, nothing of size ``[B, N, T, T]`` is kept
between the passes and the backward runs a handful of elementwise passes over the scores instead
of a dozen, which is where the time of a dense attention goes on CPU. The mask arrives as an
additive ``bias`` built once per forward (not per layer) by :func:`attention_bias`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# model.attention_impl values (config key) and ModelConfig.attention_impl values (resolved; the
# Pallas interpreter runs the TPU kernel on CPU, for tests).
ATTENTION_IMPL_KEYS = ("auto", "splash", "xla")
ATTENTION_IMPLS = ("xla", "splash", "splash_interpret")


def resolve_attention_impl(name: str, platform: str) -> str:
  """``model.attention_impl`` -> ModelConfig.attention_impl: auto is splash on TPU, xla elsewhere.

  Raises:
    ValueError: an unknown name, or splash where the backend is not a TPU.
  """
  if name not in ATTENTION_IMPL_KEYS:
    raise ValueError(f"must be one of {', '.join(ATTENTION_IMPL_KEYS)}, got {name!r}")
  if name == "auto":
    return "splash" if platform == "tpu" else "xla"
  if name == "splash" and platform != "tpu":
    raise ValueError(f"splash is a TPU kernel and the backend is {platform}; use auto or xla")
  return name


class SplashMask(NamedTuple):
  """The splash path's per-forward mask inputs (instead of the XLA path's ``[B, 1, T, T]`` bias)."""

  segment_ids: jax.Array  # int32 [B, T]
  prefix_ids: jax.Array | None = None  # int32 [B, T] (shared prompts) or None


# Finite, so that exp(bias - max) is exactly 0 without producing NaNs from (-inf) - (-inf).
_MASKED = -1e30


def attention_bias(allowed: jax.Array) -> jax.Array:
  """Additive float32 bias from a boolean mask (True = attend): 0 where allowed, -1e30 elsewhere.

  Args:
    allowed: bool ``[B, 1, Tq, Tk]`` (e.g. from ``make_attention_mask``). Each query must be
      allowed at least one key (its own position), so every row of probabilities is well defined.

  Returns:
    float32 array of the same shape.
  """
  return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)


def _grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, t, n, h = q.shape
  return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _scores(qg: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
  """float32 scores ``[B, K, G, Tq, Tk]`` of grouped queries ``[B, Tq, K, G, H]``."""
  scale = qg.shape[-1] ** -0.5
  s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=jnp.float32)
  return s * scale + bias[:, :, None]


def _forward(q, k, v, bias):
  num_kv = k.shape[2]
  qg = _grouped(q, num_kv)
  s = _scores(qg, k, bias)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgqs,bskh->bqkgh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o / jnp.moveaxis(denom, (1, 2, 3), (2, 3, 1))  # [B, K, G, Tq, 1] -> [B, Tq, K, G, 1]
  lse = m + jnp.log(denom)
  return o.reshape(q.shape).astype(q.dtype), lse


@jax.custom_vjp
def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
  """Softmax attention ``softmax(q k^T / sqrt(d) + bias) v`` with grouped KV heads.

  Args:
    q: ``[B, T, N, H]`` queries.
    k: ``[B, S, K, H]`` keys, ``N % K == 0`` (each KV head serves ``N // K`` query heads).
    v: ``[B, S, K, H]`` values.
    bias: float32 ``[B, 1, T, S]`` from :func:`attention_bias` (never differentiated).

  Returns:
    ``[B, T, N, H]`` in ``q.dtype``; scores, softmax and accumulation are float32.
  """
  return _forward(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
  o, lse = _forward(q, k, v, bias)
  return o, (q, k, v, bias, o, lse)


def _attention_bwd(res, do):
  q, k, v, bias, o, lse = res
  num_kv = k.shape[2]
  qg, dog, og = (_grouped(x, num_kv) for x in (q, do, o))
  p = jnp.exp(_scores(qg, k, bias) - lse)
  dv = jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do.dtype), dog, preferred_element_type=jnp.float32)
  dp = jnp.einsum("bqkgh,bskh->bkgqs", dog, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqkgh,bqkgh->bkgq", dog.astype(jnp.float32), og.astype(jnp.float32))[..., None]
  ds = (p * (dp - delta) * (q.shape[-1] ** -0.5)).astype(q.dtype)
  dq = jnp.einsum("bkgqs,bskh->bqkgh", ds, k, preferred_element_type=jnp.float32).reshape(q.shape)
  dk = jnp.einsum("bkgqs,bqkgh->bskh", ds, qg, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(bias)


dot_product_attention.defvjp(_attention_fwd, _attention_bwd)
