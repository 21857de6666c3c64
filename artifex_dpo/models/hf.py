"""Hugging Face import/export for :class:`LlamaModel` (Llama, Mistral, Qwen2): the names in one place.

The work is split by job, over one table of tensor layouts:

* :mod:`artifex_dpo.models.hf_config`: ``config.json`` <-> :class:`ModelConfig`;
* :mod:`artifex_dpo.models.hf_layout`: how each of our parameters is stored as HF tensors, file names;
* :mod:`artifex_dpo.models.hf_read`: slice-wise reading (local mmap, or byte ranges on a bucket);
* :mod:`artifex_dpo.models.hf_export`: atomic export, each host writing its own files.

This module re-exports their public names (and the two the PEFT export shares) for existing imports.
"""

from artifex_dpo.models.hf_config import HF_ARCHITECTURES, config_from_hf, config_to_hf
from artifex_dpo.models.hf_export import (
    EXPORT_DTYPES,
    _replace_dir,
    _to_host,
    clean_stale_exports,
    export_hf,
    plan_export,
    plan_shards,
    replace_dir,
)
from artifex_dpo.models.hf_layout import (
    EXPORT_INFO_FILE,
    INDEX_FILE,
    LAYOUTS,
    SINGLE_FILE,
    TOKENIZER_FILES,
    Layout,
    TensorSpec,
    param_specs,
)
from artifex_dpo.models.hf_read import (
    CheckpointReader,
    RangedSafetensors,
    load_hf_checkpoint,
    load_hf_params,
    make_block_reader,
)

__all__ = [
    "EXPORT_DTYPES", "EXPORT_INFO_FILE", "HF_ARCHITECTURES", "INDEX_FILE", "LAYOUTS", "SINGLE_FILE", "TOKENIZER_FILES",
    "CheckpointReader", "Layout", "RangedSafetensors", "TensorSpec", "clean_stale_exports", "config_from_hf",
    "config_to_hf", "export_hf", "load_hf_checkpoint", "load_hf_params", "make_block_reader", "param_specs",
    "plan_export", "plan_shards", "replace_dir",
]
