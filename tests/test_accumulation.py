"""Gradient accumulation equals one big batch, whatever the layout and the loss.

Packed rows holding different numbers of pairs, and padded pairs of different lengths, make
microbatches of unequal weight: an update over ``grad_accum_steps`` microbatches must equal the
update over the whole batch at once (loss, every metric, gradient norm, new parameters), and
the whole batch's loss is checked against a numpy computation from the model's logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer
from artifex_dpo.data import PreferenceDataset, load_tokenizer, make_batch
from artifex_dpo.data.formats import TokenizedPair, parse_record, tokenize_pairs
from artifex_dpo.data.packing import PackingPlan, make_packed_batch
from artifex_dpo.data.synthetic import synthetic_records
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.types import GeneratedSequenceBatch, PackedPreferenceBatch, PreferenceBatch

ROW_SIZES = (3, 2, 3, 2)  # pairs per packed row: strided microbatches of 2 hold 6 and 4 pairs
BETA = 0.5


@pytest.fixture(scope="module")
def data():
  tok = load_tokenizer("byte")
  texts = [parse_record(r, tok, "mem", i) for i, r in enumerate(synthetic_records(sum(ROW_SIZES), seed=11))]
  ds = PreferenceDataset.from_pairs(tokenize_pairs(texts, tok), tok.pad_id)
  # Different lengths, so microbatches hold different token counts.
  assert len(set(ds.lengths[:, 0].tolist())) > 3
  mcfg = get_preset("llama-tiny", vocab_size=tok.vocab_size, num_layers=1, hidden_size=32, intermediate_size=64,
                    num_heads=2, num_kv_heads=1)
  return ds, mcfg, oracle_token_logps(mcfg, ds)


def oracle_token_logps(model_config, ds):
  """Per side: float64 per-token log-probs (policy, reference) of every pair's scored tokens, and the mask."""
  policy, ref = LlamaModel(model_config, rngs=nnx.Rngs(0)), LlamaModel(model_config, rngs=nnx.Rngs(1))
  batch = padded(ds, np.arange(len(ds)))
  graphdef = nnx.graphdef(policy)
  forward = jax.jit(lambda state, x, g: nnx.merge(graphdef, state)(x, segment_ids=g))  # one compile for both
  out = {}
  for side in ("chosen", "rejected"):
    s = getattr(batch, side)
    seqs = np.asarray(s.sequences)
    # The scored tokens from the dataset's offsets (not the batch's mask): the response, from position 1 on.
    o = ds.offsets
    prompt, end = o[:, 1] - o[:, 0], o[:, 1] - o[:, 0] + (o[:, 2] - o[:, 1] if side == "chosen" else o[:, 3] - o[:, 2])
    t = np.arange(seqs.shape[1])[None, :]
    mask = ((t >= np.maximum(prompt, 1)[:, None]) & (t < end[:, None])).astype(np.float64)
    per_tok = []
    for m in (policy, ref):
      logits = np.asarray(forward(nnx.state(m), s.sequences, s.segment_ids), np.float64)
      lsm = logits - logits.max(-1, keepdims=True)
      lsm = lsm - np.log(np.exp(lsm).sum(-1, keepdims=True))
      # Logits at t-1 predict token t: the log-prob of token t is read one position back.
      per_tok.append(np.take_along_axis(lsm[:, :-1], seqs[:, 1:, None], -1)[..., 0] * mask[:, 1:])
    out[side] = (*per_tok, mask[:, 1:])
  return out


def padded(ds, idx):
  b = make_batch(ds, idx, int(ds.lengths[idx].max()))
  side = lambda s: GeneratedSequenceBatch(sequences=jnp.asarray(b[f"{s}_tokens"]),
                                         response_mask=jnp.asarray(b[f"{s}_response_mask"]),
                                         segment_ids=jnp.asarray(b[f"{s}_segment_ids"]))
  return PreferenceBatch(chosen=side("chosen"), rejected=side("rejected"))


def packed(ds):
  """Rows holding ROW_SIZES pairs (pairs 0..N-1 in order), each row with 3 slots."""
  offsets = np.concatenate([[0], np.cumsum(ROW_SIZES)]).astype(np.int64)
  pairs = np.arange(sum(ROW_SIZES), dtype=np.int64)
  row_tokens = np.array([ds.lengths[pairs[a:b]].sum() for a, b in zip(offsets[:-1], offsets[1:])], np.int64)
  plan = PackingPlan(offsets, pairs, row_tokens, int(row_tokens.max()), max(ROW_SIZES), 1.0)
  b = make_packed_batch(ds, plan, np.arange(len(ROW_SIZES)))
  np.testing.assert_array_equal(b["pair_mask"].sum(1), ROW_SIZES)
  return PackedPreferenceBatch(sequences=jnp.asarray(b["tokens"]), segment_ids=jnp.asarray(b["segment_ids"]),
                               response_mask=jnp.asarray(b["response_mask"]), pair_mask=jnp.asarray(b["pair_mask"]))


def step(model_config, config, batch, accum):
  """One SGD update of a fresh policy (seed 0) against a reference (seed 1): (metrics, new params)."""
  model = LlamaModel(model_config, rngs=nnx.Rngs(0))
  ref = LlamaModel(model_config, rngs=nnx.Rngs(1))
  t = DPOTrainer(model=model, reference_model=ref, optimizer=nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param),
                 config=config, grad_accum_steps=accum)
  _, metrics = t.train_step(batch)
  return jax.device_get(metrics), jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def numpy_loss(token_logps, idx, config):
  """The loss of the pairs ``idx`` as one batch, from the oracle's per-token log-probs."""
  (pc, rc, mc), (pr, rr, mr) = ([x[idx] for x in token_logps[s]] for s in ("chosen", "rejected"))
  nc, nr = mc.sum(1), mr.sum(1)
  mean = config.logp_reduction == "mean"
  c = (pc.sum(1) - rc.sum(1)) / (nc if mean else 1)
  r = (pr.sum(1) - rr.sum(1)) / (nr if mean else 1)
  loss = np.mean(np.logaddexp(0.0, -BETA * (c - r)))
  if "sft" in config.loss_types:
    loss += -pc.sum() / nc.sum()  # TRL 1.16: the mean over every chosen token of the batch
  return loss


