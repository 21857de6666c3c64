"""Tests of artifex_dpo.data.formats: record formats, tokenization, truncation."""

from __future__ import annotations

import numpy as np
import pytest

import test_data_util as util
from artifex_dpo.data import (
    DataError,
    TruncationSettings,
    detect_record_format,
    load_tokenizer,
    record_to_pair,
)
from artifex_dpo.data.formats import TokenizedPair, truncate_pair


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return load_tokenizer(util.write_hf_folder(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def tok_nobos(tmp_path_factory):
  return load_tokenizer(util.write_hf_folder(tmp_path_factory.mktemp("hf_nobos"), add_bos=False))


def pair(record, tokenizer, **settings):
  result, reason = record_to_pair(record, tokenizer, TruncationSettings(**settings), "f.jsonl", 7)
  assert reason is None
  return result


def user(text):
  return {"role": "user", "content": text}


def assistant(text):
  return {"role": "assistant", "content": text}


def test_detect_record_format():
  assert detect_record_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "explicit"
  assert detect_record_format({"chosen": "b", "rejected": "c"}) == "hh"
  assert detect_record_format({"chosen": [], "rejected": []}) == "conversational"
  assert detect_record_format({"chosen_ids": [1]}) == "pretokenized"


def test_explicit_no_merge_across_boundary(tok):
  # As one text, "xa" + "b" would merge into "x", "ab".
  assert tok.encode("xab") == [tok.encode("x")[0], tok.encode("ab")[0]]
  p = pair({"prompt": "xa", "chosen": "b", "rejected": "ab"}, tok)
  assert p.prompt_ids.tolist() == [tok.bos_id] + tok.encode("xa")
  assert p.chosen_ids.tolist() == tok.encode("b") + [tok.eos_id]
  assert p.rejected_ids.tolist() == tok.encode("ab") + [tok.eos_id]
  assert p.prompt_ids.dtype == np.int32 and set(p.as_dict()) == {"prompt_ids", "chosen_ids", "rejected_ids"}


def test_bos_only_where_post_processor_adds_it(tok_nobos):
  p = pair({"prompt": "hello", "chosen": "ab", "rejected": "cd"}, tok_nobos)
  assert p.prompt_ids.tolist() == tok_nobos.encode("hello")
  assert tok_nobos.bos_id not in p.prompt_ids.tolist()


def test_eos_appended_once(tok):
  p = pair({"prompt": "q", "chosen": "ab</s>", "rejected": "cd"}, tok)
  assert p.chosen_ids.tolist() == tok.encode("ab") + [tok.eos_id]
  assert p.rejected_ids.tolist() == tok.encode("cd") + [tok.eos_id]


def test_conversational_implicit_prompt(tok):
  record = {"chosen": [user("hello"), assistant("ab")], "rejected": [user("hello"), assistant("cd")]}
  p = pair(record, tok)
  prompt_text = tok.apply_chat_template([user("hello")], add_generation_prompt=True)
  assert prompt_text == "<s><|user|>hello<|end|><|assistant|>"
  assert p.prompt_ids.tolist() == tok.encode(prompt_text)  # Template writes BOS: no second one.
  assert p.prompt_ids.tolist().count(tok.bos_id) == 1
  assert p.chosen_ids.tolist() == tok.encode("ab<|end|>") + [tok.eos_id]
  assert p.rejected_ids.tolist() == tok.encode("cd<|end|>") + [tok.eos_id]


def test_conversational_explicit_prompt_and_multi_turn(tok):
  record = {"prompt": [user("hi")], "chosen": [assistant("ab"), user("more"), assistant("hello")],
            "rejected": [assistant("cd")]}
  p = pair(record, tok)
  assert p.chosen_ids.tolist() == tok.encode("ab<|end|><|user|>more<|end|><|assistant|>hello<|end|>") + [2]
  # Same pair when chosen/rejected repeat the prompt, or when prompt is a plain string.
  repeated = {"prompt": [user("hi")], "chosen": [user("hi")] + record["chosen"],
              "rejected": [user("hi")] + record["rejected"]}
  as_string = {"prompt": "hi", "chosen": repeated["chosen"], "rejected": repeated["rejected"]}
  for other in (repeated, as_string):
    q = pair(other, tok)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
      assert getattr(q, key).tolist() == getattr(p, key).tolist()


def test_conversational_eos_already_there(tmp_path):
  tok = load_tokenizer(util.write_hf_folder(tmp_path, eos="<|end|>"))
  p = pair({"prompt": [user("hi")], "chosen": [assistant("ab")], "rejected": [assistant("cd")]}, tok)
  assert p.chosen_ids.tolist() == tok.encode("ab<|end|>")
  assert p.chosen_ids.tolist().count(tok.eos_id) == 1


def test_conversational_errors(tmp_path, tok):
  same = {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]}
  with pytest.raises(DataError, match=r"^f\.jsonl:7: chosen: empty \(no turns after the prompt\)"):
    pair(same, tok)
  with pytest.raises(DataError, match=r"^f\.jsonl:7: chosen\[1\]: message needs a string 'role'"):
    pair({"chosen": [user("a"), {"content": "b"}], "rejected": [user("a")]}, tok)
  with pytest.raises(DataError, match=r"^f\.jsonl:7: rejected: expected a list of messages, got str"):
    pair({"chosen": [user("a"), assistant("b")], "rejected": "c"}, tok)
  with pytest.raises(DataError, match=r"^f\.jsonl:7: prompt: expected a list of messages, got int"):
    pair({"prompt": 3, "chosen": [assistant("b")], "rejected": [assistant("c")]}, tok)
  no_template = load_tokenizer(util.write_hf_folder(tmp_path / "nt", chat_template=None))
  with pytest.raises(DataError, match=r"^f\.jsonl:7: conversational record, but the tokenizer .* no chat template"):
    pair({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}, no_template)
  mismatch = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
  bad = load_tokenizer(util.write_hf_folder(tmp_path / "mm", chat_template=mismatch))
  with pytest.raises(DataError, match=r"^f\.jsonl:7: chosen: the chat template renders the prompt differently"):
    pair({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}, bad)
  raising = "{{ raise_exception('no system role') }}"
  bad = load_tokenizer(util.write_hf_folder(tmp_path / "rx", chat_template=raising))
  with pytest.raises(DataError, match=r"^f\.jsonl:7: chat template failed: TemplateError: no system role"):
    pair({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}, bad)


def test_hh_rlhf(tok):
  chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: ab?\n\nAssistant: ab ab"
  rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: ab?\n\nAssistant: no"
  p = pair({"chosen": chosen, "rejected": rejected}, tok)
  prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: ab?\n\nAssistant:"
  assert p.prompt_ids.tolist() == [tok.bos_id] + tok.encode(prompt)
  assert p.chosen_ids.tolist() == tok.encode(" ab ab") + [tok.eos_id]
  assert p.rejected_ids.tolist() == tok.encode(" no") + [tok.eos_id]
  # The common prefix " a" of the responses stays in the responses.
  q = pair({"chosen": prompt + " ab", "rejected": prompt + " ax"}, tok)
  assert q.prompt_ids.tolist() == [tok.bos_id] + tok.encode(prompt)
  with pytest.raises(DataError, match=r"^f\.jsonl:7: no prompt field, and chosen/rejected share no prefix"):
    pair({"chosen": "hello", "rejected": "help"}, tok)
  with pytest.raises(DataError, match=r"^f\.jsonl:7: chosen: empty response"):
    pair({"chosen": prompt + "  ", "rejected": prompt + " no"}, tok)


def test_pretokenized_pass_through(tok):
  p = pair({"prompt_ids": [1, 5], "chosen_ids": [6, 7], "rejected_ids": [8]}, tok)
  assert (p.prompt_ids.tolist(), p.chosen_ids.tolist(), p.rejected_ids.tolist()) == ([1, 5], [6, 7], [8])
  for bad, message in [
      ({"prompt_ids": [1], "chosen_ids": [6, 9999], "rejected_ids": [8]}, "chosen_ids: token id 9999 is outside"),
      ({"prompt_ids": [1], "chosen_ids": [6], "rejected_ids": [-1]}, "rejected_ids: token id -1 is outside"),
      ({"prompt_ids": [1], "chosen_ids": [6.5], "rejected_ids": [8]}, "chosen_ids: expected a list of integer"),
      ({"prompt_ids": [1], "chosen_ids": [True], "rejected_ids": [8]}, "chosen_ids: expected a list of integer"),
      ({"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [8]}, "chosen_ids: empty"),
      ({"chosen_ids": [1], "rejected_ids": [8]}, "prompt_ids: missing"),
  ]:
    with pytest.raises(DataError) as info:
      pair(bad, tok)
    assert str(info.value).startswith(f"f.jsonl:7: {message}"), str(info.value)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "rejected": "c"}, "chosen: missing"),
        ({"prompt": "a", "chosen": "b"}, "rejected: missing"),
        ({"prompt": "a", "chosen": "", "rejected": "c"}, "chosen: empty"),
        ({"prompt": "a", "chosen": "b", "rejected": "   "}, "rejected: empty"),
        ({"prompt": 5, "chosen": "b", "rejected": "c"}, "prompt: expected a string, got int"),
        ({"prompt": "a", "chosen": {"x": 1}, "rejected": "c"}, "chosen: expected a string, got dict"),
        ({"prompt": None, "chosen": "b", "rejected": "c"}, "prompt: missing"),
        ({"text": "a"}, "chosen: missing"),
    ],
)
def test_explicit_bad_records(tok, record, message):
  with pytest.raises(DataError) as info:
    pair(record, tok)
  assert str(info.value).startswith(f"f.jsonl:7: {message}"), str(info.value)


