"""Tokenizers for the data pipeline: Hugging Face `tokenizers`, sentencepiece, bytes.

`load_tokenizer(spec)` accepts what ``data.tokenizer`` may hold:

* a Hugging Face ``tokenizer.json`` file;
* a folder holding one (an HF model folder: ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``chat_template.jinja``, ``config.json`` are read when present)
  or holding a sentencepiece ``tokenizer.model``;
* a sentencepiece ``.model`` file;
* ``byte``: a built-in byte-level tokenizer (ids 0..255 are the bytes, then pad=256,
  bos=257, eos=258; vocab_size 259).

Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` (the latter
wins where both name one, as in transformers) and, for those they do not name, from a
``config.json`` beside the tokenizer (``eos_token_id`` etc.). A tokenizer with no known EOS
is refused with a :class:`DataError` naming the file.

Chat templates are rendered with a sandboxed jinja2 environment that mirrors the one of
transformers (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
``strftime_now``, a ``tojson`` that does not escape HTML, a no-op ``{% generation %}`` tag).
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from artifex_dpo import storage
from artifex_dpo.data.errors import DataError

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class Tokenizer:
  """Common interface of the tokenizers (subclasses implement `encode`).

  Attributes:
    name: Where the tokenizer came from (a path, or ``byte``).
    vocab_size: Number of ids (1 + the largest id the tokenizer can produce).
    eos_id: End-of-sequence id (always known).
    bos_id: Beginning-of-sequence id, or None.
    pad_id: Padding id; falls back to ``eos_id``.
    special_tokens: ``bos_token``/``eos_token``/``pad_token``/``unk_token`` -> their text
      (or None), as passed to chat templates.
    chat_template: The jinja chat template source, or None.
  """

  name: str = ""
  vocab_size: int = 0
  eos_id: int = 0
  bos_id: int | None = None
  pad_id: int = 0
  special_tokens: dict[str, str | None]
  chat_template: str | None = None

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Tokenizes one text.

    Args:
      text: The text.
      add_special_tokens: Add what the tokenizer's own post-processor adds (e.g. a
        BOS for Llama-style tokenizers). False: only the text's own tokens.

    Returns:
      The token ids.
    """
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Tokenizes many texts (same as `encode` on each; may run in parallel)."""
    return [self.encode(t, add_special_tokens) for t in texts]

  @property
  def has_chat_template(self) -> bool:
    """Whether `apply_chat_template` can be used."""
    return bool(self.chat_template)

  def apply_chat_template(
      self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
  ) -> str:
    """Renders a conversation with the tokenizer's chat template (as transformers does).

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: Append the header that starts an assistant turn.

    Returns:
      The rendered text (special tokens appear as their text).

    Raises:
      ValueError: The tokenizer has no chat template.
      jinja2.TemplateError: The template refused the conversation.
    """
    if not self.chat_template:
      raise ValueError(f"{self.name}: the tokenizer has no chat template")
    template = _compile_template(self.chat_template)
    kwargs = {k: v for k, v in self.special_tokens.items() if v is not None}
    return template.render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **kwargs
    )

  def __repr__(self) -> str:
    return (
        f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, "
        f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, "
        f"chat_template={self.has_chat_template})"
    )


# --------------------------------------------------------------------------- jinja


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(
          self.call_method("_render", []), [], [], body
      ).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(
      trim_blocks=True,
      lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols],
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


# --------------------------------------------------------------------------- helpers


def _read_json(path: str) -> dict[str, Any] | None:
  if not storage.isfile(path):
    return None
  try:
    value = json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:
    raise DataError(path, None, f"cannot read JSON: {e}") from None
  if not isinstance(value, dict):
    raise DataError(path, None, "expected a JSON object")
  return value


def _token_text(value: Any) -> str | None:
  """A special token as written in tokenizer_config.json (str or AddedToken dict)."""
  if isinstance(value, str):
    return value
  if isinstance(value, Mapping) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _first_int(value: Any) -> int | None:
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, list) and value and isinstance(value[0], int):
    return value[0]
  return None


def _folder_settings(folder: str) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
  """Reads the side files of a tokenizer folder.

  Returns:
    (tokenizer_config, special token texts by key, special token ids from config.json).
  """
  config = _read_json(storage.join(folder, "tokenizer_config.json")) or {}
  special_map = _read_json(storage.join(folder, "special_tokens_map.json")) or {}
  texts: dict[str, str] = {}
  for key in _SPECIAL_KEYS:
    for source in (special_map, config):  # special_tokens_map.json wins, as in transformers.
      text = _token_text(source.get(key))
      if text:
        texts[key] = text
        break
  ids: dict[str, int] = {}
  model_config = _read_json(storage.join(folder, "config.json")) or {}
  for key in _SPECIAL_KEYS:
    value = _first_int(model_config.get(key + "_id"))
    if value is not None and value >= 0:
      ids[key] = value
  return config, texts, ids


def _chat_template(folder: str, config: Mapping[str, Any]) -> str | None:
  path = storage.join(folder, "chat_template.jinja")
  if storage.isfile(path):
    return storage.read_text(path)
  template = config.get("chat_template")
  if isinstance(template, list):  # Named templates: [{"name": ..., "template": ...}].
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    template = named.get("default") or next(iter(named.values()), None)
  if not isinstance(template, str):
    path = storage.join(folder, "chat_template.json")  # Processor-style file.
    template = (_read_json(path) or {}).get("chat_template")
  return template if isinstance(template, str) and template else None


def _resolve_specials(
    tok: Tokenizer,
    source: str,
    texts: Mapping[str, str],
    ids: Mapping[str, int],
    token_to_id,
    id_to_token,
) -> None:
  """Sets tok's special ids/texts from texts (preferred) and config.json ids."""
  resolved_ids: dict[str, int | None] = {}
  resolved_texts: dict[str, str | None] = {}
  for key in _SPECIAL_KEYS:
    text = texts.get(key)
    if text is not None:
      token_id = token_to_id(text)
      if token_id is None:
        raise DataError(source, None, f"{key} {text!r} is not in the tokenizer's vocabulary")
      resolved_ids[key], resolved_texts[key] = token_id, text
    elif key in ids:
      token_id = ids[key]
      if not 0 <= token_id < tok.vocab_size:
        raise DataError(
            source, None, f"config.json {key}_id={token_id} is outside the vocabulary"
        )
      resolved_ids[key], resolved_texts[key] = token_id, id_to_token(token_id)
    else:
      resolved_ids[key], resolved_texts[key] = None, None
  if resolved_ids["eos_token"] is None:
    raise DataError(
        source,
        None,
        "no EOS token known (set eos_token in tokenizer_config.json or "
        "special_tokens_map.json, or eos_token_id in config.json)",
    )
  tok.eos_id = resolved_ids["eos_token"]
  tok.bos_id = resolved_ids["bos_token"]
  tok.pad_id = resolved_ids["pad_token"] if resolved_ids["pad_token"] is not None else tok.eos_id
  tok.special_tokens = resolved_texts


