"""artifex-dpo: Direct Preference Optimization (DPO, IPO, SimPO, ...) for decoder LLMs on JAX."""

from artifex_dpo.dpo_config import DPOConfig
from artifex_dpo.trainer import DPOTrainer
from artifex_dpo.types import GeneratedSequenceBatch, PreferenceBatch, UnpairedBatch

__all__ = ["DPOConfig", "DPOTrainer", "GeneratedSequenceBatch", "PreferenceBatch", "UnpairedBatch"]
