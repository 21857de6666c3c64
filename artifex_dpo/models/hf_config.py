"""Hugging Face ``config.json`` <-> :class:`ModelConfig` (Llama, Mistral, Qwen2).

Pure dictionaries: no arrays, no jax. Reading and writing the weights live in
:mod:`artifex_dpo.models.hf_read` and :mod:`artifex_dpo.models.hf_export`, over the tensor
layouts of :mod:`artifex_dpo.models.hf_layout`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from artifex_dpo import storage
from artifex_dpo.models.config import ModelConfig

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}
_HF_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


def _read_config_json(path_or_dict: str | os.PathLike | dict[str, Any]) -> tuple[dict, str]:
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict), "<config dict>"
  path = str(path_or_dict)
  if storage.isdir(path):
    path = storage.join(path, "config.json")
  if not storage.isfile(path):
    raise ValueError(f"no config.json found at {path}")
  return json.loads(storage.read_text(path)), path


def _architecture(hf: dict[str, Any], source: str) -> str:
  archs = hf.get("architectures") or []
  for a in archs:
    if a in HF_ARCHITECTURES:
      return HF_ARCHITECTURES[a]
  if not archs and hf.get("model_type") in _ARCH_TO_HF:
    return hf["model_type"]
  name = archs[0] if archs else hf.get("model_type")
  raise ValueError(
      f"unsupported architecture {name!r} in {source}; supported: {sorted(HF_ARCHITECTURES)}"
  )


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling) from either transformers-5 ``rope_parameters`` or v4 keys."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    raise ValueError("per-layer-type rope_parameters are not supported")
  params = dict(params or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = params or legacy
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling.pop("type")
  scaling.pop("rope_theta", None)
  if not scaling or scaling.get("rope_type", "default") == "default":
    return float(theta), None
  return float(theta), scaling


def _sliding_window(hf: dict[str, Any], arch: str, num_layers: int, source: str) -> int | None:
  if arch == "llama":
    return None
  window = hf.get("sliding_window")
  if arch == "mistral":
    return window
  # qwen2: a window only on layers >= max_window_layers, and only if use_sliding_window.
  layer_types = hf.get("layer_types")
  if layer_types is None:
    if not hf.get("use_sliding_window", False) or window is None:
      return None
    start = hf.get("max_window_layers", num_layers)
    layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
  kinds = set(layer_types)
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and window is not None:
    return window
  raise ValueError(f"{source}: mixed full/sliding attention layers are not supported ({layer_types})")


def _first_id(v: Any) -> int | None:
  if isinstance(v, (list, tuple)):
    return int(v[0]) if v else None
  return None if v is None else int(v)


def config_from_hf(
    path_or_dict: str | os.PathLike | dict[str, Any],
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: str | None = None,
) -> ModelConfig:
  """Reads an HF ``config.json`` (a folder, the file, or its dict) into a ModelConfig.

  Args:
    path_or_dict: HF model folder, path to config.json, or the parsed dict.
    dtype: compute dtype; default: the checkpoint's ``torch_dtype``/``dtype``
      (float16 maps to float32), else float32.
    param_dtype: parameter dtype; default as ``dtype``.
    remat: remat policy (default "none").

  Returns:
    The config. ``eos_token_id`` lists keep their first id.

  Raises:
    ValueError: unsupported architecture, activation, bias or rope type (names the file).
  """
  hf, source = _read_config_json(path_or_dict)
  arch = _architecture(hf, source)
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: unsupported hidden_act {hf['hidden_act']!r} (need 'silu')")
  if hf.get("mlp_bias", False):
    raise ValueError(f"{source}: mlp_bias=True is not supported")
  ckpt_dtype = _HF_DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"))
  ckpt_dtype = ckpt_dtype or "float32"
  dtype = dtype or ckpt_dtype
  num_layers = int(hf["num_hidden_layers"])
  num_heads = int(hf["num_attention_heads"])
  theta, scaling = _rope_settings(hf)
  try:
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=hf.get("head_dim") or None,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        sliding_window=_sliding_window(hf, arch, num_layers, source),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
        architecture=arch,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        remat=remat or "none",
    )
  except (ValueError, KeyError) as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
  """The HF ``config.json`` dict for ``config`` (loadable by transformers 4.4x and 5.x).

  Raises:
    ValueError: when the architecture cannot express the config (e.g. a Llama with a
      sliding window, a Qwen2 without q/k/v bias).
  """
  arch = config.architecture
  if arch == "qwen2" and not config.attention_bias:
    raise ValueError("qwen2 export needs attention_bias=True (Qwen2 always has q/k/v bias)")
  if arch == "mistral" and config.attention_bias:
    raise ValueError("mistral export does not support attention_bias=True")
  if arch == "llama" and config.sliding_window is not None:
    raise ValueError("llama export does not support sliding_window; use architecture='mistral'")
  scaling = dict(config.rope_scaling) if config.rope_type == "llama3" else None
  rope_parameters = {"rope_theta": config.rope_theta, **(scaling or {"rope_type": "default"})}
  out: dict[str, Any] = {
      "architectures": [_ARCH_TO_HF[arch]],
      "model_type": arch,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": scaling,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "pad_token_id": config.pad_token_id,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": torch_dtype,
  }
  if arch == "llama":
    out.update(attention_bias=config.attention_bias, mlp_bias=False)
  elif arch == "mistral":
    out["sliding_window"] = config.sliding_window
  else:
    sliding = config.sliding_window is not None
    out.update(
        use_sliding_window=sliding,
        sliding_window=config.sliding_window,
        max_window_layers=0 if sliding else config.num_layers,
    )
  return out



def generation_config(config: ModelConfig) -> dict[str, Any]:
  """A minimal ``generation_config.json`` dict: the token ids ``config`` knows."""
  out: dict[str, Any] = {"_from_model_config": True}
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if getattr(config, k) is not None:
      out[k] = getattr(config, k)
  return out
