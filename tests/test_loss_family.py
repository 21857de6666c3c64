"""WPO, LD-DPO, f-DPO, ORPO, CPO / AlphaPO and KTO against TRL 1.16's own loss code on random inputs.

Tolerances: the tests assert rtol 2e-5 / atol 1e-6; measured on these inputs (float32 here vs TRL in torch
float32), the largest |ours - TRL| / max(|TRL|, 1) over losses and metrics is 1.6e-7 (WPO), 1.1e-7 (LD-DPO),
2.0e-7 (f-DPO), 1.0e-7 (ORPO), 1.5e-7 (CPO / AlphaPO), 1.3e-7 (KTO).
"""

from __future__ import annotations

import collections
import functools
import os
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artifex_dpo import DPOConfig, losses
from artifex_dpo.trainer import continued_token_mask

torch = pytest.importorskip("torch")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")

B, T, V = 6, 11, 17
RTOL, ATOL = 2e-5, 1e-6


def _random_inputs(seed):
  """Per-token log-probs and reference log-probs (aligned with tokens), WPO's log sum p^2, response masks
  of [chosen; rejected] (lengths differ, so LD-DPO has tails to weight)."""
  rng = np.random.default_rng(seed)
  logps = -rng.uniform(0.05, 3.0, size=(2 * B, T)).astype(np.float32)
  ref = (logps + rng.normal(0, 0.4, size=(2 * B, T))).astype(np.float32)
  log_sum_sq = -rng.uniform(0.5, 3.0, size=(2 * B, T)).astype(np.float32)
  mask = np.zeros((2 * B, T), np.int32)
  for i in range(2 * B):
    start = rng.integers(1, 4)
    end = rng.integers(start + 1, T + 1)
    mask[i, start:end] = 1
  for a in (logps, ref, log_sum_sq):
    a[:, 0] = 0.0
  return logps, ref, log_sum_sq, mask


def _ours(config: DPOConfig, logps, ref, lss, mask):
  s = config.loss_settings()
  weights = None
  if s.ld_alpha is not None:
    n = mask.sum(1)
    shared = np.minimum(n[:B], n[B:])
    weights = losses.ld_token_weights(jnp.asarray(mask), jnp.arange(2 * B)[:, None] * jnp.ones((1, T), jnp.int32),
                                      jnp.asarray(np.concatenate([shared, shared]), jnp.float32), s.ld_alpha)
  pol = losses.sequence_stats(jnp.asarray(logps), jnp.asarray(mask), token_weights=weights,
                              log_sum_sq=jnp.asarray(lss) if s.use_weighting else None)
  refs = losses.sequence_stats(jnp.asarray(ref), jnp.asarray(mask), token_weights=weights)
  half = lambda st, i: jax.tree.map(lambda x: x[i * B:(i + 1) * B], st)
  return losses.preference_loss(s, half(pol, 0), half(pol, 1), half(refs, 0), half(refs, 1),
                                jnp.asarray(logps[:B]), jnp.asarray(mask[:B]))


def _trl_dpo(config: DPOConfig, logps, ref, lss, mask):
  """TRL 1.16's ``DPOTrainer._compute_loss`` with the reference model's forward (so LD-DPO weights it too)."""
  shifted = lambda a: torch.tensor((a * mask.astype(np.float32))[:, 1:])

  def outputs(log_probs):
    return types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                                 mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(log_probs).bool(),
                                 log_sum_sq_probs=torch.tensor(lss[:, 1:].copy()))

  fake = types.SimpleNamespace(
      # _modules: accelerate inspects it when peft is installed (is_peft_model).
      model=types.SimpleNamespace(training=True, is_gradient_checkpointing=False, _modules={}),
      ref_model=lambda **kw: outputs(shifted(ref)),
      accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
      aux_loss_enabled=False, ld_alpha=config.ld_alpha, precompute_ref_logps=False,
      f_divergence_type=config.f_divergence_type, f_alpha_divergence_coef=config.f_alpha_divergence_coef,
      loss_types=list(config.loss_types), loss_weights=list(config.loss_settings().loss_weights), beta=config.beta,
      label_smoothing=config.label_smoothing, use_weighting=config.use_weighting,
      args=types.SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
  inputs = {"input_ids": torch.zeros((2 * B, T), dtype=torch.long),
            "attention_mask": torch.ones((2 * B, T), dtype=torch.long),
            "completion_mask": torch.tensor(mask, dtype=torch.long)}
  loss = trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: outputs(shifted(logps)), inputs, return_outputs=False)
  return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


