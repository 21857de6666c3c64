"""Preference record formats -> token ids for (prompt, chosen, rejected).

Recognised record formats (checked in this order):

* **pre-tokenized**: ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` int lists, passed
  through unchanged (no EOS added); ids must lie in ``[0, vocab_size)``.
* **conversational**: ``chosen`` / ``rejected`` are lists of ``{"role", "content"}`` messages;
  ``prompt`` is a list of messages, or absent (implicit prompt: the longest common message
  prefix of chosen and rejected; the turns after it are the responses). If ``prompt`` is a
  list and chosen/rejected repeat it at their start, the repetition is removed. A string
  ``prompt`` beside message lists (as in ultrafeedback_binarized) is ignored and the implicit
  prompt is used. Rendered with the tokenizer's chat template: prompt with
  ``add_generation_prompt=True``; response = full conversation's rendering minus the
  prompt's rendering (which must be its prefix). Chat-rendered text is encoded without
  added special tokens (the template writes its own BOS), as transformers does.
* **explicit**: ``prompt`` / ``chosen`` / ``rejected`` strings.
* **HH-RLHF**: only ``chosen`` / ``rejected`` strings holding the whole dialogue; the prompt
  is their longest common prefix cut back to the end of its last ``"\\n\\nAssistant:"``.

Text prompt and responses are tokenized separately and concatenated (no BPE merge across
the boundary). The prompt gets the leading tokens the tokenizer's post-processor adds
(``add_special_tokens=True``, e.g. BOS); responses get none, and EOS is appended to each
response unless it already ends with EOS.

Truncation (per side; prompt is the same on both sides): the prompt is cut to
``max_prompt_length`` (``keep_end`` keeps its end, i.e. the generation header, and also a
leading BOS; ``keep_start`` keeps its start); then each response keeps its start so that
prompt + response fits ``max_length``. A pair whose response would become empty is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from artifex_dpo.data.errors import DataError
from artifex_dpo.data.tokenizer import Tokenizer

TRUNCATION_MODES = ("keep_end", "keep_start")
HH_ASSISTANT = "\n\nAssistant:"
DROP_RESPONSE_EMPTY = "response empty after truncation"


@dataclasses.dataclass(frozen=True)
class TruncationSettings:
  """How pairs are cut to size (``data.max_length`` etc.).

  Attributes:
    max_length: Longest prompt + response per side, or None (no limit).
    max_prompt_length: Longest prompt, or None (no limit of its own).
    truncation_mode: ``keep_end`` or ``keep_start``, applied to the prompt.
  """

  max_length: int | None = None
  max_prompt_length: int | None = None
  truncation_mode: str = "keep_end"

  def __post_init__(self):
    if self.truncation_mode not in TRUNCATION_MODES:
      raise DataError(
          "data.truncation_mode",
          None,
          f"{self.truncation_mode!r} is not one of {', '.join(TRUNCATION_MODES)}",
      )
    for key in ("max_length", "max_prompt_length"):
      value = getattr(self, key)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise DataError(f"data.{key}", None, f"must be a positive integer, got {value!r}")
    if (
        self.max_length is not None
        and self.max_prompt_length is not None
        and self.max_prompt_length >= self.max_length
    ):
      raise DataError(
          "data.max_prompt_length",
          None,
          f"{self.max_prompt_length} leaves no room for responses in "
          f"data.max_length={self.max_length}",
      )


@dataclasses.dataclass
class TokenizedPair:
  """One preference pair as int32 token ids (prompt shared by both sides)."""

  prompt_ids: np.ndarray
  chosen_ids: np.ndarray
  rejected_ids: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` -> int32 arrays."""
    return dataclasses.asdict(self)


@dataclasses.dataclass
class PairTexts:
  """A parsed text pair, before tokenization.

  Attributes:
    prompt: The prompt text.
    chosen: The chosen response text.
    rejected: The rejected response text.
    prompt_specials: Whether the prompt gets the post-processor's leading tokens (False
      for chat-template text, which carries its own).
  """

  prompt: str
  chosen: str
  rejected: str
  prompt_specials: bool = True


# --------------------------------------------------------------------------- parsing


