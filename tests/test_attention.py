"""The custom-VJP attention and its causal block skipping against a numpy softmax and JAX's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artifex_dpo.models.attention import attention_bias, dot_product_attention
from artifex_dpo.models.llama import causal_attention, make_attention_mask

B, T, N, K, H = 2, 40, 4, 2, 8


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, T, K, H)).astype(np.float32)
  v = rng.standard_normal((B, T, K, H)).astype(np.float32)
  # Row 0: three packed sequences and right padding; row 1: one sequence after left padding.
  seg = np.zeros((B, T), np.int32)
  seg[0, :13], seg[0, 13:30], seg[0, 30:37] = 1, 2, 3
  seg[1, 5:] = 1
  return q, k, v, seg


def _numpy_mask(seg, window):
  """bool [B, 1, T, T], written from the rule, not with the code under test: key j is visible to query i
  when j <= i, both are in the same packed sequence (not padding) and, with a window, i - j < window; every
  query sees itself (so padding rows stay finite)."""
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  rule = (j <= i) & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  if window is not None:
    rule &= i - j < window
  return (rule | (i == j))[:, None]


def _numpy_attention(q, k, v, allowed):
  group = N // K
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      s = q[b, :, n] @ k[b, :, n // group].T / np.sqrt(H)
      s = np.where(allowed[b, 0], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, n // group]
  return out


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("block", [0, 16, 8])
def test_forward_matches_numpy(window, block):
  q, k, v, seg = _inputs()
  mask = make_attention_mask(jnp.asarray(seg), window)
  got = causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), attention_bias(mask), block)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, _numpy_mask(seg, window)), atol=2e-5)


@pytest.mark.parametrize("block", [0, 16])
def test_gradients_match_jax_attention(block):
  q, k, v, seg = _inputs(1)
  mask = make_attention_mask(jnp.asarray(seg), None)
  cot = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, N, H)), jnp.float32)
  ours = lambda q, k, v: jnp.sum(causal_attention(q, k, v, attention_bias(mask), block) * cot)
  theirs = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask) * cot)
  got = jax.grad(ours, argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(theirs, argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=name)


def test_hidden_keys_get_no_gradient_and_bf16_keeps_dtype():
  """The backward honours the mask: a key hidden from every query of a loss gets exactly zero gradient."""
  q, k, v, seg = _inputs(3)
  bias = attention_bias(make_attention_mask(jnp.asarray(seg), None))
  # A loss on the outputs of row 0's second sequence (positions 13..29) only.
  weight = np.zeros((B, T, N, H), np.float32)
  weight[0, 13:30] = np.random.default_rng(4).standard_normal((17, N, H))
  dk, dv = jax.grad(lambda k, v: jnp.sum(dot_product_attention(q, k, v, bias) * weight), argnums=(0, 1))(k, v)
  dk, dv = np.asarray(dk), np.asarray(dv)
  visible = np.zeros((B, T), bool)
  visible[0, 13:30] = True  # its own keys; the other sequences, the padding and row 1 are hidden
  for g in (dk, dv):
    assert not np.any(g[~visible]), np.argwhere(np.abs(g).sum((-1, -2)) * ~visible)[:5]
    assert np.all(np.abs(g[visible]).sum(-1) > 0)
  out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), bias)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(dot_product_attention(q, k, v, bias)), atol=0.05)
