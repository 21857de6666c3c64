"""Builders shared by the data tests: tiny tokenizers and data files written into tmp_path."""

from __future__ import annotations

import json
import os
import string

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHARS = list(string.ascii_letters + string.digits + " \n.,:?!'-")
# Merges: "ab" is one token, so "xa" + "b" tokenized separately differs from "xab".
MERGES = [("a", "b"), ("h", "e"), ("l", "l"), ("he", "ll"), ("o", " "), ("\n", "\n")]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_bpe(add_bos: bool = True):
  """A tiny character BPE with merges and special tokens (tokenizers.Tokenizer)."""
  from tokenizers import AddedToken, Tokenizer, models, processors

  vocab = {tok: i for i, tok in enumerate(SPECIALS)}
  for ch in CHARS:
    vocab.setdefault(ch, len(vocab))
  for a, b in MERGES:
    vocab.setdefault(a + b, len(vocab))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  if add_bos:
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
  return tok


def write_hf_folder(
    folder,
    *,
    add_bos: bool = True,
    eos: str | None = "</s>",
    chat_template: str | None = CHAT_TEMPLATE,
    template_file: bool = False,
    config_json: dict | None = None,
    special_map: dict | None = None,
) -> str:
  """Writes tokenizer.json (+ tokenizer_config.json etc.) into folder; returns the folder."""
  folder = str(folder)
  os.makedirs(folder, exist_ok=True)
  build_bpe(add_bos).save(os.path.join(folder, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "pad_token": "<pad>",
            "unk_token": "<unk>"}
  if eos is not None:
    config["eos_token"] = {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}  # AddedToken-dict form.
  if chat_template is not None and not template_file:
    config["chat_template"] = chat_template
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  if chat_template is not None and template_file:
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
      f.write(chat_template)
  if config_json is not None:
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump(config_json, f)
  if special_map is not None:
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
      json.dump(special_map, f)
  return folder


def write_jsonl(path, records) -> str:
  """Writes records (dicts, or raw strings written as-is) one per line."""
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def explicit_records(n: int, seed: int = 0) -> list[dict]:
  """n explicit prompt/chosen/rejected records of varied lengths."""
  import random

  rng = random.Random(seed)

  def words(k):
    return " ".join(rng.choice(["hello", "ab", "cd", "xyz", "q"]) for _ in range(k))

  return [
      {"prompt": words(rng.randint(1, 6)), "chosen": " " + words(rng.randint(1, 5)),
       "rejected": " " + words(rng.randint(1, 5))}
      for _ in range(n)
  ]
