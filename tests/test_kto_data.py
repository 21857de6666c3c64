"""KTO data in the service's first pass: `data.skip_invalid` skips and counts bad unpaired records,
truncation is counted as for paired data, and pre-tokenized ids are checked against the model's
vocabulary (`id_limit`) with `file:line: field` errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from artifex_dpo.data import DataError, load_tokenizer
from artifex_dpo.data.unpaired import UnpairedCounts, read_unpaired_files
from artifex_dpo.data.order import eval_split
from artifex_dpo.data.unpaired_loader import UnpairedDataset

TOK = load_tokenizer("byte")
GOOD = {"prompt": "Q: a?\nA:", "completion": " abc", "label": True}


def _write(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


def test_skip_invalid_skips_and_counts_every_kind_of_bad_record(tmp_path):
  lines = [
      GOOD,
      {"prompt": "p", "completion": "c"},                                    # 2: no label
      "{not json",                                                           # 3: a line that does not parse
      {"prompt": "p", "completion": "", "label": False},                     # 4: empty completion
      {"prompt_ids": [1], "completion_ids": [2, 7000], "label": True},       # 5: id >= the vocabulary
      {"prompt": "p", "chosen": " x"},                                       # 6: a paired record without rejected
      {"prompt": "Q: b?\nA:", "chosen": " yes", "rejected": " no"},          # 7: fine, two examples
      {"prompt_ids": [3], "completion_ids": [4, 5], "label": False},         # 8: fine
  ]
  path = _write(tmp_path / "kto.jsonl", lines)
  with pytest.raises(DataError, match=r"kto\.jsonl:2: label: missing"):
    UnpairedDataset.from_files(path, TOK)
  ds = UnpairedDataset.from_files(path, TOK, skip_invalid=True, id_limit=300)
  assert ds.num_skipped_invalid == 5
  assert [e.label for e in ds.examples] == [True, True, False, False]
  assert len(ds) == 4 and ds.num_dropped_truncated == 0
  # The first messages are kept, each naming its file and line.
  assert [m.split(": ")[0].rsplit(":", 1)[1] for m in ds.skipped_messages] == ["2", "3", "4", "5", "6"]
  assert "kto.jsonl:5: completion_ids: token id 7000 is outside [0, 300)" in ds.skipped_messages[3]
  assert ds.skipped_messages[1].endswith("kto.jsonl:3: malformed JSON: Expecting property name enclosed in double "
                                        "quotes (column 2)")
  # The eval split keeps the counters with the training part (the paired rule).
  train, held = eval_split(ds, 0.25, seed=0)
  assert train.num_skipped_invalid == 5 and train.skipped_messages == ds.skipped_messages
  assert held is not None and held.num_skipped_invalid == 0 and len(train) + len(held) == 4


def test_all_invalid_is_an_error_that_counts_them(tmp_path):
  path = _write(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
  with pytest.raises(DataError, match=r"no usable examples \(3 invalid, 0 dropped by truncation\)"):
    UnpairedDataset.from_files(path, TOK, skip_invalid=True)


def test_truncation_counters_match_a_hand_count(tmp_path):
  """max_length 12, max_prompt_length 5 (byte tokenizer: one id per byte, BOS before text prompts, EOS after
  completions)."""
  lines = [
      {"prompt": "abc", "completion": "de", "label": True},            # 4 + 3: nothing cut
      {"prompt": "abcdefgh", "completion": "xy", "label": False},      # prompt 9 -> 5 (BOS kept); 5 + 3 fits
      {"prompt": "ab", "completion": "0123456789abcd", "label": True},  # 3 + completion 15 -> 9
      {"prompt": "abcdefg", "completion": "0123456789", "label": True},  # prompt 8 -> 5, completion 11 -> 7
      {"prompt_ids": [1, 2, 3, 4, 5, 6], "completion_ids": [7], "label": False},  # prompt 6 -> 5 only
      {"prompt": "abcd", "chosen": " 0123456789", "rejected": " no"},  # prompt 5; chosen 12 -> 7, rejected 4 fits
  ]
  path = _write(tmp_path / "kto.jsonl", lines)
  counts = UnpairedCounts()
  examples, dropped = read_unpaired_files(path, TOK, _settings(12, 5), counts=counts)
  assert dropped == 0 and len(examples) == 7
  assert counts.truncated_prompts == 3  # records 2, 4, 5
  assert counts.truncated_completions == 3  # records 3, 4 and the chosen half of 6
  assert all(len(e.prompt_ids) <= 5 and len(e.prompt_ids) + len(e.completion_ids) <= 12 for e in examples)
  ds = UnpairedDataset.from_files(path, TOK, max_length=12, max_prompt_length=5)
  assert (ds.num_truncated_prompts, ds.num_truncated_responses) == (3, 3)
  # No prompt limit and a prompt longer than max_length: no room left, the example is dropped and counted.
  path2 = _write(tmp_path / "drop.jsonl", lines[:2])
  ds2 = UnpairedDataset.from_files(path2, TOK, max_length=5)
  # The kept one (4 + 3) has its completion cut to 1; the dropped one's cut prompt is not counted.
  assert ds2.num_dropped_truncated == 1 and len(ds2) == 1
  assert (ds2.num_truncated_prompts, ds2.num_truncated_responses) == (0, 1)


def _settings(max_length, max_prompt_length):
  from artifex_dpo.data import TruncationSettings
  return TruncationSettings(max_length, max_prompt_length)


@pytest.mark.parametrize("record,field,bad", [
    ({"prompt_ids": [1, 2], "completion_ids": [3, 300], "label": True}, "completion_ids", 300),
    ({"prompt_ids": [-1, 2], "completion_ids": [3], "label": True}, "prompt_ids", -1),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [299, 300]}, "rejected_ids", 300),
    ({"prompt_ids": [1], "chosen_ids": [-5], "rejected_ids": [2]}, "chosen_ids", -5),
])
def test_pretokenized_ids_are_checked_against_the_model_vocabulary(tmp_path, record, field, bad):
  """The run passes the model's vocabulary (`id_limit`, here 300, more than the byte tokenizer's 259 ids): the
  model's vocabulary decides, for unpaired and paired pre-tokenized records alike, naming file:line and field."""
  path = _write(tmp_path / "ids.jsonl", [GOOD, record])
  with pytest.raises(DataError) as e:
    UnpairedDataset.from_files(path, TOK, id_limit=300)
  assert str(e.value) == f"{path}:2: {field}: token id {bad} is outside [0, 300)"
  # Below the limit everything is read.
  fine = {k: ([min(max(i, 0), 299) for i in v] if k.endswith("_ids") else v) for k, v in record.items()}
  _write(tmp_path / "ids.jsonl", [GOOD, fine])
  assert len(UnpairedDataset.from_files(path, TOK, id_limit=300)) == 1 + (2 if "chosen_ids" in fine else 1)


def test_id_limit_below_the_tokenizer_vocabulary(tmp_path):
  """A model with fewer ids than the tokenizer: the model's vocabulary decides (as for paired records)."""
  assert TOK.vocab_size > 100
  path = _write(tmp_path / "ids.jsonl", [{"prompt_ids": [1], "completion_ids": [2, 150], "label": True}])
  assert len(UnpairedDataset.from_files(path, TOK)) == 1
  with pytest.raises(DataError, match=r"ids\.jsonl:1: completion_ids: token id 150 is outside \[0, 100\)"):
    UnpairedDataset.from_files(path, TOK, id_limit=100)
  examples = UnpairedDataset.from_files(path, TOK, id_limit=151).examples
  np.testing.assert_array_equal(examples[0].completion_ids, [2, 150])