def detect_record_format(record: Mapping[str, Any], path: str = "<record>", line: int | None = None) -> str:
  """Which format a record is in: ``pretokenized`` | ``conversational`` | ``explicit`` | ``hh``.

  Raises:
    DataError: The record has no ``chosen`` (or ``chosen_ids``).
  """
  if any(k in record for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
    return "pretokenized"
  if "chosen" not in record:
    raise DataError(path, line, "missing (expected prompt/chosen/rejected)", field="chosen")
  if isinstance(record["chosen"], list):
    return "conversational"
  return "explicit" if "prompt" in record else "hh"


def _text(record: Mapping[str, Any], key: str, path: str, line: int | None, allow_empty: bool) -> str:
  if key not in record or record[key] is None:
    raise DataError(path, line, "missing", field=key)
  value = record[key]
  if not isinstance(value, str):
    raise DataError(path, line, f"expected a string, got {type(value).__name__}", field=key)
  if not allow_empty and not value.strip():
    raise DataError(path, line, "empty", field=key)
  return value


def _messages(record: Mapping[str, Any], key: str, path: str, line: int | None) -> list[dict]:
  if key not in record or record[key] is None:
    raise DataError(path, line, "missing", field=key)
  value = record[key]
  if not isinstance(value, list):
    raise DataError(path, line, f"expected a list of messages, got {type(value).__name__}", field=key)
  for i, message in enumerate(value):
    where = f"{key}[{i}]"
    if not isinstance(message, Mapping):
      raise DataError(path, line, f"expected a message object, got {type(message).__name__}", field=where)
    if not isinstance(message.get("role"), str):
      raise DataError(path, line, "message needs a string 'role'", field=where)
    content = message.get("content")
    if not (isinstance(content, (str, list)) or (content is None and message.get("tool_calls"))):
      raise DataError(path, line, "message needs a string (or list) 'content'", field=where)
  return [dict(m) for m in value]


def _common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def _parse_conversational(
    record: Mapping[str, Any], tokenizer: Tokenizer, path: str, line: int | None
) -> PairTexts:
  if not tokenizer.has_chat_template:
    raise DataError(
        path, line, f"conversational record, but the tokenizer {tokenizer.name} has no chat template"
    )
  chosen = _messages(record, "chosen", path, line)
  rejected = _messages(record, "rejected", path, line)
  prompt = record.get("prompt")
  if isinstance(prompt, list):
    prompt = _messages(record, "prompt", path, line)
    n = len(prompt)
    if n and chosen[:n] == prompt and rejected[:n] == prompt:
      chosen, rejected = chosen[n:], rejected[n:]
  elif prompt is None or isinstance(prompt, str):
    n = _common_prefix_len(chosen, rejected)
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
  else:
    raise DataError(path, line, f"expected a list of messages, got {type(prompt).__name__}", field="prompt")
  for key, response in (("chosen", chosen), ("rejected", rejected)):
    if not response:
      raise DataError(path, line, "empty (no turns after the prompt)", field=key)
  try:
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    texts = {}
    for key, response in (("chosen", chosen), ("rejected", rejected)):
      full = tokenizer.apply_chat_template(prompt + response, add_generation_prompt=False)
      if not full.startswith(prompt_text):
        raise DataError(
            path,
            line,
            "the chat template renders the prompt differently inside the whole "
            "conversation (the prompt rendering is not a prefix)",
            field=key,
        )
      texts[key] = full[len(prompt_text) :]
      if not texts[key].strip():
        raise DataError(path, line, "empty after rendering", field=key)
  except DataError:
    raise
  except Exception as e:  # jinja2.TemplateError and errors inside the template.
    raise DataError(path, line, f"chat template failed: {type(e).__name__}: {e}") from None
  return PairTexts(prompt_text, texts["chosen"], texts["rejected"], prompt_specials=False)


def _parse_hh(record: Mapping[str, Any], path: str, line: int | None) -> PairTexts:
  chosen = _text(record, "chosen", path, line, allow_empty=False)
  rejected = _text(record, "rejected", path, line, allow_empty=False)
  common = chosen[: _common_prefix_len(chosen, rejected)]
  cut = common.rfind(HH_ASSISTANT)
  if cut < 0:
    raise DataError(
        path, line, f"no prompt field, and chosen/rejected share no prefix ending in {HH_ASSISTANT!r}"
    )
  end = cut + len(HH_ASSISTANT)
  prompt, chosen, rejected = chosen[:end], chosen[end:], rejected[end:]
  for key, value in (("chosen", chosen), ("rejected", rejected)):
    if not value.strip():
      raise DataError(path, line, "empty response after the last 'Assistant:'", field=key)
  return PairTexts(prompt, chosen, rejected)


def _ids(record: Mapping[str, Any], key: str, vocab_size: int, path: str, line: int | None, allow_empty: bool) -> np.ndarray:
  if key not in record or record[key] is None:
    raise DataError(path, line, "missing", field=key)
  value = record[key]
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
  ):
    raise DataError(path, line, "expected a list of integer token ids", field=key)
  if not value and not allow_empty:
    raise DataError(path, line, "empty", field=key)
  ids = np.asarray(value, dtype=np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
    raise DataError(path, line, f"token id {bad} is outside [0, {vocab_size})", field=key)
  return ids.astype(np.int32)


def parse_record(
    record: Mapping[str, Any], tokenizer: Tokenizer, path: str = "<record>", line: int | None = None,
    id_limit: int | None = None,
) -> PairTexts | TokenizedPair:
  """Validates a record and turns it into texts (or ids, for a pre-tokenized record).

  Args:
    record: The record.
    tokenizer: Needed for chat templates and the vocabulary size.
    path: File name for error messages.
    line: Record number for error messages.
    id_limit: pre-tokenized ids must lie in ``[0, id_limit)``; None: the tokenizer's vocabulary
      (a run passes the model's vocabulary: the tokenizer plays no part for ids).

  Returns:
    `PairTexts` to tokenize, or a `TokenizedPair` for pre-tokenized records.

  Raises:
    DataError: ``path:line: field: what is wrong``.
  """
  fmt = detect_record_format(record, path, line)
  if fmt == "pretokenized":
    v = tokenizer.vocab_size if id_limit is None else id_limit
    return TokenizedPair(
        _ids(record, "prompt_ids", v, path, line, allow_empty=True),
        _ids(record, "chosen_ids", v, path, line, allow_empty=False),
        _ids(record, "rejected_ids", v, path, line, allow_empty=False),
    )
  if fmt == "conversational":
    return _parse_conversational(record, tokenizer, path, line)
  if fmt == "hh":
    return _parse_hh(record, path, line)
  return PairTexts(
      _text(record, "prompt", path, line, allow_empty=True),
      _text(record, "chosen", path, line, allow_empty=False),
      _text(record, "rejected", path, line, allow_empty=False),
  )


# --------------------------------------------------------------------------- tokenization


@functools.lru_cache(maxsize=8)
def _special_prefix_cached(tokenizer: Tokenizer) -> tuple[int, ...]:
  for probe in ("a", "hello", "0", " x", "t0"):
    plain = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    if not plain:
      continue
    for start in range(len(full) - len(plain) + 1):
      if full[start : start + len(plain)] == plain:
        return tuple(full[:start])
  full = tokenizer.encode("", add_special_tokens=True)
  return (full[0],) if full and full[0] == tokenizer.bos_id else ()


def special_prefix(tokenizer: Tokenizer) -> list[int]:
  """The leading ids the tokenizer's post-processor adds (e.g. ``[bos]``), maybe empty."""
  return list(_special_prefix_cached(tokenizer))


def _with_eos(ids: Sequence[int], eos_id: int) -> np.ndarray:
  ids = list(ids)
  if not ids or ids[-1] != eos_id:
    ids.append(eos_id)
  return np.asarray(ids, dtype=np.int32)


def tokenize_pairs(pairs: Sequence[PairTexts], tokenizer: Tokenizer) -> list[TokenizedPair]:
  """Tokenizes parsed text pairs (batched; prompt and responses separately).

  Args:
    pairs: Parsed pairs.
    tokenizer: The tokenizer.

  Returns:
    One `TokenizedPair` per input pair, EOS appended to each response.
  """
  if not pairs:
    return []
  prefix = special_prefix(tokenizer)
  prompts = tokenizer.encode_batch([p.prompt for p in pairs], add_special_tokens=False)
  chosen = tokenizer.encode_batch([p.chosen for p in pairs], add_special_tokens=False)
  rejected = tokenizer.encode_batch([p.rejected for p in pairs], add_special_tokens=False)
  out = []
  for pair, p, c, r in zip(pairs, prompts, chosen, rejected):
    p = (prefix + list(p)) if pair.prompt_specials else list(p)
    out.append(
        TokenizedPair(
            np.asarray(p, dtype=np.int32),
            _with_eos(c, tokenizer.eos_id),
            _with_eos(r, tokenizer.eos_id),
        )
    )
  return out


def truncate_pair(
    pair: TokenizedPair, settings: TruncationSettings, bos_id: int | None = None
) -> tuple[TokenizedPair | None, str | None]:
  """Cuts a pair to size.

  Args:
    pair: The pair.
    settings: Limits and mode.
    bos_id: With ``keep_end``, a prompt starting with this id keeps it.

  Returns:
    (the truncated pair, None), or (None, reason) when the pair must be dropped.
  """
  prompt = pair.prompt_ids
  limit = settings.max_prompt_length
  if limit is not None and len(prompt) > limit:
    if settings.truncation_mode == "keep_start":
      prompt = prompt[:limit]
    elif bos_id is not None and len(prompt) and prompt[0] == bos_id and limit > 1:
      prompt = np.concatenate([prompt[:1], prompt[len(prompt) - (limit - 1) :]])
    else:
      prompt = prompt[len(prompt) - limit :]
  chosen, rejected = pair.chosen_ids, pair.rejected_ids
  if settings.max_length is not None:
    room = settings.max_length - len(prompt)
    if room <= 0:
      return None, DROP_RESPONSE_EMPTY
    chosen, rejected = chosen[:room], rejected[:room]
  if not len(chosen) or not len(rejected):
    return None, DROP_RESPONSE_EMPTY
  return TokenizedPair(prompt, chosen, rejected), None


def record_to_pair(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    settings: TruncationSettings | None = None,
    path: str = "<record>",
    line: int | None = None,
) -> tuple[TokenizedPair | None, str | None]:
  """One record -> a truncated token pair (or a drop reason).

  Args:
    record: The record.
    tokenizer: The tokenizer.
    settings: Truncation (None: none).
    path: File name for error messages.
    line: Record number for error messages.

  Returns:
    (pair, None), or (None, reason) when truncation left a response empty.

  Raises:
    DataError: The record is invalid.
  """
  parsed = parse_record(record, tokenizer, path, line)
  pair = parsed if isinstance(parsed, TokenizedPair) else tokenize_pairs([parsed], tokenizer)[0]
  return truncate_pair(pair, settings or TruncationSettings(), tokenizer.bos_id)
