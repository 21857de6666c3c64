"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in Flax NNX with scanned layers.

Numerics follow Hugging Face's PyTorch implementation: RMSNorm computed in float32
and cast back before the weight multiply, RoPE with the ``rotate_half`` convention
(first half / second half of each head), grouped-query attention, SwiGLU MLP.

Every parameter is an ``nnx.Param`` carrying ``logical_axes`` metadata (names from
:data:`LOGICAL_AXES`); per-layer weights are stacked along a leading ``layers`` axis
and the forward runs ``jax.lax.scan`` over them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_dpo.models.attention import attention_bias, dot_product_attention
from artifex_dpo.models.config import ModelConfig

LOGICAL_AXES = ("layers", "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_INIT_STD = 0.02


def to_jnp_dtype(name: str) -> Any:
  """Maps "float32" / "bfloat16" to the jnp dtype."""
  return _DTYPES[name]


# ----------------------------------------------------------------------------- pure functions


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies, exactly as HF computes them (float32).

  Args:
    config: the model config (uses head_dim, rope_theta, rope_scaling).

  Returns:
    float32 array ``[head_dim // 2]``; for ``rope_type == "llama3"`` the Llama 3.1
    frequency-dependent scaling is applied (low frequencies divided by ``factor``,
    high ones kept, the band in between smoothly interpolated).
  """
  dim = config.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
  if config.rope_type != "llama3":
    return inv_freq
  rs = config.rope_scaling
  factor = np.float32(rs["factor"])
  low, high = np.float32(rs["low_freq_factor"]), np.float32(rs["high_freq_factor"])
  old_len = np.float32(rs["original_max_position_embeddings"])
  low_freq_wavelen = old_len / low
  high_freq_wavelen = old_len / high
  wavelen = np.float32(2 * np.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array | np.ndarray, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """``(cos, sin)`` ``[B, T, 1, head_dim]`` for :func:`rotate`, computed in float32, cast to ``dtype``.

  Built once per forward and shared by every layer.
  """
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies precomputed RoPE tables to ``x`` ``[B, T, heads, head_dim]`` (``rotate_half`` convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array | np.ndarray) -> jax.Array:
  """Rotates ``x`` by its positions (HF ``rotate_half`` convention).

  Args:
    x: ``[B, T, heads, head_dim]``.
    positions: int ``[B, T]``.
    inv_freq: float32 ``[head_dim // 2]`` from :func:`rope_frequencies`.

  Returns:
    The rotated array, same shape and dtype as ``x`` (cos/sin computed in float32
    and cast to ``x.dtype``, as HF does).
  """
  return rotate(x, *rope_tables(positions, inv_freq, x.dtype))


def default_positions(segment_ids: jax.Array) -> jax.Array:
  """Position of each token within its own segment (restarts at 0 at each segment start).

  A segment is a maximal run of equal ids, so left padding (a run of zeros), right
  padding and packed rows all get per-sequence positions 0, 1, 2, ...

  Args:
    segment_ids: int ``[B, T]``.

  Returns:
    int32 ``[B, T]``.
  """
  seg = jnp.asarray(segment_ids)
  idx = jnp.broadcast_to(jnp.arange(seg.shape[-1], dtype=jnp.int32), seg.shape)
  is_start = jnp.concatenate(
      [jnp.ones_like(seg[..., :1], dtype=bool), seg[..., 1:] != seg[..., :-1]], axis=-1
  )
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=seg.ndim - 1)
  return idx - start


def make_attention_mask(
    segment_ids: jax.Array,
    sliding_window: int | None = None,
    *,
    prefix_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> jax.Array:
  """Boolean attention mask from segment ids.

  Query i may attend to key j iff ``j <= i``, key j is in query i's nonzero segment (or, with
  ``prefix_ids``, in the segment ``prefix_ids[i]`` names: a shared prompt), and (when
  ``sliding_window`` is set) the two are less than the window apart (HF's Mistral rule), counted
  in ``positions`` when given, else in row indices. Every query also attends to itself, so
  fully-padded queries stay finite.

  Args:
    segment_ids: int ``[B, T]``; 0 = padding, k > 0 = k-th packed sequence.
    sliding_window: window length or None.
    prefix_ids: int ``[B, T]`` or None; per token, a segment it may attend to besides its own
      (0: none). The prefix segment must lie before the token in the row.
    positions: int ``[B, T]`` or None; token positions, for the sliding window.

  Returns:
    bool ``[B, 1, T, T]`` (True = attend), broadcastable over heads.
  """
  seg = jnp.asarray(segment_ids)
  t = seg.shape[-1]
  q_idx = jnp.arange(t)[:, None]
  k_idx = jnp.arange(t)[None, :]
  allowed = (k_idx <= q_idx)[None]
  if sliding_window is not None:
    if positions is None:
      allowed = allowed & (q_idx - k_idx < sliding_window)[None]
    else:
      pos = jnp.asarray(positions)
      allowed = allowed & (pos[:, :, None] - pos[:, None, :] < sliding_window)
  same = seg[:, :, None] == seg[:, None, :]
  if prefix_ids is not None:
    same = same | (jnp.asarray(prefix_ids)[:, :, None] == seg[:, None, :])
  same = same & (seg[:, None, :] != 0)
  mask = (same & allowed) | (q_idx == k_idx)[None]
  return mask[:, None, :, :]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: Any) -> jax.Array:
  """HF RMSNorm: normalise in float32, cast to ``dtype``, then multiply by the weight."""
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  normed = (x32 * jax.lax.rsqrt(var + eps)).astype(dtype)
  return weight.astype(dtype) * normed


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, block: int) -> jax.Array:
  """Attention under a causal mask, skipping the key blocks that lie wholly in the future.

  Queries are cut into blocks of ``block`` positions; block ``i`` attends only to keys
  ``[0, end of block i)``, which is exact because ``bias`` never lets a query see a later key.
  That skips about half of the score matrix (more for long rows). ``block <= 0`` or a row no
  longer than one block runs a single dense attention.

  Args:
    q: ``[B, T, N, H]``; k, v: ``[B, T, K, H]``.
    bias: float32 ``[B, 1, T, T]`` from :func:`attention_bias` of a causal mask.
    block: query positions per block.

  Returns:
    ``[B, T, N, H]``.
  """
  t = q.shape[1]
  if block <= 0 or t <= block:
    return dot_product_attention(q, k, v, bias)
  outs = []
  for start in range(0, t, block):
    end = min(t, start + block)
    outs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], bias[:, :, start:end, :end]))
  return jnp.concatenate(outs, axis=1)


def decoder_layer(
    x: jax.Array,
    params: dict[str, jax.Array],
    *,
    bias: jax.Array,
    rope: tuple[jax.Array, jax.Array],
    config: ModelConfig,
) -> jax.Array:
  """One pre-norm decoder layer (attention + SwiGLU MLP), pure.

  Args:
    x: residual stream ``[B, T, D]`` in compute dtype.
    params: one layer's weights (the per-layer slice of :class:`DecoderLayers`).
    bias: float32 ``[B, 1, T, T]`` attention bias (:func:`attention_bias` of
      :func:`make_attention_mask`), shared by all layers.
    rope: ``(cos, sin)`` from :func:`rope_tables`, shared by all layers.
    config: the model config.

  Returns:
    The updated residual stream, same shape and dtype.
  """
  dt = to_jnp_dtype(config.dtype)
  w = {k: v.astype(dt) for k, v in params.items()}
  h = rms_norm(x, w["input_norm"], config.rms_norm_eps, dt)
  q = jnp.einsum("btd,dnh->btnh", h, w["q_proj"])
  k = jnp.einsum("btd,dkh->btkh", h, w["k_proj"])
  v = jnp.einsum("btd,dkh->btkh", h, w["v_proj"])
  if "q_bias" in w:
    q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
  q, k = rotate(q, *rope), rotate(k, *rope)
  attn = causal_attention(q, k, v, bias, config.attention_block)
  x = x + jnp.einsum("btnh,nhd->btd", attn, w["o_proj"])
  h = rms_norm(x, w["post_attention_norm"], config.rms_norm_eps, dt)
  gate = jnp.einsum("btd,df->btf", h, w["gate_proj"])
  up = jnp.einsum("btd,df->btf", h, w["up_proj"])
  return x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, w["down_proj"])


def remat_policy(name: str) -> tuple[bool, Callable[..., bool] | None]:
  """Maps a config remat name to ``(use_checkpoint, policy)``."""
  if name == "none":
    return False, None
  if name == "full":
    return True, None
  if name == "dots_saveable":
    return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  raise ValueError(f"remat must be one of ('none', 'full', 'dots_saveable'), got {name!r}")


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Per-layer parameter shapes (without the layer axis) and logical axes."""
  d, f = config.hidden_size, config.intermediate_size
  n, k, hd = config.num_heads, config.num_kv_heads, config.head_dim
  shapes = {
      "q_proj": ((d, n, hd), ("embed", "q_heads", "head_dim")),
      "k_proj": ((d, k, hd), ("embed", "kv_heads", "head_dim")),
      "v_proj": ((d, k, hd), ("embed", "kv_heads", "head_dim")),
      "o_proj": ((n, hd, d), ("q_heads", "head_dim", "embed")),
      "gate_proj": ((d, f), ("embed", "mlp")),
      "up_proj": ((d, f), ("embed", "mlp")),
      "down_proj": ((f, d), ("mlp", "embed")),
      "input_norm": ((d,), ("norm",)),
      "post_attention_norm": ((d,), ("norm",)),
  }
  if config.attention_bias:
    shapes["q_bias"] = ((n, hd), ("q_heads", "head_dim"))
    shapes["k_bias"] = ((k, hd), ("kv_heads", "head_dim"))
    shapes["v_bias"] = ((k, hd), ("kv_heads", "head_dim"))
  return shapes


def count_params(config: ModelConfig) -> int:
  """Total number of parameters (embedding, layers, final norm, untied lm_head)."""
  per_layer = sum(int(np.prod(s)) for s, _ in layer_param_shapes(config).values())
  embed = config.vocab_size * config.hidden_size
  head = 0 if config.tie_word_embeddings else embed
  return embed + config.num_layers * per_layer + config.hidden_size + head


def forward_flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
  """Analytic FLOPs of one forward pass, per token, for MFU.

  Counts 2 FLOPs per multiply-add: ``2 * (matmul params)`` (q/k/v/o, MLP, lm_head;
  the embedding lookup is free), plus per layer ``2 * 2 * keys * num_heads *
  head_dim`` for ``Q K^T`` and ``A V``. With ``causal=True`` (default) ``keys`` is
  the exact mean number of keys a query attends to — ``(seq_len + 1) / 2`` without a
  sliding window, i.e. the causal half; with ``causal=False`` it is ``seq_len`` (what
  a dense XLA attention actually computes). Biases and norms are ignored.

  Args:
    config: the model config.
    seq_len: tokens per sequence.
    causal: whether to count only the causal (and windowed) part of attention.

  Returns:
    FLOPs per token (multiply by 3 for forward + backward).
  """
  d, f = config.hidden_size, config.intermediate_size
  n, k, hd = config.num_heads, config.num_kv_heads, config.head_dim
  per_layer = d * n * hd + 2 * d * k * hd + n * hd * d + 3 * d * f
  matmul = 2.0 * (config.num_layers * per_layer + d * config.vocab_size)
  if causal:
    w = seq_len if config.sliding_window is None else min(config.sliding_window, seq_len)
    # sum_{i=0}^{T-1} min(i + 1, w) / T
    keys = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
  else:
    keys = float(seq_len)
  return matmul + config.num_layers * 4.0 * keys * n * hd


# ----------------------------------------------------------------------------- modules


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


def _init_value(name: str, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  if name.endswith("norm"):
    return jnp.ones(shape, dtype)
  if name.endswith("bias"):
    return jnp.zeros(shape, dtype)
  return _normal(rngs, shape, dtype)


class DecoderLayers(nnx.Module):
  """All decoder layers, each weight stacked along a leading ``layers`` axis ``[L, ...]``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = to_jnp_dtype(config.param_dtype)
    for name, (shape, axes) in layer_param_shapes(config).items():
      full = (config.num_layers, *shape)
      value = _init_value(name, rngs, full, dtype)
      setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))
    if not config.attention_bias:
      self.q_bias = self.k_bias = self.v_bias = None

  def stacked(self) -> dict[str, jax.Array]:
    """The stacked ``[L, ...]`` arrays, keyed by parameter name."""
    return {name: getattr(self, name)[...] for name in layer_param_shapes(self.config)}

  def __call__(
      self,
      x: jax.Array,
      *,
      bias: jax.Array,
      rope: tuple[jax.Array, jax.Array],
  ) -> jax.Array:
    """Runs every layer with ``jax.lax.scan`` (remat per the config)."""
    config = self.config

    def body(carry, layer_params):
      return decoder_layer(carry, layer_params, bias=bias, rope=rope, config=config), None

    use_ckpt, policy = remat_policy(config.remat)
    if use_ckpt:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, self.stacked(), unroll=min(config.scan_unroll, config.num_layers))
    return x


class LlamaModel(nnx.Module):
  """Decoder-only Llama-family language model.

  Attributes:
    config: the :class:`ModelConfig`.
    embed: ``[V, D]`` token embedding.
    layers: :class:`DecoderLayers` (stacked per-layer weights).
    final_norm: ``[D]``.
    lm_head: ``[D, V]``, or None when embeddings are tied.
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.validate()
    self.config = config
    dtype = to_jnp_dtype(config.param_dtype)
    v, d = config.vocab_size, config.hidden_size
    self.embed = nnx.Param(_normal(rngs, (v, d), dtype), logical_axes=("vocab", "embed"))
    self.layers = DecoderLayers(config, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((d,), dtype), logical_axes=("norm",))
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = nnx.Param(_normal(rngs, (d, v), dtype), logical_axes=("embed", "vocab"))

  def unembedding(self) -> jax.Array:
    """The ``[D, V]`` output projection (``lm_head``, or ``embed.T`` when tied)."""
    if self.lm_head is None:
      return self.embed[...].T
    return self.lm_head[...]

  def hidden_states(
      self,
      tokens: jax.Array,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      prefix_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Final-norm hidden states.

    Args:
      tokens: int32 ``[B, T]``.
      segment_ids: int32 ``[B, T]``; 0 = padding, k > 0 = k-th packed sequence.
        Default: all ones (one sequence per row).
      positions: int32 ``[B, T]``; default :func:`default_positions` of segment_ids.
      prefix_ids: int32 ``[B, T]`` or None; per token, an earlier segment it also attends to
        (a shared prompt; see :func:`make_attention_mask`). Needs explicit ``positions``.

    Returns:
      ``[B, T, D]`` in the compute dtype.
    """
    config = self.config
    dt = to_jnp_dtype(config.dtype)
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if prefix_ids is not None and positions is None:
      raise ValueError("prefix_ids (shared prompts) need explicit positions")
    if positions is None:
      positions = default_positions(segment_ids)
    # Built once and shared by every layer: the mask as an additive bias, RoPE's cos/sin tables.
    mask = make_attention_mask(segment_ids, config.sliding_window, prefix_ids=prefix_ids,
                               positions=None if prefix_ids is None else positions)
    bias = attention_bias(mask)
    rope = rope_tables(positions, rope_frequencies(config), dt)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
    x = self.layers(x, bias=bias, rope=rope)
    return rms_norm(x, self.final_norm[...], config.rms_norm_eps, dt)

  def __call__(
      self,
      tokens: jax.Array,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      prefix_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Logits ``[B, T, V]`` in float32 (``hidden_states @ unembedding``)."""
    h = self.hidden_states(tokens, segment_ids=segment_ids, positions=positions, prefix_ids=prefix_ids)
    w = self.unembedding().astype(h.dtype)
    return jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