# --------------------------------------------------------------------------- HF tokenizers


class HFTokenizer(Tokenizer):
  """A Hugging Face ``tokenizers.Tokenizer`` (a ``tokenizer.json``)."""

  def __init__(self, path: str):
    import tokenizers

    self.name = path
    folder = storage.dirname(storage.local_or_uri(path))
    try:
      self._tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
    except Exception as e:  # The library raises plain Exception subclasses.
      raise DataError(path, None, f"cannot load tokenizer: {e}") from None
    self._tok.no_padding()
    self._tok.no_truncation()
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    config, texts, ids = _folder_settings(folder)
    _resolve_specials(
        self, path, texts, ids, self._tok.token_to_id, self._tok.id_to_token
    )
    self.chat_template = _chat_template(folder, config)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # No offsets.
    return [e.ids for e in batch(list(texts), add_special_tokens=add_special_tokens)]


# --------------------------------------------------------------------------- special-text split


class _SpecialSplitMixin:
  """Maps special-token texts inside a text to their ids (as HF added tokens are)."""

  _special_text_ids: dict[str, int]

  def _build_split(self) -> None:
    texts = {t: i for t, i in self._special_text_ids.items() if t}
    self._special_re = (
        re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))
        if texts
        else None
    )

  def _encode_with_specials(self, text: str, encode_plain) -> list[int]:
    if self._special_re is None:
      return encode_plain(text)
    ids: list[int] = []
    pos = 0
    for m in self._special_re.finditer(text):
      if m.start() > pos:
        ids.extend(encode_plain(text[pos : m.start()]))
      ids.append(self._special_text_ids[m.group(0)])
      pos = m.end()
    if pos < len(text):
      ids.extend(encode_plain(text[pos:]))
    return ids