CONFIGS = {
    "sigmoid": DPOConfig(beta=BETA),
    "sigmoid,sft": DPOConfig(beta=BETA, loss_type="sigmoid,sft"),
    "sigmoid,sft-mean": DPOConfig(beta=BETA, loss_type="sigmoid,sft", logp_reduction="mean"),
}


def assert_same_update(a, b, rtol=2e-5):
  (ma, pa), (mb, pb) = a, b
  assert set(ma) == set(mb)
  for k in ma:
    np.testing.assert_allclose(float(mb[k]), float(ma[k]), rtol=rtol, atol=1e-6, err_msg=k)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6), pa, pb)


@pytest.mark.parametrize("name", ["sigmoid", "sigmoid,sft-mean"])
def test_accumulation_over_packed_rows_with_uneven_pair_counts(data, name):
  ds, mcfg, token_logps = data
  config = CONFIGS[name]
  batch = packed(ds)
  whole = step(mcfg, config, batch, 1)
  accumulated = step(mcfg, config, batch, 2)
  assert_same_update(whole, accumulated)
  assert float(accumulated[0]["tokens"]) == float(ds.lengths.sum())
  expected = numpy_loss(token_logps, np.arange(len(ds)), config)
  np.testing.assert_allclose(float(accumulated[0]["loss"]), expected, rtol=1e-5)


def test_accumulation_over_padded_pairs_of_varying_lengths(data):
  ds, mcfg, token_logps = data
  config = CONFIGS["sigmoid,sft"]
  idx = np.arange(8)
  batch = padded(ds, idx)
  # Strided microbatches (rows m, m+4, ...) hold different numbers of chosen tokens.
  resp = np.asarray(batch.chosen.response_mask).sum(1)
  assert len({int(resp[m::4].sum()) for m in range(4)}) > 1
  whole = step(mcfg, config, batch, 1)
  assert_same_update(whole, step(mcfg, config, batch, 4))
  np.testing.assert_allclose(float(whole[0]["loss"]), numpy_loss(token_logps, idx, config), rtol=1e-5)


def test_accumulation_is_refused_for_losses_that_sort_over_the_batch(data):
  _, mcfg, _ = data
  model = LlamaModel(mcfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
  for loss_type in ("aot", "sigmoid,aot_unpaired"):
    with pytest.raises(ValueError, match="grad_accum_steps"):
      DPOTrainer(model=model, reference_model=model, optimizer=opt, config=DPOConfig(loss_type=loss_type),
                 grad_accum_steps=2)
  DPOTrainer(model=model, reference_model=model, optimizer=opt, config=DPOConfig(loss_type="aot"))


def test_eval_batches_with_the_sets_normalizers_add_up_to_the_whole_set(data):
  """What the service's eval does: every eval batch (the last one filled up with filler pairs) is
  normalised by the whole set's counts, and the batches' metrics are added."""
  from artifex_dpo.data import eval_batches
  from artifex_dpo.train import eval_normalizers
  from artifex_dpo.trainer import batch_normalizers, dpo_loss

  ds, mcfg, token_logps = data
  # A pair with an empty prompt: its response's first token has no context and is not scored.
  edge = TokenizedPair(np.zeros(0, np.int32), np.array([97, 98, 99], np.int32), np.array([120, 121], np.int32))
  ds = PreferenceDataset.from_pairs([ds[i] for i in range(len(ds))] + [edge], ds.pad_id)
  assert ds.prompt_lengths[-1] == 0
  whole = padded(ds, np.arange(len(ds)))
  norms = eval_normalizers(ds)
  for got, want in zip(norms, batch_normalizers(whole), strict=True):
    assert float(got) == float(want)
  policy, ref = LlamaModel(mcfg, rngs=nnx.Rngs(0)), LlamaModel(mcfg, rngs=nnx.Rngs(1))
  settings = CONFIGS["sigmoid,sft"].loss_settings()
  evaluate = jax.jit(lambda b, n: dpo_loss(policy, ref, b, settings, chunk_size=32, normalizers=n)[1])
  length = int(ds.lengths.max())
  sums = {}
  for local in eval_batches(ds, 4, max_length=length):  # 11 pairs: batches of 4, 4 and 3 + 1 filler
    b = local
    side = lambda s: GeneratedSequenceBatch(sequences=jnp.asarray(b[f"{s}_tokens"]),
                                           response_mask=jnp.asarray(b[f"{s}_response_mask"]),
                                           segment_ids=jnp.asarray(b[f"{s}_segment_ids"]))
    batch = PreferenceBatch(chosen=side("chosen"), rejected=side("rejected"), pair_mask=jnp.asarray(b["pair_mask"]))
    for k, v in jax.device_get(evaluate(batch, norms)).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  assert local["pair_mask"].tolist() == [1, 1, 1, 0]
  expected = jax.device_get(evaluate(whole, batch_normalizers(whole)))
  for k, v in expected.items():
    np.testing.assert_allclose(sums[k], float(v), rtol=2e-5, atol=1e-6, err_msg=k)
