"""Tests for the Llama-family model: shapes, masking, packing, remat, RoPE, presets."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from artifex_dpo.models import (
    LOGICAL_AXES,
    PRESETS,
    LlamaModel,
    ModelConfig,
    apply_rope,
    count_params,
    default_positions,
    forward_flops_per_token,
    get_preset,
    make_attention_mask,
    rope_frequencies,
)

TINY = get_preset("llama-tiny")


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> LlamaModel:
  return LlamaModel(cfg, rngs=nnx.Rngs(seed))


def _tokens(shape, seed=0, vocab=TINY.vocab_size):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


@pytest.fixture(scope="module")
def model():
  return _model()


def test_shapes_and_dtypes(model):
  """Shapes and dtypes only; the values are checked against transformers (test_hf, test_token_logps)."""
  tokens = _tokens((2, 8))
  logits = model(tokens)
  assert logits.shape == (2, 8, TINY.vocab_size) and logits.dtype == jnp.float32
  hidden = model.hidden_states(tokens)
  assert hidden.shape == (2, 8, TINY.hidden_size) and hidden.dtype == jnp.float32
  assert model.unembedding().shape == (TINY.hidden_size, TINY.vocab_size)
  assert model.layers.q_proj.shape == (2, 64, 4, 16)
  assert model.layers.k_proj.shape == (2, 64, 2, 16)
  assert model.layers.o_proj.shape == (2, 4, 16, 64)
  assert model.layers.down_proj.shape == (2, 128, 64)


def test_param_dtype_and_init():
  m = _model(TINY.replace(param_dtype="bfloat16", attention_bias=True))
  for _, p in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    assert p.get_value().dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(m.layers.input_norm[...], np.float32), 1.0)
  np.testing.assert_array_equal(np.asarray(m.layers.q_bias[...], np.float32), 0.0)
  std = float(np.std(np.asarray(m.layers.gate_proj[...], np.float32)))
  assert 0.018 < std < 0.022


def test_every_param_has_logical_axes():
  m = _model(TINY.replace(attention_bias=True))
  flat = list(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  names = {p for p, _ in flat}
  assert ("layers", "q_bias") in names and ("lm_head",) in names
  for path, p in flat:
    axes = p.get_metadata()["logical_axes"]
    assert len(axes) == p.get_value().ndim, path
    assert set(axes) <= set(LOGICAL_AXES), path
    assert (axes[0] == "layers") == (path[0] == "layers"), path
  assert m.layers.q_proj.logical_axes == ("layers", "embed", "q_heads", "head_dim")
  assert m.layers.k_proj.logical_axes == ("layers", "embed", "kv_heads", "head_dim")
  assert m.embed.logical_axes == ("vocab", "embed")


def test_tied_embeddings():
  m = _model(TINY.replace(tie_word_embeddings=True))
  assert m.lm_head is None
  assert ("lm_head",) not in dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
  np.testing.assert_array_equal(m.unembedding(), m.embed[...].T)


def test_causal(model):
  a = _tokens((1, 10), seed=1)
  b = a.at[0, 6].set((a[0, 6] + 1) % TINY.vocab_size)
  la, lb = model(a), model(b)
  np.testing.assert_array_equal(la[:, :6], lb[:, :6])
  assert float(jnp.abs(la[:, 6:] - lb[:, 6:]).max()) > 1e-4


def test_default_positions():
  seg = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 2, 2, 2]])
  pos = default_positions(seg)
  np.testing.assert_array_equal(pos[0, :3], [0, 1, 2])
  np.testing.assert_array_equal(pos[1, 2:], [0, 1, 2])
  np.testing.assert_array_equal(pos[2], [0, 1, 0, 1, 2])


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(model, side):
  seq = _tokens((1, 6), seed=2)
  ref = model(seq)[0]
  pad = jnp.zeros((1, 4), jnp.int32) + 7
  if side == "right":
    tokens = jnp.concatenate([seq, pad], axis=1)
    seg = jnp.array([[1] * 6 + [0] * 4])
    real = slice(0, 6)
  else:
    tokens = jnp.concatenate([pad, seq], axis=1)
    seg = jnp.array([[0] * 4 + [1] * 6])
    real = slice(4, 10)
  out = model(tokens, segment_ids=seg)[0]
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out[real], ref, atol=1e-5, rtol=0)


def test_packing(model):
  a, b = _tokens((1, 5), seed=3), _tokens((1, 4), seed=4)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  out = model(packed, segment_ids=seg)[0]
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out[:5], model(a)[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[5:9], model(b)[0], atol=1e-5, rtol=0)


def _loss_and_grad(cfg, tokens):
  graphdef, state = nnx.split(_model(cfg))

  def loss(state):
    return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens))[..., 0])

  fn = jax.value_and_grad(loss)
  return fn(state), jax.make_jaxpr(fn)(state)


def test_remat_options_same_output_and_grad():
  tokens = _tokens((2, 8), seed=5)
  (ref_loss, ref_grad), ref_jaxpr = _loss_and_grad(TINY.replace(remat="none"), tokens)
  assert "checkpoint" not in str(ref_jaxpr) and "remat" not in str(ref_jaxpr)
  for remat in ("full", "dots_saveable"):
    (loss, grad), jaxpr = _loss_and_grad(TINY.replace(remat=remat), tokens)
    assert "checkpoint" in str(jaxpr) or "remat" in str(jaxpr)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_bf16_compute():
  tokens = _tokens((2, 8), seed=6)
  ref = _model()(tokens)
  m = _model(TINY.replace(dtype="bfloat16"))
  assert m.hidden_states(tokens).dtype == jnp.bfloat16
  out = m(tokens)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  assert float(jnp.abs(out - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_attention_mask_matches_hand_built():
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
  for window in (None, 3):
    got = np.asarray(make_attention_mask(jnp.asarray(seg), window))
    assert got.shape == (2, 1, 10, 10)
    for b in range(2):
      for i in range(10):
        for j in range(10):
          want = j <= i and seg[b, i] == seg[b, j] and seg[b, i] != 0
          if window is not None:
            want = want and i - j < window
          want = want or i == j
          assert got[b, 0, i, j] == want, (window, b, i, j)


def test_sliding_window_model():
  """One layer: with window W, token i only sees tokens i-W+1..i (RoPE is relative)."""
  w = 3
  cfg = TINY.replace(num_layers=1)
  full = _model(cfg)
  windowed = _model(cfg.replace(sliding_window=w))
  tokens = _tokens((1, 9), seed=7)
  out = windowed(tokens)[0]
  # Row i holds tokens max(0, i-W+1)..i, left-padded to length W (padding invariance
  # is tested above), so one batched call gives every window's last-token logits.
  rows, segs = [], []
  for i in range(9):
    ctx = np.asarray(tokens[0, max(0, i - w + 1) : i + 1])
    rows.append(np.concatenate([np.zeros(w - len(ctx), np.int32), ctx]))
    segs.append([0] * (w - len(ctx)) + [1] * len(ctx))
  want = full(jnp.asarray(np.stack(rows)), segment_ids=jnp.asarray(segs))[:, -1]
  np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)
  assert float(jnp.abs(out - full(tokens)[0]).max()) > 1e-3


def _meta_llama3_scaling(freqs, factor, low, high, old_len):
  """Meta's reference apply_scaling (llama-models), written independently."""
  low_wavelen, high_wavelen = old_len / low, old_len / high
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      out.append(freq)
    elif wavelen > low_wavelen:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama3_rope_frequencies():
  cfg = get_preset("llama3-8b")
  base = [1.0 / (cfg.rope_theta ** (2 * i / cfg.head_dim)) for i in range(cfg.head_dim // 2)]
  want = _meta_llama3_scaling(base, 8.0, 1.0, 4.0, 8192)
  got = rope_frequencies(cfg)
  assert got.shape == (64,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  wavelen = 2 * math.pi / np.array(base)
  assert (wavelen < 2048).any() and (wavelen > 8192).any()
  assert ((wavelen >= 2048) & (wavelen <= 8192)).any()  # the smoothed band is exercised
  plain = rope_frequencies(cfg.replace(rope_scaling=None))
  np.testing.assert_allclose(plain, base, rtol=1e-5)


def test_apply_rope_is_complex_rotation():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 3, 8).astype(np.float32)
  pos = rng.randint(0, 100, (2, 5))
  inv = rope_frequencies(TINY.replace(head_dim=8))
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, :, None, None] * inv)
  want = np.concatenate([z.real, z.imag], axis=-1)
  np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv), want, atol=1e-4)


