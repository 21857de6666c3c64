"""Llama-family decoder models (Llama, Mistral, Qwen2) in Flax NNX, with HF import/export."""

from artifex_dpo.models.config import ModelConfig
from artifex_dpo.models.hf_config import config_from_hf, config_to_hf
from artifex_dpo.models.hf_export import export_hf
from artifex_dpo.models.hf_read import load_hf_checkpoint, load_hf_params
from artifex_dpo.models.llama import (
    LOGICAL_AXES,
    DecoderLayers,
    LlamaModel,
    apply_rope,
    count_params,
    decoder_layer,
    default_positions,
    forward_flops_per_token,
    make_attention_mask,
    rms_norm,
    rope_frequencies,
)
from artifex_dpo.models.presets import PRESETS, get_preset

__all__ = [
    "LOGICAL_AXES",
    "PRESETS",
    "DecoderLayers",
    "LlamaModel",
    "ModelConfig",
    "apply_rope",
    "config_from_hf",
    "config_to_hf",
    "count_params",
    "decoder_layer",
    "default_positions",
    "export_hf",
    "forward_flops_per_token",
    "get_preset",
    "load_hf_checkpoint",
    "load_hf_params",
    "make_attention_mask",
    "rms_norm",
    "rope_frequencies",
]