# --------------------------------------------------------------------------- sentencepiece


class SentencePieceTokenizer(_SpecialSplitMixin, Tokenizer):
  """A sentencepiece ``.model``; ``add_special_tokens`` prepends BOS (Llama convention).

  ``tokenizer_config.json`` beside it may set ``add_bos_token`` / ``add_eos_token`` and the
  special tokens; otherwise the model's own bos/eos/pad/unk ids are used. Special-token
  texts inside a text (e.g. ``<s>`` from a chat template) are mapped to their ids.
  """

  def __init__(self, path: str):
    import sentencepiece as spm

    self.name = path
    folder = storage.dirname(storage.local_or_uri(path))
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(path))
    except Exception as e:  # sentencepiece raises OSError / RuntimeError.
      raise DataError(path, None, f"cannot load sentencepiece model: {e}") from None
    self.vocab_size = self._sp.get_piece_size()
    config, texts, ids = _folder_settings(folder)
    own = {
        "bos_token": self._sp.bos_id(),
        "eos_token": self._sp.eos_id(),
        "pad_token": self._sp.pad_id(),
        "unk_token": self._sp.unk_id(),
    }
    for key, value in own.items():
      if key not in texts and key not in ids and value >= 0:
        ids[key] = value

    def token_to_id(text: str) -> int | None:
      token_id = self._sp.piece_to_id(text)
      return token_id if self._sp.id_to_piece(token_id) == text else None

    _resolve_specials(self, path, texts, ids, token_to_id, self._sp.id_to_piece)
    self._add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
    self._add_eos = bool(config.get("add_eos_token", False))
    self.chat_template = _chat_template(folder, config)
    self._special_text_ids = {}
    for text in self.special_tokens.values():
      token_id = token_to_id(text) if text else None
      if token_id is not None and self._sp.is_control(token_id):
        self._special_text_ids[text] = token_id
    self._build_split()

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = self._encode_with_specials(text, lambda s: list(self._sp.encode(s)))
    if add_special_tokens:
      if self._add_bos:
        ids = [self.bos_id] + ids
      if self._add_eos:
        ids = ids + [self.eos_id]
    return ids


# --------------------------------------------------------------------------- bytes


class ByteTokenizer(_SpecialSplitMixin, Tokenizer):
  """UTF-8 bytes: ids 0..255, then pad=256, bos=257, eos=258.

  ``add_special_tokens`` prepends BOS. The texts ``<pad>``, ``<bos>``, ``<eos>`` map to the
  special ids (so chat templates can use them). No chat template.
  """

  PAD, BOS, EOS = 256, 257, 258

  def __init__(self):
    self.name = "byte"
    self.vocab_size = 259
    self.pad_id, self.bos_id, self.eos_id = self.PAD, self.BOS, self.EOS
    self.special_tokens = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": None,
    }
    self.chat_template = None
    self._special_text_ids = {"<pad>": self.PAD, "<bos>": self.BOS, "<eos>": self.EOS}
    self._build_split()

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = self._encode_with_specials(text, lambda s: list(s.encode("utf-8")))
    return [self.BOS] + ids if add_special_tokens else ids


# --------------------------------------------------------------------------- entry point


def load_tokenizer(spec: str) -> Tokenizer:
  """Loads the tokenizer named by ``data.tokenizer``.

  Args:
    spec: A ``tokenizer.json`` path, a folder holding ``tokenizer.json`` (or a
      sentencepiece ``tokenizer.model``), a sentencepiece ``.model`` path, or ``byte``.

  Returns:
    The tokenizer.

  Raises:
    DataError: The spec names nothing loadable, or the tokenizer has no known EOS.
  """
  spec = str(spec)
  if spec == "byte":
    return ByteTokenizer()
  if storage.isdir(spec):
    for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
      path = storage.join(spec, name)
      if storage.isfile(path):
        return cls(path)
    raise DataError(spec, None, "folder holds neither tokenizer.json nor tokenizer.model")
  if not storage.isfile(spec):
    raise DataError(spec, None, "no such tokenizer file or folder (or use 'byte')")
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec)
  return HFTokenizer(spec)