def test_eval_shape_llama3_8b_param_count():
  cfg = get_preset("llama3-8b")
  abstract = nnx.eval_shape(lambda: LlamaModel(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(x.size for x in leaves) == 8_030_261_248 == count_params(cfg)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama3-70b", 70_553_706_496),
        ("qwen2-0.5b", 494_032_768),
        ("qwen2-7b", 7_615_616_512),
        ("mistral-7b", 7_241_732_096),
    ],
)
def test_preset_param_counts(name, expected):
  assert count_params(get_preset(name)) == expected


def test_presets_and_overrides():
  assert set(PRESETS) >= {"llama-tiny", "llama3-8b", "llama3-70b", "qwen2-0.5b", "qwen2-7b", "mistral-7b"}
  cfg = get_preset("llama3-8b", dtype="bfloat16", remat="full")
  assert cfg.dtype == "bfloat16" and cfg.remat == "full" and cfg.rope_type == "llama3"
  assert get_preset("qwen2-0.5b").tie_word_embeddings and get_preset("qwen2-7b").attention_bias
  assert get_preset("mistral-7b").sliding_window == 4096
  with pytest.raises(ValueError, match="llama3-8b"):
    get_preset("gpt-17")
  with pytest.raises(ValueError, match="remat"):
    get_preset("llama-tiny", remat="sometimes")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(dtype="float16"), "dtype"),
        (dict(param_dtype="int8"), "param_dtype"),
        (dict(architecture="gpt2"), "architecture"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(eos_token_id=-1), "eos_token_id"),
    ],
)
def test_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    TINY.replace(**kwargs)


