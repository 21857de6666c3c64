"""artifex-dpo: Direct Preference Optimization (DPO, IPO, SimPO, ...) for decoder LLMs on JAX.

The public names are imported lazily (PEP 562), so modules without JAX (``artifex_dpo.tpu_chips``, used by the
launchers) import without pulling in JAX.
"""

import importlib

_PUBLIC = {
    "DPOConfig": "artifex_dpo.dpo_config",
    "DPOTrainer": "artifex_dpo.trainer",
    "GeneratedSequenceBatch": "artifex_dpo.types",
    "PreferenceBatch": "artifex_dpo.types",
    "UnpairedBatch": "artifex_dpo.types",
}
__all__ = list(_PUBLIC)


def __getattr__(name):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f"module 'artifex_dpo' has no attribute {name!r}")