def ids_pair(prompt, chosen, rejected):
  return TokenizedPair(*(np.asarray(x, np.int32) for x in (prompt, chosen, rejected)))


def test_truncation_modes():
  p = ids_pair([1, 10, 11, 12, 13], [20, 21, 22, 2], [30, 2])
  keep_end, _ = truncate_pair(p, TruncationSettings(max_prompt_length=3, truncation_mode="keep_end"))
  assert keep_end.prompt_ids.tolist() == [11, 12, 13]
  with_bos, _ = truncate_pair(p, TruncationSettings(max_prompt_length=3), bos_id=1)
  assert with_bos.prompt_ids.tolist() == [1, 12, 13]
  keep_start, _ = truncate_pair(p, TruncationSettings(max_prompt_length=3, truncation_mode="keep_start"))
  assert keep_start.prompt_ids.tolist() == [1, 10, 11]
  both, _ = truncate_pair(p, TruncationSettings(max_length=5, max_prompt_length=3))
  assert both.prompt_ids.tolist() == [11, 12, 13]
  assert both.chosen_ids.tolist() == [20, 21]  # Responses keep their start.
  assert both.rejected_ids.tolist() == [30, 2]
  untouched, reason = truncate_pair(p, TruncationSettings())
  assert reason is None and untouched.chosen_ids.tolist() == [20, 21, 22, 2]


