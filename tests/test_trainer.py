"""DPOTrainer: the seed's quick start, step semantics, reference handling, learning a preference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer, GeneratedSequenceBatch, PreferenceBatch
from artifex_dpo import losses
from artifex_dpo.models import LlamaModel, get_preset

V = 32


class PolicyModel(nnx.Module):
  """A user-written policy as in the seed's docs: int tokens [B, T] -> logits [B, T, V]."""

  def __init__(self, rngs: nnx.Rngs):
    self.emb = nnx.Embed(V, 16, rngs=rngs)
    self.mix = nnx.Linear(16, 16, rngs=rngs)
    self.out = nnx.Linear(16, V, rngs=rngs)

  def __call__(self, tokens):
    h = jnp.tanh(self.emb(tokens))
    # A causal running mean so each position sees its prefix only.
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
    return self.out(jnp.tanh(self.mix(h)))


def _batch(seed=0, b=4, tc=10, tr=12, prompt=4):
  rng = np.random.default_rng(seed)
  chosen_sequences = rng.integers(0, V, (b, tc))
  rejected_sequences = rng.integers(0, V, (b, tr))
  chosen_loss_mask = np.zeros((b, tc), np.int32)
  chosen_loss_mask[:, prompt:] = 1
  rejected_loss_mask = np.zeros((b, tr), np.int32)
  rejected_loss_mask[:, prompt:] = 1
  return chosen_sequences, chosen_loss_mask, rejected_sequences, rejected_loss_mask


def _params(model):
  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def test_seed_quick_start_runs_as_documented():
  chosen_sequences, chosen_loss_mask, rejected_sequences, rejected_loss_mask = _batch()
  model = PolicyModel(rngs=nnx.Rngs(0))
  reference_model = PolicyModel(rngs=nnx.Rngs(1))
  optimizer = nnx.Optimizer(model, optax.adam(1e-5), wrt=nnx.Param)
  trainer = DPOTrainer(
      model=model,
      reference_model=reference_model,
      optimizer=optimizer,
      config=DPOConfig(beta=0.1, label_smoothing=0.0),
  )
  batch = PreferenceBatch(
      chosen=GeneratedSequenceBatch.from_sequences(chosen_sequences, response_mask=chosen_loss_mask),
      rejected=GeneratedSequenceBatch.from_sequences(rejected_sequences, response_mask=rejected_loss_mask),
  )
  before, ref_before = _params(model), _params(reference_model)
  loss, metrics = trainer.train_step(batch)
  assert np.isfinite(float(loss)) and float(loss) == float(metrics["loss"])
  for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected", "logits/chosen", "logits/rejected", "dpo_loss", "reward_accuracy",
              "chosen_log_ratios", "rejected_log_ratios", "margin"):
    assert key in metrics, key
  after = _params(model)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  # The reference model is frozen.
  jax.tree.map(np.testing.assert_array_equal, ref_before, _params(reference_model))

  # The loss is the DPO formula on log-probs computed independently from the models' logits.
  def seq_logps(m, seqs, mask):
    logits = np.asarray(m(jnp.asarray(seqs)), np.float64)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = np.take_along_axis(lsm[:, :-1], seqs[:, 1:, None], -1)[..., 0]
    return (tok * mask[:, 1:]).sum(-1)

  nnx.update(model, jax.tree.map(jnp.asarray, before))
  d = ((seq_logps(model, chosen_sequences, chosen_loss_mask) - seq_logps(reference_model, chosen_sequences, chosen_loss_mask))
       - (seq_logps(model, rejected_sequences, rejected_loss_mask) - seq_logps(reference_model, rejected_sequences, rejected_loss_mask)))
  expected = np.mean(np.logaddexp(0.0, -0.1 * d))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  model_before = PolicyModel(rngs=nnx.Rngs(0))  # a copy of the weights the SimPO step starts from
  nnx.update(model_before, jax.tree.map(jnp.asarray, before))

  # SimPO / reference-free mode, as documented: -log sigmoid(beta * (mean log-prob chosen - mean log-prob
  # rejected)), gamma 0, no reference (the numpy log-probs of the same policy weights, per response token).
  simpo = DPOTrainer(model=model, reference_model=None, optimizer=optimizer,
                     config=DPOConfig(beta=2.0, reference_free=True))
  loss2, _ = simpo.train_step(batch)
  mean_c = seq_logps(model_before, chosen_sequences, chosen_loss_mask) / chosen_loss_mask.sum(-1)
  mean_r = seq_logps(model_before, rejected_sequences, rejected_loss_mask) / rejected_loss_mask.sum(-1)
  np.testing.assert_allclose(float(loss2), np.mean(np.logaddexp(0.0, -2.0 * (mean_c - mean_r))), rtol=1e-5)


