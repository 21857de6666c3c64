"""The run's training and eval sets, built from its config (the one `build_datasets`).

Preference pairs are tokenized once into ``<workdir>/data_cache`` (`artifex_dpo.data.cache`); KTO's
labelled completions (`artifex_dpo.data.unpaired_loader`) are read directly. Without
``data.train_files`` the built-in synthetic set (`artifex_dpo.data.synthetic`) is written into
``<workdir>/synthetic`` and used.
"""

from __future__ import annotations

from artifex_dpo import config as config_lib
from artifex_dpo import storage
from artifex_dpo.data import cache as data_cache
from artifex_dpo.data.dataset import PreferenceDataset
from artifex_dpo.data.order import eval_split
from artifex_dpo.data.synthetic import write_synthetic
from artifex_dpo.data.unpaired_loader import UnpairedDataset


def build_datasets(c, tokenizer, workdir: str,
                   id_limit: int | None = None) -> tuple[PreferenceDataset, PreferenceDataset | None]:
  """The training and eval sets (first pass over the data; every process reads the same).

  Args:
    c: The run's config (``data.*`` and ``dpo.*`` keys are read).
    tokenizer: The tokenizer.
    workdir: The run's workdir (local or ``gs://``): holds ``data_cache/`` and ``synthetic/``.
    id_limit: Pre-tokenized ids must lie below it (the model's vocabulary; None: the tokenizer's).

  Returns:
    (train set, eval set or None): `PreferenceDataset`s, or `UnpairedDataset`s for the unpaired
    losses (KTO). Without ``data.eval_files``, ``data.eval_split`` of the training set is held out.

  Raises:
    DataError: Bad data or a bad data setting.
  """
  import jax  # not at module level: `import artifex_dpo.data` stays free of JAX

  files = c.data.train_files
  if not files:
    files = storage.join(workdir, "synthetic", "train.jsonl")
    if jax.process_index() == 0:  # one writer, then everyone reads (and keys the data cache by) it
      write_synthetic(files, c.data.synthetic_pairs, c.data.seed)
    data_cache.barrier("artifex_synthetic", jax.process_count())
  # Tokenized once into <workdir>/data_cache (split over the processes), then read on demand.
  kwargs = dict(format=None if c.data.format == "auto" else c.data.format, max_length=c.data.max_length,
                max_prompt_length=c.data.max_prompt_length, truncation_mode=c.data.truncation_mode,
                skip_invalid=c.data.skip_invalid, id_limit=id_limit, process_index=jax.process_index(),
                process_count=jax.process_count())
  if config_lib.dpo_config(c).unpaired:  # KTO: labelled completions (paired records are unpaired), not cached
    for key in ("process_index", "process_count"):  # every process reads every record (see unpaired_loader)
      kwargs.pop(key)
    train = UnpairedDataset.from_files(files, tokenizer, **kwargs)
    if c.data.eval_files:
      return train, UnpairedDataset.from_files(c.data.eval_files, tokenizer, **kwargs)
    return eval_split(train, c.data.eval_split, c.data.seed)
  cache_dir = storage.join(workdir, "data_cache")
  train = data_cache.load_or_tokenize(files, tokenizer, cache_dir, **kwargs)
  evals = data_cache.load_or_tokenize(c.data.eval_files, tokenizer, cache_dir, **kwargs) if c.data.eval_files else None
  # Earlier keys' caches go once every key this run reads is complete (process 0 only; rule in the function).
  data_cache.remove_stale_keys(cache_dir, [d.cache_key for d in (train, evals) if d is not None],
                               process_index=jax.process_index())
  if evals is not None:
    return train, evals
  return eval_split(train, c.data.eval_split, c.data.seed)  # the counters stay with the training part
