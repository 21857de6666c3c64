"""Named model configurations (shapes match the Hugging Face checkpoints)."""

from __future__ import annotations

from typing import Any

from artifex_dpo.models.config import ModelConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_LLAMA31_COMMON: dict[str, Any] = dict(
    vocab_size=128256,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=_LLAMA3_ROPE,
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    bos_token_id=128000,
    eos_token_id=128001,
    architecture="llama",
)

_QWEN2_COMMON: dict[str, Any] = dict(
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    attention_bias=True,
    max_position_embeddings=131072,
    bos_token_id=151643,
    eos_token_id=151643,
    architecture="qwen2",
)

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny model for CPU tests and demos (trained from scratch).
    "llama-tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        architecture="llama",
    ),
    # meta-llama/Llama-3.1-8B.
    "llama3-8b": dict(
        _LLAMA31_COMMON,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
    ),
    # meta-llama/Llama-3.1-70B.
    "llama3-70b": dict(
        _LLAMA31_COMMON,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
    ),
    # Qwen/Qwen2-0.5B (tied embeddings).
    "qwen2-0.5b": dict(
        _QWEN2_COMMON,
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2-7B.
    "qwen2-7b": dict(
        _QWEN2_COMMON,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
    ),
    # mistralai/Mistral-7B-v0.1.
    "mistral-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=4096,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=2,
        architecture="mistral",
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """Builds the named preset's :class:`ModelConfig`.

  Args:
    name: one of :data:`PRESETS`.
    **overrides: fields to replace (e.g. ``dtype="bfloat16"``, ``remat="full"``).

  Returns:
    The validated config.

  Raises:
    ValueError: unknown preset name (the message lists the known names) or an
      invalid override.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
  fields = dict(PRESETS[name])
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except TypeError as e:  # unknown override keyword
    raise ValueError(f"invalid override for preset {name!r}: {e}") from None