def _trainer(config=DPOConfig(), tx=None, ref=True, accum=1):
  model = PolicyModel(rngs=nnx.Rngs(0))
  reference = PolicyModel(rngs=nnx.Rngs(1)) if ref else None
  optimizer = nnx.Optimizer(model, tx or optax.sgd(0.5), wrt=nnx.Param)
  return DPOTrainer(model=model, reference_model=reference, optimizer=optimizer, config=config,
                    grad_accum_steps=accum)


def _pref(seed=0, **kw):
  cs, cm, rs, rm = _batch(seed, **kw)
  return PreferenceBatch(chosen=GeneratedSequenceBatch.from_sequences(cs, response_mask=cm),
                         rejected=GeneratedSequenceBatch.from_sequences(rs, response_mask=rm))


def test_missing_reference_is_refused_never_silently_reference_free():
  with pytest.raises(ValueError, match="reference"):
    _trainer(ref=False)
  with pytest.raises(ValueError, match="reference"):
    _trainer(DPOConfig(loss_type="ipo"), ref=False)
  # Explicitly reference-free, precomputed reference values, or reference-less losses are fine.
  _trainer(DPOConfig(reference_free=True), ref=False)
  _trainer(DPOConfig(loss_type="simpo"), ref=False)
  t = _trainer(DPOConfig(precompute_ref_logps=True), ref=False)
  with pytest.raises(ValueError, match="reference_log_probs"):
    t.train_step(_pref())


def test_step_compiles_once_and_compute_loss_does_not_update():
  t = _trainer()
  batch = _pref()
  before = _params(t.model)
  loss_a, _ = t.compute_loss(batch)
  loss_b, _ = t.compute_loss(batch)
  assert float(loss_a) == float(loss_b)
  jax.tree.map(np.testing.assert_array_equal, before, _params(t.model))
  for seed in range(4):
    t.train_step(_pref(seed))
  assert t._train_step._cache_size() == 1


def test_gradients_flow_to_the_policy_only():
  t = _trainer()
  batch = _pref()
  loss_fn = lambda pol, ref: trainer_loss(t, pol, ref, batch)
  g_pol, g_ref = jax.grad(loss_fn, argnums=(0, 1))(nnx.state(t.model), nnx.state(t.reference_model))
  assert sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g_pol)) > 0
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_ref))


def trainer_loss(t, pol_state, ref_state, batch):
  model = nnx.merge(nnx.graphdef(t.model), pol_state)
  ref = nnx.merge(nnx.graphdef(t.reference_model), ref_state)
  from artifex_dpo.trainer import dpo_loss
  return dpo_loss(model, ref, batch, t.config.loss_settings())[0]


class _ExplodingReference(PolicyModel):
  def __call__(self, tokens):
    raise AssertionError("the reference forward must be skipped")


