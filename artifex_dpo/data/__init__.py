"""Preference data: sources, tokenizers, record formats, and the Grain loader.

Modules by job: ``sources`` (files -> records), ``tokenizer``, ``formats`` (record -> token pair,
truncation), ``dataset`` (`PreferenceDataset` and its first pass over the files), ``cache`` (that
pass tokenized once into the workdir), ``order`` (global order, process slices, eval split),
``batches`` (padded batch arrays), ``packing`` (packed rows), ``loader`` (`PreferenceLoader`,
eval batches), ``train_eval_sets`` (`build_datasets`: a run's sets from its config, with the
synthetic fallback), ``synthetic``, ``unpaired`` / ``unpaired_loader`` (KTO).

Typical use::

  tok = load_tokenizer(cfg.data.tokenizer)
  ds = PreferenceDataset.from_files(cfg.data.train_files, tok, max_length=..., ...)
  train, evaluation = eval_split(ds, cfg.data.eval_split, cfg.data.seed)
  loader = PreferenceLoader(train, global_batch_size, seed=..., process_index=...,
                            process_count=..., pad_multiple=64, max_length=..., start_step=step)
  for step, batch in loader: ...
"""

from artifex_dpo.data.batches import BATCH_ARRAY_KEYS, make_batch, pad_length
from artifex_dpo.data.dataset import PreferenceDataset
from artifex_dpo.data.errors import DataError
from artifex_dpo.data.formats import (
    TokenizedPair,
    TruncationSettings,
    detect_record_format,
    parse_record,
    record_to_pair,
    tokenize_pairs,
    truncate_pair,
)
from artifex_dpo.data.loader import PreferenceLoader, eval_batches
from artifex_dpo.data.order import batch_indices, eval_split, global_batch_indices, global_order, process_slice
from artifex_dpo.data.packing import (
    PackingPlan,
    default_max_pairs_per_row,
    make_packed_batch,
    plan_packing,
)
from artifex_dpo.data.sources import expand_files, read_records
from artifex_dpo.data.tokenizer import Tokenizer, load_tokenizer
from artifex_dpo.data.train_eval_sets import build_datasets

__all__ = [
    "BATCH_ARRAY_KEYS",
    "DataError",
    "PackingPlan",
    "PreferenceDataset",
    "PreferenceLoader",
    "TokenizedPair",
    "Tokenizer",
    "TruncationSettings",
    "batch_indices",
    "build_datasets",
    "default_max_pairs_per_row",
    "detect_record_format",
    "eval_batches",
    "eval_split",
    "expand_files",
    "global_batch_indices",
    "global_order",
    "load_tokenizer",
    "make_batch",
    "make_packed_batch",
    "pad_length",
    "parse_record",
    "plan_packing",
    "process_slice",
    "read_records",
    "record_to_pair",
    "tokenize_pairs",
    "truncate_pair",
]