def _check_dpo(cfg, seed):
  logps, ref, lss, mask = _random_inputs(seed)
  ours, metrics = _ours(cfg, logps, ref, lss, mask)
  theirs, trl_metrics = _trl_dpo(cfg, logps, ref, lss, mask)
  np.testing.assert_allclose(float(ours), theirs, rtol=RTOL, atol=ATOL)
  if not set(cfg.loss_types) & (losses.LENGTH_NORMALISED_LOSSES | {"sft"}):
    for key in REWARD_KEYS:
      np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
  return float(ours)


# TRL 1.16 raises on "sft" with use_weighting (an in-place multiply of an expanded tensor); here it exits 2.
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sigmoid,hinge", "apo_zero", "bco_pair"])
def test_wpo_weighting_matches_trl(loss_type):
  on = _check_dpo(DPOConfig(beta=0.3, loss_type=loss_type, use_weighting=True), seed=1)
  off = _check_dpo(DPOConfig(beta=0.3, loss_type=loss_type, use_weighting=False), seed=1)
  assert abs(on - off) > 1e-3 * abs(off)  # the weights matter on these inputs


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm"])
def test_ld_alpha_matches_trl(ld_alpha, loss_type):
  _check_dpo(DPOConfig(beta=0.2, loss_type=loss_type, ld_alpha=ld_alpha), seed=2)


def test_ld_alpha_one_is_plain_dpo_and_weights_pick_the_tail():
  logps, ref, lss, mask = _random_inputs(4)
  plain, _ = _ours(DPOConfig(), logps, ref, lss, mask)
  one, _ = _ours(DPOConfig(ld_alpha=1.0), logps, ref, lss, mask)
  np.testing.assert_allclose(float(one), float(plain), rtol=1e-6)
  # Packed layout: two sequences in one row, response lengths 3 and 5 (shared 3): the longer one's last 2 weigh a.
  resp = jnp.asarray([[0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0]])
  ids = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
  w = losses.ld_token_weights(resp, ids, jnp.asarray([3.0, 3.0]), 0.25)
  np.testing.assert_allclose(np.asarray(w), [[0, 1, 1, 1, 0, 0, 1, 1, 1, 0.25, 0.25, 0]])


@pytest.mark.parametrize("f_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 0.3), ("reverse_kl", 0.5)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust", "discopop", "sigmoid_norm", "exo_pair"])
def test_f_divergence_matches_trl(f_type, coef, loss_type):
  eps = 1e-3 if loss_type == "exo_pair" else 0.0
  _check_dpo(DPOConfig(beta=0.5, loss_type=loss_type, label_smoothing=eps, f_divergence_type=f_type,
                       f_alpha_divergence_coef=coef), seed=3)


def test_f_divergence_rule_matches_trl():
  allowed = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
  assert losses.F_DIVERGENCE_LOSSES == allowed
  for name in ("nca_pair", "bco_pair", "apo_zero", "aot"):
    with pytest.raises(ValueError, match="f_divergence_type"):
      DPOConfig(loss_type=name, f_divergence_type="forward_kl")
  with pytest.raises(ValueError, match="use_weighting"):
    DPOConfig(loss_type="aot", use_weighting=True)


# ---- ORPO and CPO / AlphaPO: TRL's trainers driven through their concatenated forward on random logits ----