def test_precomputed_reference_log_probs_skip_the_reference_forward():
  batch = _pref()
  t = _trainer()
  ref_lp = {}
  for side in ("chosen", "rejected"):
    seqs = getattr(batch, side).sequences
    ref_lp[side], _ = losses.token_log_probs_from_logits(t.reference_model(seqs), seqs)
  expected, exp_m = t.compute_loss(batch)
  with_ref = PreferenceBatch(
      chosen=batch.chosen.replace(reference_log_probs=ref_lp["chosen"]),
      rejected=batch.rejected.replace(reference_log_probs=ref_lp["rejected"]))
  t2 = DPOTrainer(model=t.model, reference_model=_ExplodingReference(rngs=nnx.Rngs(1)),
                  optimizer=t.optimizer, config=t.config)
  got, m = t2.compute_loss(with_ref)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
  np.testing.assert_allclose(float(m["rewards/margins"]), float(exp_m["rewards/margins"]), rtol=1e-5, atol=1e-6)
  t2.train_step(with_ref)


def test_right_padding_changes_no_score():
  cs, cm, rs, rm = _batch()
  base = _trainer().compute_loss(PreferenceBatch(
      chosen=GeneratedSequenceBatch.from_sequences(cs, response_mask=cm),
      rejected=GeneratedSequenceBatch.from_sequences(rs, response_mask=rm)))[0]
  pad = lambda x: np.pad(x, ((0, 0), (0, 5)))
  padded = _trainer().compute_loss(PreferenceBatch(
      chosen=GeneratedSequenceBatch.from_sequences(pad(cs), response_mask=pad(cm), attention_mask=pad(np.ones_like(cs))),
      rejected=GeneratedSequenceBatch.from_sequences(pad(rs), response_mask=pad(rm), attention_mask=pad(np.ones_like(rs)))))[0]
  np.testing.assert_allclose(float(padded), float(base), rtol=1e-6)
  # A model that takes no segment ids cannot be exact on left padding: refused, not silently wrong.
  left = lambda x: np.pad(x, ((0, 0), (3, 0)))
  with pytest.raises(ValueError, match="segment_ids"):
    _trainer().compute_loss(PreferenceBatch(
        chosen=GeneratedSequenceBatch.from_sequences(left(cs), response_mask=left(cm), attention_mask=left(np.ones_like(cs))),
        rejected=GeneratedSequenceBatch.from_sequences(rs, response_mask=rm)))


def test_gradient_accumulation_equals_one_big_batch():
  batch = _pref(b=8)
  one, two = _trainer(tx=optax.sgd(0.3)), _trainer(tx=optax.sgd(0.3), accum=2)
  _, m1 = one.train_step(batch)
  _, m2 = two.train_step(batch)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
  assert float(m1["tokens"]) == float(m2["tokens"]) == 8 * (10 + 12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), _params(one.model), _params(two.model))


def test_nonfinite_step_leaves_the_state_untouched():
  t = _trainer(DPOConfig(precompute_ref_logps=True), tx=optax.adam(1e-2), ref=False)
  batch = _pref()
  nan = jnp.full(batch.chosen.sequences.shape, jnp.nan)
  bad = PreferenceBatch(chosen=batch.chosen.replace(reference_log_probs=nan),
                        rejected=batch.rejected.replace(reference_log_probs=jnp.zeros(batch.rejected.sequences.shape)))
  before = jax.tree.map(np.asarray, nnx.state((t.model, t.optimizer)))
  _, m = t.train_step(bad)
  assert float(m["nonfinite"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state((t.model, t.optimizer))))


