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
  allowed = np.asarray(make_attention_mask(jnp.asarray(seg), window))
  got = causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), attention_bias(jnp.asarray(allowed)), block)
  np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, allowed), atol=2e-5)


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


def test_bias_gets_no_gradient_and_bf16_keeps_dtype():
  q, k, v, seg = _inputs(3)
  bias = attention_bias(make_attention_mask(jnp.asarray(seg), None))
  g_bias = jax.grad(lambda b: jnp.sum(dot_product_attention(q, k, v, b)))(bias)
  assert not np.any(np.asarray(g_bias))
  out = dot_product_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), bias)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(dot_product_attention(q, k, v, bias)), atol=0.05)