def _random_logits_batch(seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, V, size=(2 * B, T))
  attn = np.zeros((2 * B, T), np.int64)
  resp = np.zeros((2 * B, T), np.int64)
  for i in range(2 * B):
    prompt = rng.integers(2, 5)
    length = rng.integers(prompt + 1, T + 1)
    attn[i, :length] = 1
    resp[i, prompt:length] = 1
  logits = rng.normal(0, 2.0, size=(2 * B, T, V)).astype(np.float32)
  return tokens * attn, attn, resp, logits


def _trl_pair_batch(tokens, attn, resp):
  labels = np.where(resp == 1, tokens, -100)
  t = lambda a: torch.tensor(a[:B]), lambda a: torch.tensor(a[B:])
  return {"chosen_input_ids": torch.tensor(tokens[:B]), "chosen_attention_mask": torch.tensor(attn[:B]),
          "chosen_labels": torch.tensor(labels[:B]), "rejected_input_ids": torch.tensor(tokens[B:]),
          "rejected_attention_mask": torch.tensor(attn[B:]), "rejected_labels": torch.tensor(labels[B:])}


def _trl_pair_trainer(cls, logits, **attrs):
  fake = types.SimpleNamespace(is_encoder_decoder=False, padding_value=0, pad_token_id=0, aux_loss_enabled=False,
                               accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
                               **attrs)
  fake.concatenated_inputs = cls.concatenated_inputs
  fake.get_batch_logps = cls.get_batch_logps
  for name in ("concatenated_forward", "odds_ratio_loss", "cpo_loss"):
    if hasattr(cls, name):
      setattr(fake, name, functools.partial(getattr(cls, name), fake))
  model = lambda input_ids, **kw: types.SimpleNamespace(logits=torch.tensor(logits))
  return fake, model


def _ours_from_logits(cfg, tokens, attn, resp, logits):
  logps, means = losses.token_log_probs_from_logits(jnp.asarray(logits), jnp.asarray(tokens))
  seg = jnp.asarray(attn)
  stats = losses.sequence_stats(logps, jnp.asarray(resp), means)
  half = lambda st, i: jax.tree.map(lambda x: x[i * B:(i + 1) * B], st)
  zeros = losses.SequenceStats(jnp.zeros(B), stats.num_tokens[:B], jnp.zeros(B))
  sequence_mask = continued_token_mask(seg)  # what the trainer passes for ORPO's NLL
  return losses.preference_loss(cfg.loss_settings(), half(stats, 0), half(stats, 1), zeros, zeros, logps[:B],
                                jnp.asarray(resp[:B]), chosen_sequence_mask=sequence_mask[:B])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta):
  tokens, attn, resp, logits = _random_logits_batch(5)
  fake, model = _trl_pair_trainer(trl_orpo.ORPOTrainer, logits, beta=beta)
  theirs, trl_metrics = trl_orpo.ORPOTrainer.get_batch_loss_metrics(fake, model, _trl_pair_batch(tokens, attn, resp))
  ours, metrics = _ours_from_logits(DPOConfig(loss_type="orpo", reference_free=True, beta=beta), tokens, attn, resp,
                                    logits)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=RTOL, atol=ATOL)
  for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll_loss",
              "log_odds_ratio", "log_odds_chosen"):
    np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)


CPO_CASES = [("sigmoid", 0.0, 1.0, 0.0), ("sigmoid", 0.0, 0.0, 0.1), ("hinge", 0.0, 1.0, 0.0), ("ipo", 0.0, 1.0, 0.0),
             ("simpo", 0.0, 1.0, 0.0), ("simpo", 0.0, 0.5, 0.1), ("alphapo", 0.25, 0.0, 0.0),
             ("alphapo", -0.5, 0.0, 0.0), ("sigmoid", 0.25, 1.0, 0.0), ("ipo", 0.1, 1.0, 0.0)]