def test_config_defaults_and_replace():
  cfg = ModelConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=4)
  assert cfg.head_dim == 8 and cfg.rope_type == "default"
  assert cfg.replace(rope_scaling={"rope_type": "default"}).rope_type == "default"
  assert hash(get_preset("llama3-8b")) == hash(get_preset("llama3-8b"))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.vocab_size = 3  # type: ignore[misc]


def test_forward_flops_per_token():
  cfg = get_preset("llama3-8b")
  t = 4096
  embed = cfg.vocab_size * cfg.hidden_size
  norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size
  matmul = 2 * (count_params(cfg) - embed - norms)  # lm_head counted, embedding lookup not
  attn_full = 4 * cfg.num_layers * t * cfg.num_heads * cfg.head_dim
  assert forward_flops_per_token(cfg, t, causal=False) == pytest.approx(matmul + attn_full)
  assert forward_flops_per_token(cfg, t) == pytest.approx(matmul + attn_full * (t + 1) / (2 * t))
  mistral = get_preset("mistral-7b")
  short = forward_flops_per_token(mistral, 4096)
  long_ = forward_flops_per_token(mistral, 32768)
  assert long_ > short  # the window caps attention, but mean keys still grow to ~W
  assert long_ < forward_flops_per_token(mistral.replace(sliding_window=None), 32768)


def test_shared_prompt_mask_needs_explicit_positions(model):
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="need explicit positions"):
    model.hidden_states(tokens, segment_ids=jnp.ones_like(tokens), prefix_ids=jnp.ones_like(tokens))
