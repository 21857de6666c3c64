"""Packed rows and precomputed reference log-probs give the same losses as the plain path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.trainer import dpo_loss
from layout_batches import packed_batch, padded_batch, tiny_models_and_pairs


@pytest.fixture(scope="module")
def setup():
  return tiny_models_and_pairs(12, seed=3)


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

  m_plain, g_plain = run(padded_batch(ds, idx))
  packed = packed_batch(ds, share=share)
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
  plain = padded_batch(ds, idx)
  # The reference's per-sequence sums, computed independently with a plain forward.
  table = np.zeros((len(ds), 2), np.float32)
  for j, side in enumerate(("chosen", "rejected")):
    s = getattr(plain, side)
    logits = np.asarray(ref(s.sequences, segment_ids=s.segment_ids), np.float64)
    lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    tok = np.take_along_axis(lsm[:, :-1], np.asarray(s.sequences)[:, 1:, None], -1)[..., 0]
    table[:, j] = (tok * np.asarray(s.response_mask)[:, 1:]).sum(-1)
  with_model, _ = dpo_loss(policy, ref, plain, settings)
  with_table, _ = dpo_loss(policy, None, padded_batch(ds, idx, jnp.asarray(table)), settings)
  packed_table, _ = dpo_loss(policy, None, packed_batch(ds, table), settings)
  shared_table, _ = dpo_loss(policy, None, packed_batch(ds, table, share=True), settings)
  shared_model, _ = dpo_loss(policy, ref, packed_batch(ds, share=True), settings)
  np.testing.assert_allclose(float(with_table), float(with_model), rtol=1e-5)
  np.testing.assert_allclose(float(packed_table), float(with_model), rtol=1e-5)
  np.testing.assert_allclose(float(shared_table), float(with_model), rtol=1e-5)
  np.testing.assert_allclose(float(shared_model), float(with_model), rtol=1e-5)


def test_trainer_trains_on_packed_rows(setup):
  ds, _, _ = setup
  cfg = get_preset("llama-tiny", vocab_size=259)
  model, ref = LlamaModel(cfg, rngs=nnx.Rngs(0)), LlamaModel(cfg, rngs=nnx.Rngs(0))
  t = DPOTrainer(model=model, reference_model=ref, optimizer=nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param))
  batch = packed_batch(ds)
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
  _, plain = dpo_loss(policy, ref, padded_batch(ds, np.arange(len(ds))), settings)
  _, shared = dpo_loss(policy, ref, packed_batch(ds, share=True), settings)
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
    t.train_step(packed_batch(ds, share=True))