def test_truncation_drop():
  p = ids_pair([1, 10, 11, 12, 13], [20, 2], [30, 2])
  dropped, reason = truncate_pair(p, TruncationSettings(max_length=5))
  assert dropped is None and reason == "response empty after truncation"
  kept, reason = truncate_pair(p, TruncationSettings(max_length=6))
  assert reason is None and kept.chosen_ids.tolist() == [20]


def test_record_to_pair_truncates(tok):
  record = {"prompt": "hello hello", "chosen": "ab ab ab", "rejected": "cd"}
  p, reason = record_to_pair(record, tok, TruncationSettings(max_length=6, max_prompt_length=3))
  assert reason is None and len(p.prompt_ids) == 3 and p.prompt_ids[0] == tok.bos_id
  assert len(p.chosen_ids) == 3 and p.chosen_ids.tolist() == tok.encode("ab ab ab")[:3]
  assert p.rejected_ids.tolist() == tok.encode("cd") + [tok.eos_id]


def test_truncation_settings_validation():
  with pytest.raises(DataError, match="^data.truncation_mode: 'middle' is not one of"):
    TruncationSettings(truncation_mode="middle")
  with pytest.raises(DataError, match="^data.max_length: must be a positive integer"):
    TruncationSettings(max_length=0)
  with pytest.raises(DataError, match="^data.max_prompt_length: 8 leaves no room"):
    TruncationSettings(max_length=8, max_prompt_length=8)
