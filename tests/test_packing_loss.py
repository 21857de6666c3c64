"""Packed rows and precomputed reference log-probs give the same losses as the plain path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer
from artifex_dpo.data import PreferenceDataset, load_tokenizer, make_batch
from artifex_dpo.data.packing import make_packed_batch, packed_lengths, plan_packing
from artifex_dpo.data.synthetic import synthetic_records
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.trainer import dpo_loss
from artifex_dpo.types import GeneratedSequenceBatch, PackedPreferenceBatch, PreferenceBatch


@pytest.fixture(scope="module")
def setup():
  tok = load_tokenizer("byte")
  from artifex_dpo.data.formats import parse_record, tokenize_pairs
  texts = [parse_record(r, tok, "mem", i) for i, r in enumerate(synthetic_records(12, seed=3))]
  ds = PreferenceDataset.from_pairs(tokenize_pairs(texts, tok), tok.pad_id)
  cfg = get_preset("llama-tiny", vocab_size=tok.vocab_size)
  return ds, LlamaModel(cfg, rngs=nnx.Rngs(0)), LlamaModel(cfg, rngs=nnx.Rngs(1))


def _plain(ds, idx, ref=None):
  b = make_batch(ds, idx, int(ds.lengths[idx].max()))
  side = lambda s, r: GeneratedSequenceBatch(sequences=jnp.asarray(b[f"{s}_tokens"]),
                                            response_mask=jnp.asarray(b[f"{s}_response_mask"]),
                                            segment_ids=jnp.asarray(b[f"{s}_segment_ids"]),
                                            reference_sequence_log_probs=r)
  return PreferenceBatch(chosen=side("chosen", None if ref is None else ref[:, 0]),
                         rejected=side("rejected", None if ref is None else ref[:, 1]))


def _packed(ds, ref_table=None, share=False):
  plan = plan_packing(packed_lengths(ds.offsets, share), row_length=160, max_pairs_per_row=4)
  b = make_packed_batch(ds, plan, np.arange(plan.num_rows), share_prompt=share)
  assert plan.num_rows < len(ds)  # several pairs share rows
  ref = None
  if ref_table is not None:
    ref = jnp.asarray(np.where(b["pair_indices"][..., None] >= 0, ref_table[np.maximum(b["pair_indices"], 0)], 0.0))
  shared = {k: jnp.asarray(b[k]) for k in ("positions", "prefix_ids")} if share else {}
  return PackedPreferenceBatch(sequences=jnp.asarray(b["tokens"]), segment_ids=jnp.asarray(b["segment_ids"]),
                               response_mask=jnp.asarray(b["response_mask"]), pair_mask=jnp.asarray(b["pair_mask"]),
                               reference_sequence_log_probs=ref, **shared)


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "tokens")


@pytest.mark.parametrize("loss_type,share", [("sigmoid,sft", False), ("ipo", False), ("aot", False),
                                             ("sigmoid,sft", True), ("aot", True)])
def test_packed_equals_padded(setup, loss_type, share):
  ds, policy, ref = setup
  settings = DPOConfig(loss_type=loss_type, beta=0.5).loss_settings()
  idx = np.arange(len(ds))

  def run(batch):
    def f(p):
      m = nnx.merge(nnx.graphdef(policy), p)
      return dpo_loss(m, ref, batch, settings, chunk_size=32)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(nnx.state(policy))
    return metrics, grads

  m_plain, g_plain = run(_plain(ds, idx))
  packed = _packed(ds, share=share)
  if share:  # the prompt runs once: fewer tokens than the two sequences hold
    assert int(jnp.sum(packed.segment_ids > 0)) < int(m_plain["tokens"])
  m_packed, g_packed = run(packed)
  for k in KEYS:
    np.testing.assert_allclose(float(m_packed[k]), float(m_plain[k]), rtol=2e-5, atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6), g_packed, g_plain)


def test_precomputed_reference_sums_equal_the_reference_model(setup):
  ds, policy, ref = setup
  settings = DPOConfig(beta=0.3).loss_settings()
  idx = np.arange(len(ds))
  plain = _plain(ds, idx)
  # The reference's per-sequence sums, computed independently with a plain forward.
  table = np.zeros((len(ds), 2), np.float32)
  for j, side in enumerate(("chosen", "rejected")):
    s = getattr(plain, side)
    logits = np.asarray(ref(s.sequences, segment_ids=s.segment_ids), np.float64)
    lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    tok = np.take_along_axis(lsm[:, :-1], np.asarray(s.sequences)[:, 1:, None], -1)[..., 0]
    table[:, j] = (tok * np.asarray(s.response_mask)[:, 1:]).sum(-1)
  with_model, _ = dpo_loss(policy, ref, plain, settings)
  with_table, _ = dpo_loss(policy, None, _plain(ds, idx, jnp.asarray(table)), settings)
  packed_table, _ = dpo_loss(policy, None, _packed(ds, table), settings)
  shared_table, _ = dpo_loss(policy, None, _packed(ds, table, share=True), settings)
  shared_model, _ = dpo_loss(policy, ref, _packed(ds, share=True), settings)
  np.testing.assert_allclose(float(with_table), float(with_model), rtol=1e-5)
  np.testing.assert_allclose(float(packed_table), float(with_model), rtol=1e-5)
  np.testing.assert_allclose(float(shared_table), float(with_model), rtol=1e-5)
  np.testing.assert_allclose(float(shared_model), float(with_model), rtol=1e-5)


def test_trainer_trains_on_packed_rows(setup):
  ds, _, _ = setup
  cfg = get_preset("llama-tiny", vocab_size=259)
  model, ref = LlamaModel(cfg, rngs=nnx.Rngs(0)), LlamaModel(cfg, rngs=nnx.Rngs(0))
  t = DPOTrainer(model=model, reference_model=ref, optimizer=nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param))
  batch = _packed(ds)
  first, _ = t.train_step(batch)
  np.testing.assert_allclose(float(first), np.log(2), rtol=1e-5)  # policy == reference
  for _ in range(5):
    loss, _ = t.train_step(batch)
  assert float(loss) < float(first) - 0.05


def test_shared_prompt_respects_a_sliding_window(setup):
  """Mistral's window counts positions, so a rejected token sees its prompt as in its own sequence."""
  ds, _, _ = setup
  cfg = get_preset("llama-tiny", vocab_size=259, sliding_window=6)
  policy, ref = LlamaModel(cfg, rngs=nnx.Rngs(4)), LlamaModel(cfg, rngs=nnx.Rngs(5))
  settings = DPOConfig(beta=0.5).loss_settings()
  _, plain = dpo_loss(policy, ref, _plain(ds, np.arange(len(ds))), settings)
  _, shared = dpo_loss(policy, ref, _packed(ds, share=True), settings)
  for k in KEYS:
    np.testing.assert_allclose(float(shared[k]), float(plain[k]), rtol=2e-5, atol=1e-5, err_msg=k)


def test_shared_prompt_rows_need_a_model_taking_prefix_ids(setup):
  ds, _, _ = setup

  class NoPrefix(nnx.Module):
    def __init__(self):
      self.inner = LlamaModel(get_preset("llama-tiny", vocab_size=259), rngs=nnx.Rngs(0))

    def __call__(self, tokens, segment_ids=None, positions=None):
      return self.inner(tokens, segment_ids=segment_ids, positions=positions)

  model = NoPrefix()
  t = DPOTrainer(model=model, reference_model=NoPrefix(),
                 optimizer=nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param))
  with pytest.raises(ValueError, match="prefix_ids"):
    t.train_step(_packed(ds, share=True))