@pytest.mark.parametrize("loss_type,alpha,cpo_alpha,eps", CPO_CASES)
def test_cpo_and_alphapo_match_trl(loss_type, alpha, cpo_alpha, eps):
  tokens, attn, resp, logits = _random_logits_batch(6)
  trl_type = "simpo" if loss_type == "alphapo" else loss_type
  gamma = 0.5 if trl_type == "simpo" else 0.0
  fake, model = _trl_pair_trainer(trl_cpo.CPOTrainer, logits, beta=0.3, loss_type=trl_type, cpo_alpha=cpo_alpha,
                                  simpo_gamma=gamma, alpha=alpha, label_smoothing=eps)
  theirs, trl_metrics = trl_cpo.CPOTrainer.get_batch_loss_metrics(fake, model, _trl_pair_batch(tokens, attn, resp))
  cfg = DPOConfig(loss_type=loss_type, reference_free=True, beta=0.3, simpo_gamma=gamma, alpha=alpha,
                  label_smoothing=eps, cpo_alpha=None if loss_type == "alphapo" else cpo_alpha)
  ours, metrics = _ours_from_logits(cfg, tokens, attn, resp, logits)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=RTOL, atol=ATOL)
  for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
    np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
  if cpo_alpha:
    np.testing.assert_allclose(float(metrics["nll_loss"]), trl_metrics["nll_loss"], rtol=RTOL, atol=ATOL)


# ---- KTO: TRL's KTOTrainer._compute_loss on given per-token log-probs ----


def _kto_inputs(seed, n=8):
  rng = np.random.default_rng(seed)
  seqs = {k: -rng.uniform(0.05, 2.0, size=(n, T)).astype(np.float32) for k in ("pol", "kl")}
  mask = np.zeros((n, T), np.int64)
  for i in range(n):
    start = rng.integers(1, 4)
    mask[i, start:rng.integers(start + 1, T + 1)] = 1
  for k in list(seqs):
    seqs[k] = seqs[k] * mask
  ref = (seqs["pol"] + rng.normal(0, 0.5, size=(n, T)) * mask).sum(1).astype(np.float32)
  ref_kl = (seqs["kl"] + rng.normal(0, 0.5, size=(n, T)) * mask).sum(1).astype(np.float32)
  labels = rng.random(n) < 0.5
  labels[:2] = [True, False]
  return seqs, mask, ref, ref_kl, labels


def _trl_kto(loss_type, beta, dw, uw, seqs, mask, ref, ref_kl, labels):
  n = labels.shape[0]
  ids, kl_ids = torch.zeros((n, T), dtype=torch.long), torch.ones((n, T), dtype=torch.long)
  by_input = {id(ids): seqs["pol"], id(kl_ids): seqs["kl"]}

  def model(input_ids, **kw):
    lp = torch.tensor(by_input[id(input_ids)][:, 1:])
    return types.SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp))

  fake = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), accelerator=types.SimpleNamespace(device="cpu",
                                                                                    gather_for_metrics=lambda x: x),
      aux_loss_enabled=False, calculate_KL=loss_type == "kto", precompute_ref_logps=True, loss_type=loss_type,
      beta=beta, desirable_weight=dw, undesirable_weight=uw,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
  fake._compute_kl_logps = functools.partial(trl_kto.KTOTrainer._compute_kl_logps, fake)
  inputs = {"input_ids": ids, "attention_mask": torch.ones((n, T), dtype=torch.long),
            "completion_mask": torch.tensor(mask), "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones((n, T), dtype=torch.long), "KL_completion_mask": torch.tensor(mask),
            "label": torch.tensor(labels), "ref_logps": torch.tensor(ref), "ref_KL_logps": torch.tensor(ref_kl)}
  loss = trl_kto.KTOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
  return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("beta,dw,uw", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.5), (0.3, 0.7, 1.0)])
