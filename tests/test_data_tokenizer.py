"""Tests of artifex_dpo.data.tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

import test_data_util as util
from artifex_dpo.data import DataError, load_tokenizer
from artifex_dpo.data.tokenizer import ByteTokenizer

TEXTS = ["xab", "hello world", "ab ab", "", "  lead", "a<|end|>b", "<s>hi", "Hello, Q?"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  return util.write_hf_folder(tmp_path_factory.mktemp("hf"))


def test_hf_encode_matches_transformers_oracle(hf_folder):
  transformers = pytest.importorskip("transformers")
  ours = load_tokenizer(hf_folder)
  oracle = transformers.AutoTokenizer.from_pretrained(hf_folder)
  for text in TEXTS:
    for special in (False, True):
      expected = oracle(text, add_special_tokens=special)["input_ids"]
      assert ours.encode(text, add_special_tokens=special) == expected, (text, special)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
      oracle.bos_token_id, oracle.eos_token_id, oracle.pad_token_id)
  assert ours.vocab_size == len(oracle)


def test_tokenizer_json_file_spec_and_fast_oracle(hf_folder):
  transformers = pytest.importorskip("transformers")
  path = os.path.join(hf_folder, "tokenizer.json")
  ours = load_tokenizer(path)  # Side files beside it are still read.
  oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
  for text in TEXTS:
    assert ours.encode(text, True) == oracle(text, add_special_tokens=True)["input_ids"]
    assert ours.encode_batch([text, text], False) == [oracle(text, add_special_tokens=False)["input_ids"]] * 2
  assert ours.eos_id == 2 and ours.has_chat_template


def test_bos_only_from_post_processor(tmp_path):
  with_bos = load_tokenizer(util.write_hf_folder(tmp_path / "a", add_bos=True))
  without = load_tokenizer(util.write_hf_folder(tmp_path / "b", add_bos=False))
  assert with_bos.encode("hi", True)[0] == with_bos.bos_id == 1
  assert with_bos.encode("hi", False)[0] != 1
  assert without.bos_id == 1  # Known, but the post-processor does not add it.
  assert without.encode("hi", True) == without.encode("hi", False)


def test_chat_template_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  folder = util.write_hf_folder(tmp_path)
  ours = load_tokenizer(folder)
  oracle = transformers.AutoTokenizer.from_pretrained(folder)
  messages = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "ab"}]
  for gen in (True, False):
    for msgs in (messages[:2], messages):
      expected = oracle.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
      assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected


CHATML = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)
LLAMA3 = (
    "{{- bos_token }}{%- set ns = namespace(n=0) %}{%- for message in messages %}{%- set ns.n = ns.n + 1 %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    "{% if ns.n > 99 %}{{ messages | tojson }}{% endif %}"
)


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_real_world_style_templates_match_transformers(tmp_path, template):
  transformers = pytest.importorskip("transformers")
  folder = util.write_hf_folder(tmp_path, chat_template=template)
  ours = load_tokenizer(folder)
  oracle = transformers.AutoTokenizer.from_pretrained(folder)
  msgs = [{"role": "user", "content": " hi <b> "}, {"role": "assistant", "content": "ab"}]
  for gen in (True, False):
    for m in (msgs[:1], msgs):
      expected = oracle.apply_chat_template(m, add_generation_prompt=gen, tokenize=False)
      assert ours.apply_chat_template(m, add_generation_prompt=gen) == expected


def test_chat_template_file_wins_and_generation_tag(tmp_path):
  template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}|{% endif %}{% endfor %}")
  folder = util.write_hf_folder(tmp_path, chat_template=template, template_file=True)
  tok = load_tokenizer(folder)
  assert tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "q|a"


def test_chat_template_raise_exception_and_sandbox(tmp_path):
  jinja2 = pytest.importorskip("jinja2")
  template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
  tok = load_tokenizer(util.write_hf_folder(tmp_path / "a", chat_template=template))
  assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
  with pytest.raises(jinja2.TemplateError, match="first must be user"):
    tok.apply_chat_template([{"role": "assistant", "content": "x"}])
  evil = "{{ messages.__class__.__mro__ }}"
  tok = load_tokenizer(util.write_hf_folder(tmp_path / "b", chat_template=evil))
  with pytest.raises(jinja2.exceptions.SecurityError):
    tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template(tmp_path):
  tok = load_tokenizer(util.write_hf_folder(tmp_path, chat_template=None))
  assert not tok.has_chat_template
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_special_tokens_map_wins_and_config_json_fallback(tmp_path):
  tok = load_tokenizer(util.write_hf_folder(tmp_path / "a", special_map={"eos_token": "<|end|>"}))
  assert tok.eos_id == 7 and tok.special_tokens["eos_token"] == "<|end|>"
  tok = load_tokenizer(util.write_hf_folder(tmp_path / "b", eos=None, config_json={"eos_token_id": [7, 2]}))
  assert tok.eos_id == 7 and tok.special_tokens["eos_token"] == "<|end|>"
  assert tok.pad_id == 0


def test_pad_falls_back_to_eos(tmp_path):
  folder = util.write_hf_folder(tmp_path)
  config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
  del config["pad_token"]
  json.dump(config, open(os.path.join(folder, "tokenizer_config.json"), "w"))
  assert load_tokenizer(folder).pad_id == 2


def test_no_eos_is_an_error_naming_the_file(tmp_path):
  folder = util.write_hf_folder(tmp_path, eos=None)
  with pytest.raises(DataError, match=r"tokenizer\.json: no EOS token known"):
    load_tokenizer(folder)


def test_eos_not_in_vocab(tmp_path):
  folder = util.write_hf_folder(tmp_path, eos="<nope>")
  with pytest.raises(DataError, match="eos_token '<nope>' is not in the tokenizer's vocabulary"):
    load_tokenizer(folder)


def test_bad_specs(tmp_path):
  with pytest.raises(DataError, match="no such tokenizer"):
    load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
    load_tokenizer(str(tmp_path))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(DataError, match=r"tokenizer\.json: cannot load tokenizer"):
    load_tokenizer(str(bad))


def test_byte_tokenizer():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
  assert tok.encode("hé") == [104, 0xC3, 0xA9]
  assert tok.encode("a", add_special_tokens=True) == [257, 97]
  assert tok.encode("a<eos>") == [97, 258]
  assert not tok.has_chat_template


def _train_sentencepiece(prefix: str) -> str:
  spm = pytest.importorskip("sentencepiece")
  lines = ["hello world this is a test of sentencepiece", "the quick brown fox jumps over the lazy dog"] * 20
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=40,
                                 model_type="bpe", minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=3)
  return prefix + ".model"


def test_sentencepiece_model_file_and_folder(tmp_path):
  import sentencepiece as spm

  path = _train_sentencepiece(str(tmp_path / "sp"))
  sp = spm.SentencePieceProcessor(model_file=path)
  tok = load_tokenizer(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (40, 1, 2, 3)
  assert tok.encode("hello fox") == sp.encode("hello fox")
  assert tok.encode("hello fox", add_special_tokens=True) == [1] + sp.encode("hello fox")
  assert tok.encode("<s>hello</s>") == [1] + sp.encode("hello") + [2]  # Template-written specials.
  folder = tmp_path / "model"
  folder.mkdir()
  os.rename(path, folder / "tokenizer.model")
  (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
  tok = load_tokenizer(str(folder))
  assert tok.encode("hello", add_special_tokens=True) == sp.encode("hello")


def _load_make_workload():
  path = "/work/shared/bench/make_workload.py"
  if not os.path.isfile(path):
    pytest.skip("no standard workload script")
  spec = importlib.util.spec_from_file_location("make_workload_for_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_standard_workload_tokenizer(tmp_path, monkeypatch):
  try:
    module = _load_make_workload()
    monkeypatch.setitem(sys.modules, "torch", None)  # Skip writing hf_model/ (slow).
    module.main(str(tmp_path), n_pairs=8)
  except Exception as e:  # noqa: BLE001 - the script is not ours; skip if it cannot run.
    pytest.skip(f"make_workload.py failed: {e}")
  tok = load_tokenizer(str(tmp_path))
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (8192, 0, 1, 2)
  assert tok.encode("t0 t1 nope") == [4, 5, 3]
  assert tok.encode("t0", add_special_tokens=True) == [4]  # WordLevel without post-processor.
  assert load_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 2