def test_batch_validation_errors_are_clear():
  with pytest.raises(ValueError, match="response_mask has shape"):
    GeneratedSequenceBatch.from_sequences(np.zeros((2, 5)), response_mask=np.zeros((2, 4)))
  with pytest.raises(ValueError, match="2-D"):
    GeneratedSequenceBatch.from_sequences(np.zeros((5,)))
  with pytest.raises(ValueError, match=r"response_mask\[:, 0\]"):
    GeneratedSequenceBatch.from_sequences(np.zeros((2, 5)), response_mask=np.ones((2, 5)))
  with pytest.raises(ValueError, match="padding"):
    GeneratedSequenceBatch.from_sequences(np.zeros((1, 4)), response_mask=[[0, 1, 1, 1]], attention_mask=[[1, 1, 1, 0]])
  a = GeneratedSequenceBatch.from_sequences(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="pair up"):
    PreferenceBatch(chosen=a, rejected=GeneratedSequenceBatch.from_sequences(np.zeros((3, 5))))
  # Defaults: every real token after position 0 that is not prompt is scored.
  b = GeneratedSequenceBatch.from_sequences(np.arange(6).reshape(1, 6), prompt_mask=[[1, 1, 1, 0, 0, 0]], pad_token_id=5)
  np.testing.assert_array_equal(np.asarray(b.response_mask), [[0, 0, 0, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(b.segment_ids), [[1, 1, 1, 1, 1, 0]])


# ---- with our Llama model: padding via segment ids, and learning a preference ----


def _llama(seed):
  return LlamaModel(get_preset("llama-tiny", vocab_size=64), rngs=nnx.Rngs(seed))


def test_left_padding_changes_no_score_with_segment_ids():
  rng = np.random.default_rng(0)
  cs, rs = rng.integers(0, 64, (2, 9)), rng.integers(0, 64, (2, 7))
  cm, rm = np.zeros_like(cs), np.zeros_like(rs)
  cm[:, 4:], rm[:, 3:] = 1, 1
  model, ref = _llama(0), _llama(1)
  t = DPOTrainer(model=model, reference_model=ref, optimizer=nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param))
  base, bm = t.compute_loss(PreferenceBatch(chosen=GeneratedSequenceBatch.from_sequences(cs, response_mask=cm),
                                            rejected=GeneratedSequenceBatch.from_sequences(rs, response_mask=rm)))
  left = lambda x, n: np.pad(x, ((0, 0), (n, 0)))
  got, gm = t.compute_loss(PreferenceBatch(
      chosen=GeneratedSequenceBatch.from_sequences(left(cs, 3), response_mask=left(cm, 3), attention_mask=left(np.ones_like(cs), 3)),
      rejected=GeneratedSequenceBatch.from_sequences(left(rs, 6), response_mask=left(rm, 6), attention_mask=left(np.ones_like(rs), 6))))
  np.testing.assert_allclose(float(got), float(base), rtol=1e-5)
  np.testing.assert_allclose(float(gm["logps/chosen"]), float(bm["logps/chosen"]), rtol=1e-5)


def _halves_batch(rng, b, vocab=64, prompt_len=6, resp_len=8):
  """Chosen responses use the lower half of the vocabulary, rejected the upper half."""
  prompts = rng.integers(0, vocab, (b, prompt_len))
  chosen = np.concatenate([prompts, rng.integers(0, vocab // 2, (b, resp_len))], 1)
  rejected = np.concatenate([prompts, rng.integers(vocab // 2, vocab, (b, resp_len))], 1)
  mask = np.zeros_like(chosen)
  mask[:, prompt_len:] = 1
  return PreferenceBatch(chosen=GeneratedSequenceBatch.from_sequences(chosen, response_mask=mask),
                         rejected=GeneratedSequenceBatch.from_sequences(rejected, response_mask=mask))


def test_learns_a_preference_on_held_out_pairs():
  model, ref = _llama(0), _llama(0)
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  t = DPOTrainer(model=model, reference_model=ref, optimizer=optimizer, config=DPOConfig(beta=0.1))
  rng = np.random.default_rng(0)
  held_out = _halves_batch(np.random.default_rng(123), 64)
  _, m0 = t.compute_loss(held_out)
  assert float(m0["rewards/accuracies"]) == 0.0  # policy == reference: no reward yet
  for _ in range(200):
    t.train_step(_halves_batch(rng, 8))
  _, m = t.compute_loss(held_out)
  print("held-out accuracy", float(m["rewards/accuracies"]), "margin", float(m["rewards/margins"]))
  assert float(m["rewards/accuracies"]) > 0.95
  assert float(m["rewards/margins"]) > 0