def test_kto_matches_trl(loss_type, beta, dw, uw):
  seqs, mask, ref, ref_kl, labels = _kto_inputs(zlib.crc32(f"{loss_type},{beta}".encode()) % 100)
  if loss_type == "kto":  # a KL estimate of at least 1 nat, so the clamp at 0 does not hide the term
    ref_kl = ref_kl - max(1.0, float((ref_kl - seqs["kl"].sum(1)).mean()) + 1.0)
  cfg = DPOConfig(loss_type=loss_type, beta=beta, desirable_weight=dw, undesirable_weight=uw)
  theirs, trl_metrics = _trl_kto(loss_type, beta, dw, uw, seqs, mask, ref, ref_kl, labels)
  ours, metrics = losses.unpaired_loss(cfg.loss_settings(), jnp.asarray(seqs["pol"].sum(1)), jnp.asarray(ref),
                                       jnp.asarray(labels), jnp.asarray(seqs["kl"].sum(1)), jnp.asarray(ref_kl))
  np.testing.assert_allclose(float(ours), theirs, rtol=RTOL, atol=ATOL)
  for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
    np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
  if loss_type == "kto":
    assert float(metrics["kl"]) > 0


def test_kto_filler_examples_count_nowhere():
  seqs, mask, ref, ref_kl, labels = _kto_inputs(3)
  s = DPOConfig(loss_type="kto").loss_settings()
  args = lambda a: jnp.asarray(np.concatenate([a, a[:3] * 7 + 1]))
  full, m_full = losses.unpaired_loss(s, args(seqs["pol"].sum(1)), args(ref), args(labels), args(seqs["kl"].sum(1)),
                                      args(ref_kl), jnp.asarray([1] * 8 + [0] * 3))
  plain, m_plain = losses.unpaired_loss(s, jnp.asarray(seqs["pol"].sum(1)), jnp.asarray(ref), jnp.asarray(labels),
                                        jnp.asarray(seqs["kl"].sum(1)), jnp.asarray(ref_kl))
  np.testing.assert_allclose(float(full), float(plain), rtol=1e-6)
  np.testing.assert_allclose(float(m_full["kl"]), float(m_plain["kl"]), rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(loss_type="orpo"), "reference_free"),
    (dict(loss_type="orpo,sft", reference_free=True), "loss_type"),
    (dict(loss_type="orpo", reference_free=True, use_weighting=True), "use_weighting"),
    (dict(loss_type="kto", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="kto", rpo_alpha=0.5), "rpo_alpha"),
    (dict(loss_type="kto", reference_free=True), "reference_free"),
    (dict(desirable_weight=2.0), "desirable_weight"),
    (dict(loss_type="kto", undesirable_weight=0.0), "undesirable_weight"),
    (dict(loss_type="alphapo"), "reference_free"),
    (dict(cpo_alpha=1.0), "cpo_alpha"),
    (dict(alpha=0.2), "alpha"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="sigmoid,sft", use_weighting=True), "use_weighting"),
    (dict(f_divergence_type="chi2"), "f_divergence_type"),
    (dict(sync_ref_model=True, precompute_ref_logps=True), "sync_ref_model.*precompute_ref_logps"),
    (dict(sync_ref_model=True, reference_free=True), "sync_ref_model"),
    (dict(sync_ref_model=True, ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha"),
    (dict(sync_ref_model=True, ref_model_sync_steps=0), "ref_model_sync_steps"),
])
def test_bad_combinations_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=f"DPOConfig.{field}"):
    DPOConfig(**kwargs)


def test_reference_needs_of_the_family():
  assert not DPOConfig(loss_type="orpo", reference_free=True).needs_reference
  assert not DPOConfig(loss_type="alphapo", reference_free=True).needs_reference
  assert DPOConfig(loss_type="kto").needs_reference and DPOConfig(loss_type="kto").unpaired
  assert DPOConfig(loss_type="apo_zero_unpaired").unpaired and not DPOConfig().unpaired
