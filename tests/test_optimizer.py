"""``setup.build_optimizer`` against hand computations: clipping, the first AdamW update, the schedules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from artifex_dpo import config as config_lib
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.setup import build_optimizer


def _cfg(**optim):
  c = config_lib.default_config()
  c.train.steps = 100
  c.optim.update(dict(dict(warmup_steps=0, schedule="constant", learning_rate=0.1), **optim))
  return c


def _apply(tx, grads, params, times=1):
  """The updates of ``times`` successive steps with the same gradients."""
  state, out = tx.init(params), []
  for _ in range(times):
    updates, state = tx.update(grads, state, params)
    out.append(jax.tree.map(np.asarray, updates))
  return out


@pytest.mark.parametrize("clip,scale", [(1.0, 0.1), (0.0, 1.0), (20.0, 1.0)])
def test_a_norm_10_gradient_is_clipped_to_the_configured_norm(clip, scale):
  tx, _ = build_optimizer(_cfg(name="sgd", grad_clip_norm=clip, learning_rate=0.5))
  grads = {"w": jnp.array([[6.0, 0.0], [0.0, 0.0]]), "b": jnp.array([8.0])}  # global norm 10
  params = jax.tree.map(jnp.zeros_like, grads)
  [updates] = _apply(tx, grads, params)
  # SGD: the update is -lr * g, with g scaled to norm 1 when clipping at 1 (untouched below the clip).
  np.testing.assert_allclose(updates["w"], [[-0.5 * 6.0 * scale, 0.0], [0.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], [-0.5 * 8.0 * scale], rtol=1e-6)


def test_first_adamw_update_with_clipping_and_decay_only_on_weight_matrices():
  lr, wd, eps, clip = 0.01, 0.1, 0.5, 1.0  # a large eps keeps the clipped gradient's size visible
  tx, _ = build_optimizer(_cfg(name="adamw", learning_rate=lr, weight_decay=wd, eps=eps, grad_clip_norm=clip))
  model = LlamaModel(get_preset("llama-tiny", vocab_size=32, attention_bias=True), rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  [updates] = _apply(tx, grads, params)
  g_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  norm = math.sqrt(sum(float((g ** 2).sum()) for g in g_leaves))
  assert norm > clip
  decayed = set()
  for (path, u), (_, p), g in zip(nnx.to_flat_state(updates), nnx.to_flat_state(params), g_leaves, strict=True):
    name = "/".join(map(str, path))
    gc = g * clip / norm
    # Step 1 of Adam: m_hat = g, v_hat = g^2 (bias-corrected), so the step is g / (|g| + eps).
    want = gc / (np.abs(gc) + eps)
    # Documented: decoupled weight decay on weights, not on norms and biases.
    if "norm" not in name and "bias" not in name:
      want = want + wd * np.asarray(p.get_value(), np.float64)
      decayed.add(name)
    np.testing.assert_allclose(np.asarray(u.get_value()), -lr * want, rtol=1e-5, atol=1e-9, err_msg=name)
  assert "layers/q_bias" not in decayed and "final_norm" not in decayed and "embed" in decayed


def _hand_schedule(s, *, lr, warmup, steps, end_fraction, kind):
  if s < warmup:
    return lr * s / warmup
  t = min(s - warmup, steps - warmup) / (steps - warmup)
  end = lr * end_fraction
  if kind == "cosine":
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * t))
  return lr + (end - lr) * t


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_and_decay_schedules_with_end_lr_fraction(kind, warmup):
  lr, steps, frac = 2e-3, 100, 0.1
  c = _cfg(name="sgd", schedule=kind, warmup_steps=warmup, learning_rate=lr, end_lr_fraction=frac, grad_clip_norm=0.0)
  tx, schedule = build_optimizer(c)
  hand = lambda s: _hand_schedule(s, lr=lr, warmup=warmup, steps=steps, end_fraction=frac, kind=kind)
  for s in (0, 1, 5, 9, 10, 11, 40, 55, 99, 100, 120):
    np.testing.assert_allclose(float(schedule(s)), hand(s), rtol=1e-5, atol=1e-12, err_msg=f"step {s}")
  np.testing.assert_allclose(float(schedule(steps)), lr * frac, rtol=1e-5)
  # The optimizer applies the schedule: update k (0-based) is -schedule(k) * g.
  updates = _apply(tx, {"w": jnp.ones((2,))}, {"w": jnp.zeros((2,))}, times=3)
  for k, u in enumerate(updates):
    np.testing.assert_allclose(u["w"], -hand(k), rtol=1e-5, atol=1e-12, err_msg=f"update {k}")
