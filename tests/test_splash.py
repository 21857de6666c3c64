"""The Pallas splash kernel (run in the Pallas interpreter on CPU) against the XLA attention.

Oracle: ``causal_attention`` over ``make_attention_mask`` (itself checked against numpy and
``jax.nn.dot_product_attention`` in test_attention.py). Outputs are compared at real (non-padding)
queries and gradients under a cotangent that is zero at padding queries: the two paths differ
only in what padding queries see (see models/splash.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from artifex_dpo import config as config_lib
from artifex_dpo.models import LlamaModel, get_preset, make_attention_mask
from artifex_dpo.models.attention import SplashMask, attention_bias, resolve_attention_impl
from artifex_dpo.models.llama import attention_inputs, causal_attention
from artifex_dpo.models.splash import splash_attention
from artifex_dpo.setup import build_model_config

ROOT = Path(__file__).resolve().parents[1]
# 300 positions: padded to 384 inside, three 128-blocks (block skipping and the padding are exercised).
B, T, N, K, H = 2, 300, 4, 2, 32


def _qkv(seed):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, T, K, H)).astype(np.float32)
  v = rng.standard_normal((B, T, K, H)).astype(np.float32)
  cot = rng.standard_normal((B, T, N, H)).astype(np.float32)
  return (jnp.asarray(x) for x in (q, k, v, cot))


def _packed():
  """Row 0: three packed sequences, right padding; row 1: one sequence after left padding."""
  seg = np.zeros((B, T), np.int32)
  seg[0, :90], seg[0, 90:230], seg[0, 230:285] = 1, 2, 3
  seg[1, 40:] = 1
  return seg, None, None


def _shared():
  """Shared-prompt rows as data/packing.py lays them out (prompt head 3j+1, branches 3j+2, 3j+3).

  Pair 0: a 50-token prompt head, branches of 60 and 45 tokens; pair 1: an empty prompt head
  (a one-token prompt: the branches see no prefix tokens); then padding.
  """
  seg, prefix, pos = (np.zeros((B, T), np.int32) for _ in range(3))
  pieces = [(1, 0, 50, 0), (2, 1, 60, 50), (3, 1, 45, 50), (5, 4, 30, 0), (6, 4, 20, 0)]
  start = 0
  for s, p, n, p0 in pieces:
    seg[:, start:start + n], prefix[:, start:start + n] = s, p
    pos[:, start:start + n] = np.arange(p0, p0 + n)
    start += n
  seg[1, 155:] = prefix[1, 155:] = pos[1, 155:] = 0  # row 1 ends after pair 0
  return seg, prefix, pos


def _check(layout, window, seed):
  seg, prefix, pos = layout()
  q, k, v, cot = _qkv(seed)
  real = jnp.asarray(seg > 0)[:, :, None, None]
  cot = cot * real
  seg_j = jnp.asarray(seg)
  prefix_j = None if prefix is None else jnp.asarray(prefix)
  mask = make_attention_mask(seg_j, window, prefix_ids=prefix_j, positions=None if pos is None else jnp.asarray(pos))
  xla = lambda q, k, v: causal_attention(q, k, v, attention_bias(mask), 0)
  splash = lambda q, k, v: splash_attention(q, k, v, seg_j, prefix_ids=prefix_j, sliding_window=window,
                                            interpret=True)
  want, got = xla(q, k, v), splash(q, k, v)
  np.testing.assert_allclose(np.asarray(got * real), np.asarray(want * real), atol=2e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)
  g_want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", g_got, g_want):
    assert float(jnp.max(jnp.abs(w))) > 0.1, name  # the cotangent reaches every input
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=3e-5, err_msg=name)


def test_gqa_packed_segments_and_padding():
  _check(_packed, None, 0)


def test_sliding_window():
  _check(_packed, 37, 1)


def test_shared_prompts_merge_two_kernel_passes():
  _check(_shared, None, 2)


def _model_outputs(impl, layout):
  cfg = get_preset("llama-tiny", attention_impl=impl, num_layers=1)
  model = LlamaModel(cfg, rngs=nnx.Rngs(0))
  seg, prefix, pos = layout()
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  kw = dict(segment_ids=jnp.asarray(seg))
  if prefix is not None:
    kw.update(prefix_ids=jnp.asarray(prefix), positions=jnp.asarray(pos))
  weights = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, cfg.vocab_size)), jnp.float32)
  weights = weights * jnp.asarray(seg > 0)[:, :, None]

  def loss(m):
    return jnp.sum(m(tokens, **kw) * weights)

  kernels = str(jax.make_jaxpr(lambda: loss(model))()).count("pallas_call")
  value, grads = nnx.value_and_grad(loss)(model)
  return value, nnx.state(grads, nnx.Param), kernels


def test_model_with_splash_matches_xla_path():
  """LlamaModel end to end (RoPE, GQA heads, the SplashMask dispatch): loss and every weight gradient."""
  v_xla, g_xla, kernels_xla = _model_outputs("xla", _shared)
  v_spl, g_spl, kernels_spl = _model_outputs("splash_interpret", _shared)
  assert kernels_xla == 0 and kernels_spl > 0  # the splash model really ran the kernel
  np.testing.assert_allclose(float(v_spl), float(v_xla), rtol=1e-5)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g_spl), jax.tree_util.tree_leaves_with_path(g_xla)):
    scale = float(np.max(np.abs(np.asarray(b))))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_attention_impl_is_decided_by_the_backend():
  assert resolve_attention_impl("auto", "tpu") == "splash"
  assert resolve_attention_impl("auto", "cpu") == resolve_attention_impl("auto", "gpu") == "xla"
  assert resolve_attention_impl("xla", "tpu") == "xla"
  c = config_lib.default_config()
  assert build_model_config(c, platform="tpu").attention_impl == "splash"
  assert build_model_config(c).attention_impl == "xla"  # this CPU
  # Shared prompts under a sliding window stay on the XLA path (the window counts positions).
  ids = jnp.ones((1, 8), jnp.int32)
  mistral = get_preset("llama-tiny", attention_impl="splash", sliding_window=4)
  assert isinstance(attention_inputs(mistral, ids, ids, None), SplashMask)
  assert isinstance(attention_inputs(mistral.replace(sliding_window=None), ids, ids, ids), SplashMask)
  assert attention_inputs(mistral, ids, ids, ids).shape == (1, 1, 8, 8)
  c.model.attention_impl = "splash"
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl: splash is a TPU kernel"):
    build_model_config(c)
  c.model.attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl"):
    config_lib.validate(c, check_files=False)


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from artifex_dpo.models.splash import splash_attention
rng = np.random.default_rng(0)
B, T, N, K, H = 4, 256, 4, 2, 32
q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
seg = jnp.asarray(np.repeat([[1, 2]], B, 0).repeat(T // 2, 1), jnp.int32)
mesh = Mesh(np.asarray(jax.devices()).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
f = lambda mesh: jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, mesh=mesh, interpret=True))
want, got = f(None)(q, k, v), f(mesh)(q, k, v)
hlo = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, mesh=mesh, interpret=True)).lower(q, k, v).as_text()
assert "manual_computation" in hlo, "not shard_mapped"
np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
print("ok")
"""


def test_shard_map_over_rows_and_tensor_heads():
  """Rows over fsdp=2 and GQA groups over tensor=2 (each shard: 2 query heads, their 1 KV head)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
