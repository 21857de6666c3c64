"""Model configuration for the Llama-family decoder (Llama, Mistral, Qwen2)."""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots_saveable")
ATTENTION_IMPLS = ("xla", "splash", "splash_interpret")  # = models.attention.ATTENTION_IMPLS
_LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama-family decoder-only transformer.

  Field semantics follow Hugging Face's ``LlamaConfig`` / ``MistralConfig`` /
  ``Qwen2Config``. The config is immutable; derive variants with
  :meth:`replace`.
  """

  # Number of token ids (rows of the embedding table).
  vocab_size: int
  # Width of the residual stream (D).
  hidden_size: int
  # Width of the SwiGLU MLP hidden layer (F).
  intermediate_size: int
  # Number of decoder layers (L).
  num_layers: int
  # Number of query heads (N).
  num_heads: int
  # Number of key/value heads (K); N must be a multiple of K (GQA).
  num_kv_heads: int
  # Size of one attention head; None means hidden_size // num_heads.
  head_dim: int | None = None
  # RoPE base wavelength.
  rope_theta: float = 10000.0
  # HF rope scaling dict: None / rope_type "default" = plain RoPE, or "llama3".
  rope_scaling: dict[str, Any] | None = None
  # Epsilon inside the RMSNorm square root.
  rms_norm_eps: float = 1e-5
  # If True the output projection is the transposed embedding table.
  tie_word_embeddings: bool = False
  # If True q/k/v projections carry a bias (Qwen2).
  attention_bias: bool = False
  # Max distance i - j (exclusive) a token may attend back to; None = unlimited.
  sliding_window: int | None = None
  # Longest context the model was trained for (metadata; not enforced).
  max_position_embeddings: int = 4096
  # Beginning-of-sequence token id, if any.
  bos_token_id: int | None = None
  # End-of-sequence token id, if any.
  eos_token_id: int | None = None
  # Padding token id, if any.
  pad_token_id: int | None = None
  # Architecture family name: "llama" | "mistral" | "qwen2" (for HF export).
  architecture: str = "llama"
  # Compute dtype of activations: "float32" | "bfloat16".
  dtype: str = "float32"
  # Storage dtype of parameters: "float32" | "bfloat16".
  param_dtype: str = "float32"
  # Rematerialisation of each scanned layer: "none" | "full" | "dots_saveable".
  remat: str = "none"
  # Layers per iteration of the layer scan (1: a loop over layers, num_layers: fully unrolled;
  # unrolling small models lets XLA fuse across layers, which helps on CPU).
  scan_unroll: int = 1
  # Query positions per attention block: a query block skips the key blocks wholly after it
  # (exact under the causal mask); 0 runs one dense attention over the whole row.
  attention_block: int = 128
  # Attention implementation: "xla" (models/attention.py, any backend), "splash" (the Pallas TPU
  # kernel, models/splash.py) or "splash_interpret" (that kernel in the Pallas interpreter: CPU tests).
  attention_impl: str = "xla"
  # Mesh the splash kernel is shard_mapped over; None: unsharded. Runtime only
  # (set by state.build_state_spec), never exported.
  attention_mesh: Any = None

  def __post_init__(self):
    if self.rope_scaling is not None:
      # Store a plain dict copy so callers cannot mutate our state by alias.
      object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
    if (
        self.head_dim is None
        and isinstance(self.num_heads, int)
        and isinstance(self.hidden_size, int)
        and self.num_heads > 0
    ):
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    self.validate()

  def __hash__(self):
    items = []
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, dict):
        v = tuple(sorted(v.items()))
      items.append(v)
    return hash(tuple(items))

  def validate(self) -> None:
    """Checks every field.

    Raises:
      ValueError: naming the first invalid field.
    """
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "max_position_embeddings",
    ):
      _check_positive_int(name, getattr(self, name))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads"
          f" ({self.num_kv_heads})"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
      raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
    if not isinstance(self.rms_norm_eps, (int, float)) or self.rms_norm_eps <= 0:
      raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
    if self.sliding_window is not None:
      _check_positive_int("sliding_window", self.sliding_window)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
    for name in ("tie_word_embeddings", "attention_bias"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    _check_choice("architecture", self.architecture, ARCHITECTURES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    if not isinstance(self.scan_unroll, int) or self.scan_unroll < 1:
      raise ValueError(f"scan_unroll must be an int >= 1, got {self.scan_unroll!r}")
    if not isinstance(self.attention_block, int) or self.attention_block < 0:
      raise ValueError(f"attention_block must be an int >= 0, got {self.attention_block!r}")
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    validate_rope_scaling(self.rope_scaling)

  def replace(self, **kwargs: Any) -> ModelConfig:
    """Returns a copy with the given fields replaced (and re-validated).

    Passing ``head_dim=None`` re-derives it from hidden_size // num_heads.
    """
    return dataclasses.replace(self, **kwargs)

  @property
  def rope_type(self) -> str:
    """The RoPE variant: "default" or "llama3"."""
    if not self.rope_scaling:
      return "default"
    return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))


def validate_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
  """Checks an HF-style rope scaling dict.

  Args:
    rope_scaling: None, ``{"rope_type": "default"}`` or a Llama-3 dict with
      factor, low_freq_factor, high_freq_factor and
      original_max_position_embeddings.

  Raises:
    ValueError: for an unsupported rope_type or a missing/invalid key.
  """
  if rope_scaling is None:
    return
  if not isinstance(rope_scaling, dict):
    raise ValueError(f"rope_scaling must be a dict or None, got {rope_scaling!r}")
  rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
  if rope_type == "default":
    return
  if rope_type != "llama3":
    raise ValueError(
        f"rope_scaling: unsupported rope_type {rope_type!r} (supported: None,"
        " 'default', 'llama3')"
    )
  for key in _LLAMA3_ROPE_KEYS:
    v = rope_scaling.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"rope_scaling[{key!r}] must be a positive number, got {v!r}")
  if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
    raise ValueError("rope_scaling: high_freq_factor must exceed low_freq_factor")


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
