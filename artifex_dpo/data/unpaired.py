"""Unpaired (KTO) records -> labelled single completions -> padded batches with KL pairs.

Record forms (TRL's ``KTOTrainer`` data):

* **unpaired**: ``prompt`` / ``completion`` strings and a boolean ``label`` (True: desirable);
  conversational: ``prompt`` and ``completion`` lists of ``{"role", "content"}`` messages,
  rendered with the tokenizer's chat template (prompt with ``add_generation_prompt=True``; the
  completion is the whole conversation's rendering minus the prompt's); pre-tokenized:
  ``prompt_ids`` / ``completion_ids`` and ``label``.
* **paired**: any record :mod:`artifex_dpo.data.formats` reads becomes two examples, the chosen
  response desirable and the rejected one undesirable (as TRL's ``unpair_preference_dataset``).

Tokenization and truncation follow the paired records' rules (prompt with the tokenizer's
leading special tokens, EOS appended to the completion, prompt cut by ``truncation_mode``, the
completion cut to fit ``max_length``, an example whose completion would be empty is dropped).

KL pairs: KTO's reference point is estimated from mismatched (prompt, completion) pairs. As TRL
does, the completions are rotated by one within the batch: example i's KL sequence is prompt i
followed by completion i-1 (the first takes the last). Here the rotation runs over the batch as
given (the global batch in the training order), so the KL pairs depend on the batch order but
not on how many processes share the batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from artifex_dpo.data.errors import DataError
from artifex_dpo.data.formats import (TruncationSettings, _ids, _messages, _text, parse_record, special_prefix,
                                      tokenize_pairs, PairTexts, TokenizedPair, _with_eos)
from artifex_dpo.data.tokenizer import Tokenizer

UNPAIRED_KEYS = ("completion", "completion_ids", "label")
_MAX_REPORTED = 10  # skip messages kept (and logged) per read, as the paired pipeline keeps them

log = logging.getLogger(__name__)


@dataclasses.dataclass
class UnpairedExample:
  """One labelled completion as int32 token ids."""

  prompt_ids: np.ndarray
  completion_ids: np.ndarray
  label: bool


def is_unpaired_record(record: Mapping[str, Any]) -> bool:
  return any(k in record for k in UNPAIRED_KEYS)


def _label(record: Mapping[str, Any], path: str, line: int | None) -> bool:
  if "label" not in record or record["label"] is None:
    raise DataError(path, line, "missing (an unpaired record needs a boolean label)", field="label")
  value = record["label"]
  if not isinstance(value, (bool, np.bool_)):
    raise DataError(path, line, f"expected true or false, got {value!r}", field="label")
  return bool(value)


def _render_conversation(record, tokenizer: Tokenizer, path: str, line: int | None) -> tuple[str, str]:
  if not tokenizer.has_chat_template:
    raise DataError(path, line, f"conversational record, but the tokenizer {tokenizer.name} has no chat template")
  prompt = _messages(record, "prompt", path, line)
  completion = _messages(record, "completion", path, line)
  if not completion:
    raise DataError(path, line, "empty (no turns)", field="completion")
  try:
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + completion, add_generation_prompt=False)
  except Exception as e:  # jinja2.TemplateError and errors inside the template.
    raise DataError(path, line, f"chat template failed: {type(e).__name__}: {e}") from None
  if not full.startswith(prompt_text):
    raise DataError(path, line, "the chat template renders the prompt differently inside the whole conversation "
                                "(the prompt rendering is not a prefix)", field="completion")
  text = full[len(prompt_text):]
  if not text.strip():
    raise DataError(path, line, "empty after rendering", field="completion")
  return prompt_text, text


def parse_unpaired_record(record: Mapping[str, Any], tokenizer: Tokenizer, path: str = "<record>",
                          line: int | None = None, id_limit: int | None = None) -> list[UnpairedExample]:
  """Validates a record and returns its examples (one, or two for a paired record), untruncated.

  Args:
    record: The record.
    tokenizer: Needed for tokenization, chat templates and (without ``id_limit``) the vocabulary size.
    path: File name for error messages.
    line: Record number for error messages.
    id_limit: Pre-tokenized ids (``prompt_ids`` / ``completion_ids``, or a paired record's
      ``*_ids``) must lie in ``[0, id_limit)``: the model's vocabulary in a run; None: the tokenizer's.

  Raises:
    DataError: ``path:line: field: what is wrong``.
  """
  if not isinstance(record, Mapping):
    raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
  if not is_unpaired_record(record):
    parsed = parse_record(record, tokenizer, path, line, id_limit)
    pair = parsed if isinstance(parsed, TokenizedPair) else tokenize_pairs([parsed], tokenizer)[0]
    return [UnpairedExample(pair.prompt_ids, pair.chosen_ids, True),
            UnpairedExample(pair.prompt_ids, pair.rejected_ids, False)]
  label = _label(record, path, line)
  if "completion_ids" in record or "prompt_ids" in record:
    v = tokenizer.vocab_size if id_limit is None else id_limit
    return [UnpairedExample(_ids(record, "prompt_ids", v, path, line, allow_empty=True),
                            _ids(record, "completion_ids", v, path, line, allow_empty=False), label)]
  if isinstance(record.get("completion"), list) or isinstance(record.get("prompt"), list):
    prompt_text, completion = _render_conversation(record, tokenizer, path, line)
    specials = False
  else:
    prompt_text = _text(record, "prompt", path, line, allow_empty=True)
    completion = _text(record, "completion", path, line, allow_empty=False)
    specials = True
  (prompt_ids, completion_ids) = tokenizer.encode_batch([prompt_text, completion], add_special_tokens=False)
  prompt_ids = (special_prefix(tokenizer) + list(prompt_ids)) if specials else list(prompt_ids)
  return [UnpairedExample(np.asarray(prompt_ids, np.int32), _with_eos(completion_ids, tokenizer.eos_id), label)]


def truncate_example(example: UnpairedExample, settings: TruncationSettings,
                     bos_id: int | None = None) -> UnpairedExample | None:
  """The paired rules on one completion (the completion stands in for both responses); None: dropped."""
  from artifex_dpo.data.formats import truncate_pair

  pair, _ = truncate_pair(TokenizedPair(example.prompt_ids, example.completion_ids, example.completion_ids),
                          settings, bos_id)
  return None if pair is None else UnpairedExample(pair.prompt_ids, pair.chosen_ids, example.label)


@dataclasses.dataclass
class UnpairedCounts:
  """What a read of unpaired records skipped, dropped and cut (the paired pipeline's counters).

  Attributes:
    invalid: Records skipped as invalid (``skip_invalid=True``); a paired record counts once.
    dropped: Examples dropped because truncation left their completion empty.
    truncated_prompts: Kept examples whose prompt ``max_prompt_length`` cut.
    truncated_completions: Kept examples whose completion was cut to fit ``max_length`` (it then
      has no EOS).
    skipped_messages: The first few skip messages (``file:line: field: reason``).
  """

  invalid: int = 0
  dropped: int = 0
  truncated_prompts: int = 0
  truncated_completions: int = 0
  skipped_messages: list[str] = dataclasses.field(default_factory=list)


def read_unpaired(records: Iterable[tuple[str, int | None, Mapping[str, Any] | DataError]], tokenizer: Tokenizer,
                  settings: TruncationSettings | None = None, *, skip_invalid: bool = False,
                  id_limit: int | None = None,
                  counts: UnpairedCounts | None = None) -> tuple[list[UnpairedExample], int]:
  """``(path, line, record)`` triples -> truncated examples and the number dropped by truncation.

  Args:
    records: The records with their location; a record may be the ``DataError`` of a line that
      did not parse (``sources.read_records_lenient``).
    tokenizer: The tokenizer.
    settings: Truncation (None: none).
    skip_invalid: ``data.skip_invalid``: skip and count bad records instead of raising.
    id_limit: Pre-tokenized ids must lie in ``[0, id_limit)`` (None: the tokenizer's vocabulary).
    counts: Filled with the counters of this read when given.

  Raises:
    DataError: The first bad record (``file:line: field: reason``) unless ``skip_invalid``.
  """
  settings = settings or TruncationSettings()
  counts = UnpairedCounts() if counts is None else counts
  out = []
  for path, line, record in records:
    try:
      if isinstance(record, DataError):
        raise record
      examples = parse_unpaired_record(record, tokenizer, path, line, id_limit)
    except DataError as e:
      if not skip_invalid:
        raise
      counts.invalid += 1
      if len(counts.skipped_messages) < _MAX_REPORTED:
        counts.skipped_messages.append(str(e))
        log.warning("skipping invalid record: %s", e)
      continue
    for example in examples:
      kept = truncate_example(example, settings, tokenizer.bos_id)
      if kept is None:
        counts.dropped += 1
        continue
      counts.truncated_prompts += len(kept.prompt_ids) < len(example.prompt_ids)
      counts.truncated_completions += len(kept.completion_ids) < len(example.completion_ids)
      out.append(kept)
  return out, counts.dropped


def _pad_rows(rows: Sequence[tuple[np.ndarray, np.ndarray]], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """(prompt, completion) rows -> right-padded tokens, segment ids and response mask ``[N, length]``."""
  n = len(rows)
  tokens = np.full((n, length), pad_id, np.int32)
  segment_ids = np.zeros((n, length), np.int32)
  response = np.zeros((n, length), np.int32)
  for i, (p, c) in enumerate(rows):
    seq = np.concatenate([p, c])[:length]
    tokens[i, :len(seq)] = seq
    segment_ids[i, :len(seq)] = 1
    response[i, max(len(p), 1):len(seq)] = 1  # position 0 has no context: never scored
  return {"tokens": tokens, "segment_ids": segment_ids, "response_mask": response}


def make_unpaired_batch(examples: Sequence[UnpairedExample], *, pad_id: int, with_kl: bool,
                        pad_multiple: int | None = None, max_length: int | None = None,
                        example_mask: Sequence[int] | None = None, num_rows: int | None = None,
                        min_examples: int = 2) -> dict[str, np.ndarray]:
  """A padded batch: ``completion_*`` and (``with_kl``) ``kl_*`` arrays ``[N, L]``, ``labels`` ``[N]``.

  The KL sequence of example i is its prompt followed by the completion of example i-1 (rotation
  by one, TRL's rule); it is cut to ``max_length`` like the completion itself. ``num_rows`` fills
  the batch up with empty rows (``example_mask`` 0) after the real examples, which alone rotate.
  """
  if num_rows is not None and num_rows > len(examples):
    out = make_unpaired_batch(examples, pad_id=pad_id, with_kl=with_kl, pad_multiple=pad_multiple,
                              max_length=max_length, min_examples=min_examples)
    extra = num_rows - len(examples)
    for k, v in out.items():
      fill = pad_id if k.endswith("_tokens") else 0
      out[k] = np.concatenate([v, np.full((extra, *v.shape[1:]), fill, v.dtype)])
    return out
  if with_kl and len(examples) < min_examples:
    raise ValueError("KTO needs at least 2 examples per batch: with one, the KL pair is the example itself")
  if not examples:
    raise ValueError("make_unpaired_batch: no examples")
  rows = [(e.prompt_ids, e.completion_ids) for e in examples]
  kl_rows = [(e.prompt_ids, examples[i - 1].completion_ids) for i, e in enumerate(examples)] if with_kl else []
  longest = max(len(p) + len(c) for p, c in rows + kl_rows)
  if max_length is not None:
    longest = min(longest, max_length)
  length = longest if not pad_multiple else -(-longest // pad_multiple) * pad_multiple
  if max_length is not None and length > max_length:
    length = max_length
  out = {f"completion_{k}": v for k, v in _pad_rows(rows, length, pad_id).items()}
  if with_kl:
    out.update({f"kl_{k}": v for k, v in _pad_rows(kl_rows, length, pad_id).items()})
  out["labels"] = np.asarray([e.label for e in examples], np.int32)
  out["example_mask"] = np.ones(len(examples), np.int32) if example_mask is None else np.asarray(example_mask,
                                                                                                np.int32)
  return out


def make_packed_unpaired_batch(examples: Sequence[UnpairedExample], *, pad_id: int, row_length: int,
                               max_pairs_per_row: int, max_length: int | None = None, share_prompt: bool = False,
                               row_multiple: int = 1) -> dict[str, Any]:
  """KTO examples with their KL rows laid out padding-free (``data.pack_batches``) for ``PackedUnpairedBatch``.

  Example i and its KL row share prompt i, so they are packed as one pair of the paired packed layout
  (:mod:`artifex_dpo.data.packing`): chosen = completion i, rejected = the KL completion (example i-1's,
  the first takes the last, as :func:`make_unpaired_batch`), cut like the padded KL row to ``max_length``.
  With ``share_prompt`` the prompt runs once for both. The scores equal the padded batch's.

  Args:
    examples: The whole (global) batch, in order: the KL rows rotate over all of it.
    pad_id: Padding id.
    row_length: Tokens per row (``data.pack_length``; every example with its KL row must fit).
    max_pairs_per_row: Slots per row (``data.max_pairs_per_row``).
    max_length: ``data.max_length``: the cut of the KL rows (None: none).
    share_prompt: The shared-prompt layout.
    row_multiple: The row count is rounded up to a multiple of this with empty rows (devices x processes).

  Returns:
    ``tokens``, ``segment_ids``, ``response_mask`` ``[R, L]`` (and ``positions``, ``prefix_ids`` when sharing),
    ``pair_mask``, ``labels``, ``pair_indices`` (the example's position in ``examples``, -1: empty) ``[R, K]``,
    ``num_tokens``: the tokens of the padded layout's completion and KL rows (a shared prompt counted twice).
  """
  from artifex_dpo.data.dataset import PreferenceDataset
  from artifex_dpo.data.packing import make_packed_batch, packed_lengths, plan_packing

  if len(examples) < 2:
    raise ValueError("KTO needs at least 2 examples per batch: with one, the KL pair is the example itself")
  pairs = []
  for i, e in enumerate(examples):
    kl = np.asarray(examples[i - 1].completion_ids, np.int32)
    if max_length is not None:  # the padded KL row is prompt + completion cut to max_length
      kl = kl[:max(max_length - len(e.prompt_ids), 0)]
    pairs.append(TokenizedPair(np.asarray(e.prompt_ids, np.int32), np.asarray(e.completion_ids, np.int32), kl))
  dataset = PreferenceDataset.from_pairs(pairs, pad_id)
  plan = plan_packing(packed_lengths(dataset.offsets, share_prompt), row_length, max_pairs_per_row)
  rows = -(-plan.num_rows // max(1, row_multiple)) * max(1, row_multiple)
  row_ids = np.where(np.arange(rows) < plan.num_rows, np.arange(rows), -1)
  out = make_packed_batch(dataset, plan, row_ids, row_length, max_pairs_per_row, share_prompt=share_prompt)
  labels = np.asarray([e.label for e in examples], np.int32)
  idx = out["pair_indices"]
  out["labels"] = np.where(idx >= 0, labels[np.maximum(idx, 0)], 0).astype(np.int32)
  out["num_tokens"] = int(dataset.lengths.sum())
  return out


def read_unpaired_files(files: str | Sequence[str], tokenizer: Tokenizer, settings: TruncationSettings | None = None,
                        format: str | None = None, *, skip_invalid: bool = False, id_limit: int | None = None,
                        counts: UnpairedCounts | None = None) -> tuple[list[UnpairedExample], int]:
  """Reads KTO data from files (jsonl / json / parquet / array_record; paired records are unpaired).

  Args:
    files: Globs (comma-separated string or list).
    tokenizer: The tokenizer.
    settings: Truncation (None: none).
    format: ``data.format`` override (None: from each file's extension).
    skip_invalid: Skip and count bad records (lines that do not parse included) instead of failing.
    id_limit: Pre-tokenized ids must lie in ``[0, id_limit)`` (None: the tokenizer's vocabulary).
    counts: Filled with the counters of the read when given.

  Returns:
    The examples in file order and the number dropped by truncation.

  Raises:
    DataError: ``file:line: field: what is wrong`` for the first bad record (unless skipped), a
      problem of a whole file, or no usable example.
  """
  from artifex_dpo.data.sources import expand_files, read_records_lenient

  paths = expand_files(files)
  counts = UnpairedCounts() if counts is None else counts

  def records():
    for path in paths:
      for line, record in read_records_lenient(path, format):
        yield path, line, record

  examples, dropped = read_unpaired(records(), tokenizer, settings, skip_invalid=skip_invalid, id_limit=id_limit,
                                    counts=counts)
  if not examples:
    raise DataError(",".join(paths), None, f"no usable examples ({counts.invalid} invalid, {dropped} dropped by "
                                           "truncation)")
  return examples, dropped


# ------------------------------------------------------------------------------------------
# data.packing: rows planned once for the whole dataset, the KL rows rotating within each row
# ------------------------------------------------------------------------------------------


def _example_tokens(examples: Sequence[UnpairedExample], share_prompt: bool) -> np.ndarray:
  """int64 ``[N]``: what example i costs in a packed row with a KL row of its own completion's length.

  Under a rotation within a row the row's total is the sum of these whatever the order (each
  completion appears once as a completion and once as a KL completion); cuts to ``max_length``
  only shorten it.
  """
  p = np.asarray([len(e.prompt_ids) for e in examples], np.int64)
  c = np.asarray([len(e.completion_ids) for e in examples], np.int64)
  return p + 2 * c + (np.minimum(p, 1) if share_prompt else p)


def plan_unpaired_packing(examples: Sequence[UnpairedExample], row_length: int, max_pairs_per_row: int,
                          share_prompt: bool = False):
  """``data.packing`` for KTO: whole examples (each with its KL row) planned into rows once, >= 2 per row.

  Example i's KL row pairs its prompt with the completion of the example before it in its row
  (the first takes the last): a rotation within the row, so each row's KL completions are the
  row's own completions, each with another prompt (:func:`row_kl_partners`). To guarantee that
  every row holds at least two examples, the examples are taken by decreasing length in groups
  of two (the last three together when their number is odd) and the groups are packed first-fit
  decreasing (:func:`artifex_dpo.data.packing.plan_packing`).

  Args:
    examples: The dataset's examples.
    row_length: ``data.pack_length``: must hold every group (4 x ``data.max_length`` holds any two
      examples; with an odd number of examples the three shortest must fit together too).
    max_pairs_per_row: ``data.max_pairs_per_row``: examples per row (>= 3).
    share_prompt: The shared-prompt layout (each prompt once for its completion and KL row).

  Returns:
    A :class:`~artifex_dpo.data.packing.PackingPlan` over the examples (``pair_indices`` are example indices).

  Raises:
    DataError: A group does not fit in a row, fewer than 2 examples, or ``max_pairs_per_row`` < 3.
  """
  from artifex_dpo.data.packing import PackingPlan, plan_packing

  n = len(examples)
  if n < 2:
    raise DataError("data.packing", None, f"KTO rows need at least 2 examples (their KL rows pair them); got {n}")
  if max_pairs_per_row < 3:
    raise DataError("data.max_pairs_per_row", None, f"must be >= 3 with KTO and data.packing (rows hold groups of "
                                                    f"2 or 3 examples), got {max_pairs_per_row}")
  tokens = _example_tokens(examples, share_prompt)
  order = np.lexsort((np.arange(n), -tokens))
  groups = [order[i:i + 2] for i in range(0, n - n % 2, 2)]
  if n % 2:
    groups[-1] = order[-3:]
  totals = np.asarray([tokens[g].sum() for g in groups], np.int64)
  if totals.max() > row_length:
    i = int(np.argmax(totals))
    raise DataError("data.pack_length", None, f"{row_length} cannot hold examples {sorted(groups[i].tolist())} with "
                                              f"their KL rows ({int(totals[i])} tokens): KTO rows hold at least 2 "
                                              "examples (the three shortest when their number is odd); use a larger "
                                              "data.pack_length")
  plan = plan_packing(np.stack([totals, np.zeros_like(totals)], axis=1), row_length, (max_pairs_per_row - 1) // 2)
  rows = [np.concatenate([groups[int(k)] for k in plan.row(r)]) for r in range(plan.num_rows)]
  sizes = np.asarray([len(r) for r in rows], np.int64)
  ro = lambda a: (a.setflags(write=False), a)[1]
  return PackingPlan(row_offsets=ro(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)),
                     pair_indices=ro(np.concatenate(rows).astype(np.int64)), row_tokens=plan.row_tokens,
                     row_length=plan.row_length, max_pairs_per_row=int(max_pairs_per_row), fill=plan.fill)


def row_kl_partners(plan) -> np.ndarray:
  """int64 ``[N]``: the example whose completion example i's KL row holds under ``plan`` (the one before
  it in its row; the row's first takes its last)."""
  partners = np.full(plan.num_pairs, -1, np.int64)
  for r in range(plan.num_rows):
    members = plan.row(r)
    partners[members] = np.roll(members, 1)
  return partners


def make_planned_unpaired_batch(examples: Sequence[UnpairedExample], plan, row_ids, *, pad_id: int,
                                max_length: int | None, share_prompt: bool = False) -> dict[str, Any]:
  """The packed rows ``row_ids`` of a :func:`plan_unpaired_packing` plan (-1: an empty row).

  Each slot holds one example as one packed pair (as :func:`make_packed_unpaired_batch`): its
  completion on the chosen side, its KL row (:func:`row_kl_partners`, cut to ``max_length``) on
  the rejected side.

  Returns:
    ``tokens``, ``segment_ids``, ``response_mask`` (and ``positions``, ``prefix_ids`` when sharing),
    ``pair_mask``, ``labels``, ``pair_indices`` (example indices, -1 empty) ``[R, K]``, and
    ``kl_partners`` ``[R, K]`` (the example whose completion the slot's KL row holds, -1 empty).
  """
  from artifex_dpo.data.dataset import PreferenceDataset
  from artifex_dpo.data.packing import PackingPlan, make_packed_batch

  row_ids = np.asarray(row_ids, np.int64).reshape(-1)
  members = [plan.row(int(r)) if r >= 0 else np.zeros(0, np.int64) for r in row_ids]
  flat = np.concatenate(members).astype(np.int64) if members else np.zeros(0, np.int64)
  partners = np.concatenate([np.roll(m, 1) for m in members]).astype(np.int64) if members else flat
  pairs = []
  for i, j in zip(flat, partners):
    e = examples[int(i)]
    kl = np.asarray(examples[int(j)].completion_ids, np.int32)
    if max_length is not None:  # the padded KL row is prompt + completion cut to max_length
      kl = kl[:max(max_length - len(e.prompt_ids), 0)]
    pairs.append(TokenizedPair(np.asarray(e.prompt_ids, np.int32), np.asarray(e.completion_ids, np.int32), kl))
  local_ds = PreferenceDataset.from_pairs(pairs, pad_id)
  sizes = np.asarray([len(m) for m in members], np.int64)
  real = row_ids >= 0
  local_plan = PackingPlan(np.concatenate([[0], np.cumsum(sizes[real])]).astype(np.int64),
                           np.arange(len(flat), dtype=np.int64), np.zeros(int(real.sum()), np.int64),
                           plan.row_length, plan.max_pairs_per_row, plan.fill)
  local_rows = np.where(real, np.cumsum(real) - 1, -1)
  out = make_packed_batch(local_ds, local_plan, local_rows, share_prompt=share_prompt)
  idx = out["pair_indices"]
  valid = idx >= 0
  out["pair_indices"] = np.where(valid, flat[np.maximum(idx, 0)] if len(flat) else -1, -1)
  out["kl_partners"] = np.where(valid, partners[np.maximum(idx, 0)] if len(flat) else -1, -1)
  labels = np.asarray([examples[int(i)].label for i in flat], np.int32)
  out["labels"] = np.where(valid, labels[np.maximum(idx, 0)] if len(flat) else 0, 0).astype(np.int32)
  return out
