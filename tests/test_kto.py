"""KTO through the library: unpaired records (and paired ones, unpaired) -> padded batches with KL rows ->
DPOTrainer; learning on the tiny task, measured on held-out pairs; file:line errors for bad records."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer, PreferenceBatch, UnpairedBatch
from artifex_dpo import losses
from artifex_dpo.data import DataError, PreferenceDataset, TruncationSettings, load_tokenizer, make_batch
from artifex_dpo.data.formats import parse_record, tokenize_pairs
from artifex_dpo.data.synthetic import synthetic_records
from artifex_dpo.data.unpaired import make_unpaired_batch, read_unpaired, read_unpaired_files
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.trainer import dpo_loss
from artifex_dpo.types import GeneratedSequenceBatch

TOK = load_tokenizer("byte")


def test_records_of_every_form(tmp_path):
  records = [
      {"prompt": "Q: a?\nA:", "completion": " abc", "label": True},
      {"prompt": "Q: b?\nA:", "completion": " xyz", "label": False},
      {"prompt": "Q: c?\nA:", "chosen": " aa", "rejected": " zz"},
      {"prompt_ids": [5, 6], "completion_ids": [7, 8], "label": True},
  ]
  path = tmp_path / "kto.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  examples, dropped = read_unpaired_files(str(path), TOK, TruncationSettings(64, 32))
  assert dropped == 0
  assert [e.label for e in examples] == [True, False, True, False, True]
  eos = TOK.eos_id
  assert list(examples[0].completion_ids) == TOK.encode(" abc") + [eos]
  assert list(examples[0].prompt_ids) == list(parse_record(records[2], TOK) and tokenize_pairs(
      [parse_record({"prompt": "Q: a?\nA:", "chosen": "x", "rejected": "y"}, TOK)], TOK)[0].prompt_ids)
  assert list(examples[3].completion_ids) == TOK.encode(" zz") + [eos]  # the rejected response, undesirable
  assert list(examples[4].prompt_ids) == [5, 6] and list(examples[4].completion_ids) == [7, 8]
  # Truncation: the paired rules (prompt kept at its end, completion cut to fit, empty -> dropped).
  short, dropped = read_unpaired([("m", 1, records[0])], TOK, TruncationSettings(8, 4))
  assert len(short[0].prompt_ids) == 4 and len(short[0].prompt_ids) + len(short[0].completion_ids) == 8


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "p", "completion": "c"}, "kto.jsonl:2: label: missing"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "kto.jsonl:2: label: expected true or false"),
    ({"prompt": "p", "completion": "", "label": True}, "kto.jsonl:2: completion: empty"),
    ({"prompt": "p", "completion": 3, "label": True}, "kto.jsonl:2: completion: expected a string"),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
      "label": True}, "kto.jsonl:2: conversational record, but the tokenizer"),
    ({"prompt_ids": [1], "completion_ids": [1, 9999], "label": False}, "kto.jsonl:2: completion_ids: token id 9999"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, expected):
  path = tmp_path / "kto.jsonl"
  path.write_text(json.dumps({"prompt": "ok", "completion": " fine", "label": True}) + "\n" + json.dumps(record) + "\n")
  with pytest.raises(DataError) as e:
    read_unpaired_files(str(path), TOK)
  assert str(e.value).endswith(str(e.value).split(str(path))[-1]) and f"{tmp_path}/{expected}" in str(e.value)


def test_conversational_records_render_with_the_chat_template():
  class Chat:
    """The byte tokenizer with a one-line chat template."""
    has_chat_template = True
    name = "chat"

    def __getattr__(self, k):
      return getattr(TOK, k)

    def apply_chat_template(self, messages, add_generation_prompt=False):
      text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
      return text + ("<assistant>" if add_generation_prompt else "")

  record = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
            "label": False}
  (ex,), _ = read_unpaired([("m", 1, record)], Chat())
  assert list(ex.prompt_ids) == TOK.encode("<user>hi<assistant>")
  assert list(ex.completion_ids) == TOK.encode("yo") + [TOK.eos_id] and not ex.label


def test_kl_rows_rotate_completions_by_one():
  examples, _ = read_unpaired([("m", i, {"prompt": f"P{i}", "completion": f" c{i}", "label": i % 2 == 0})
                               for i in range(3)], TOK)
  b = make_unpaired_batch(examples, pad_id=TOK.pad_id, with_kl=True, pad_multiple=8)
  picked = lambda row, mask: [int(t) for t, s in zip(row, mask) if s]
  for i in range(3):
    j = (i - 1) % 3
    assert picked(b["kl_tokens"][i], b["kl_segment_ids"][i]) == list(examples[i].prompt_ids) + list(
        examples[j].completion_ids)
    assert picked(b["kl_tokens"][i], b["kl_response_mask"][i]) == list(examples[j].completion_ids)
  assert b["completion_tokens"].shape[1] % 8 == 0 and list(b["labels"]) == [1, 0, 1]
  with pytest.raises(ValueError, match="at least 2"):
    make_unpaired_batch(examples[:1], pad_id=TOK.pad_id, with_kl=True)


def _llama(seed):
  return LlamaModel(get_preset("llama-tiny", vocab_size=TOK.vocab_size), rngs=nnx.Rngs(seed))


def test_trainer_loss_equals_the_pure_kto_loss_on_model_log_probs():
  examples, _ = read_unpaired([("m", i, r) for i, r in enumerate(synthetic_records(4, seed=1))], TOK)
  batch = UnpairedBatch.from_arrays(make_unpaired_batch(examples, pad_id=TOK.pad_id, with_kl=True))
  policy, ref = _llama(0), _llama(1)
  graph, ref_graph = nnx.graphdef(policy), nnx.graphdef(ref)
  s = DPOConfig(loss_type="kto", beta=0.3, undesirable_weight=1.3).loss_settings()

  def ours(p, r):
    return dpo_loss(nnx.merge(graph, p), nnx.merge(ref_graph, r), batch, s)

  def oracle(p, r, kl_p):
    """Sums of per-token log-probs from the models' full logits; the policy's KL sums come from ``kl_p``."""
    def sums(state, g, side):
      model = nnx.merge(g, state)
      lp, _ = losses.token_log_probs_from_logits(model(side.sequences, segment_ids=side.segment_ids), side.sequences)
      return jnp.sum(lp * side.response_mask, axis=-1)
    return losses.unpaired_loss(s, sums(p, graph, batch.completions), sums(r, ref_graph, batch.completions),
                                batch.labels, sums(kl_p, graph, batch.kl), sums(r, ref_graph, batch.kl))

  p, r = nnx.state(policy), nnx.state(ref)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(p, r)
  # The oracle differentiates only through the completions: the KL rows are held fixed (TRL: no_grad).
  (expected, m), expected_grads = jax.jit(jax.value_and_grad(oracle, has_aux=True))(p, r, p)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), float(m["kl"]), rtol=1e-5, atol=1e-6)
  assert float(m["kl"]) > 0  # not clamped: the KL term is live in the gradients
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6), grads, expected_grads)


def test_trainer_refuses_the_wrong_batch_kind():
  model = _llama(0)
  t = DPOTrainer(model, _llama(0), nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param), DPOConfig(loss_type="kto"))
  examples, _ = read_unpaired([("m", i, r) for i, r in enumerate(synthetic_records(2, seed=1))], TOK)
  no_kl = UnpairedBatch.from_arrays(make_unpaired_batch(examples, pad_id=TOK.pad_id, with_kl=False))
  with pytest.raises(ValueError, match="KL rows"):
    t.train_step(no_kl)
  side = GeneratedSequenceBatch.from_sequences(np.ones((2, 5), np.int32), prompt_mask=np.eye(2, 5, dtype=np.int32))
  with pytest.raises(ValueError, match="UnpairedBatch"):
    t.train_step(PreferenceBatch(side, side))


@pytest.mark.parametrize("loss_type", ["kto"])
def test_kto_learns_the_tiny_preference_on_held_out_pairs(loss_type):
  """The tiny task unpaired: 256 pairs -> 512 labelled completions, 80 steps of 16 examples."""
  train, _ = read_unpaired([("m", i, r) for i, r in enumerate(synthetic_records(256, seed=0))], TOK,
                           TruncationSettings(64, 32))
  held_out = [parse_record(r, TOK) for r in synthetic_records(64, seed=99)]
  eval_ds = PreferenceDataset.from_pairs(tokenize_pairs(held_out, TOK), TOK.pad_id)
  raw = make_batch(eval_ds, np.arange(64), int(eval_ds.lengths.max()))
  side = lambda s: GeneratedSequenceBatch(sequences=jnp.asarray(raw[f"{s}_tokens"]),
                                         response_mask=jnp.asarray(raw[f"{s}_response_mask"]),
                                         segment_ids=jnp.asarray(raw[f"{s}_segment_ids"]))
  eval_pairs = PreferenceBatch(side("chosen"), side("rejected"))
  model, ref = _llama(0), _llama(0)
  t = DPOTrainer(model, ref, nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param),
                 DPOConfig(loss_type=loss_type, beta=0.1))
  judge = DPOTrainer(model, ref, nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param), DPOConfig(beta=0.1))
  rng = np.random.default_rng(0)
  order = rng.permutation(len(train))
  for step in range(80):
    idx = order[(step * 16) % len(order):][:16]
    arrays = make_unpaired_batch([train[i] for i in idx], pad_id=TOK.pad_id, with_kl=True, pad_multiple=16,
                                 max_length=64)
    _, m = t.train_step(UnpairedBatch.from_arrays(arrays))
  _, ev = judge.compute_loss(eval_pairs)
  print("KTO held-out accuracy", float(ev["rewards/accuracies"]), "margin", float(ev["rewards/margins"]),
        "last kl", float(m["kl"]))
  assert float(ev["rewards/accuracies"]) >= 0.9
  assert float(ev["rewards/margins"]) > 0


def test_loader_batches_do_not_depend_on_the_process_count():
  from artifex_dpo.data.unpaired_loader import UnpairedDataset, UnpairedLoader, unpaired_eval_batches

  examples, _ = read_unpaired([("m", i, r) for i, r in enumerate(synthetic_records(10, seed=2))], TOK)
  ds = UnpairedDataset(examples, TOK.pad_id)
  kw = dict(seed=1, shuffle=True, pad_multiple=8, max_length=64, with_kl=True)
  whole = UnpairedLoader(ds, 8, process_index=0, process_count=1, **kw).load(3)
  parts = [UnpairedLoader(ds, 8, process_index=p, process_count=2, **kw).load(3) for p in (0, 1)]
  for key in ("completion_tokens", "kl_tokens", "kl_response_mask", "labels", "pair_indices"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
  # The KL rows rotate over the global batch: process 1's first KL row ends with process 0's last completion.
  g = whole["pair_indices"]
  last_of_p0 = list(ds.examples[int(g[3])].completion_ids)
  row = parts[1]["kl_tokens"][0][parts[1]["kl_response_mask"][0] == 1]
  assert list(row) == last_of_p0
  # Eval: every example once; the last batch filled with empty rows that count nowhere.
  batches = list(unpaired_eval_batches(ds, 8, pad_multiple=8, max_length=64))
  masks = np.concatenate([b["example_mask"] for b in batches])
  assert masks.sum() == len(ds) and len(masks) == 24
  assert not batches[-1]["completion_segment_ids"][masks[16:] == 0].any()
