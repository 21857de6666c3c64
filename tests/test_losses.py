"""The loss family against independent oracles: TRL 1.16's own loss code and numpy formulas."""

from __future__ import annotations

import collections
import math
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from artifex_dpo import DPOConfig, losses

torch = pytest.importorskip("torch")
trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 6, 9


def _random_inputs(seed=0):
  """Per-token log-probs (aligned with tokens) and response masks for [chosen; rejected]."""
  rng = np.random.default_rng(seed)
  logps = -rng.uniform(0.05, 3.0, size=(2 * B, T)).astype(np.float32)
  ref = logps + rng.normal(0, 0.4, size=(2 * B, T)).astype(np.float32)
  mask = np.zeros((2 * B, T), np.int32)
  for i in range(2 * B):
    start = rng.integers(1, 4)
    end = rng.integers(start + 1, T + 1)
    mask[i, start:end] = 1
  logps[:, 0] = 0.0
  ref[:, 0] = 0.0
  return logps, ref, mask


def _ours(config: DPOConfig, logps, ref, mask):
  s = config.loss_settings()
  pol = losses.sequence_stats(jnp.asarray(logps), jnp.asarray(mask))
  refs = losses.sequence_stats(jnp.asarray(ref), jnp.asarray(mask))
  half = lambda st, i: jax.tree.map(lambda x: x[i * B:(i + 1) * B], st)
  return losses.preference_loss(s, half(pol, 0), half(pol, 1), half(refs, 0), half(refs, 1),
                                jnp.asarray(logps[:B]), jnp.asarray(mask[:B]))


def _trl(loss_types, weights, beta, label_smoothing, logps, ref, mask):
  """Runs TRL 1.16's ``DPOTrainer._compute_loss`` on given per-token log-probs (no model)."""
  masked = logps * mask
  # TRL's per-token log-probs are shifted: entry t scores token t+1.
  log_probs = torch.tensor(masked[:, 1:])
  ref_seq = (ref * mask).sum(1)
  fake_outputs = types.SimpleNamespace(
      log_probs=log_probs,
      entropy=torch.zeros_like(log_probs),
      mean_logits=torch.zeros_like(log_probs),
      is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
  )
  fake = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True),
      accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
      aux_loss_enabled=False,
      ld_alpha=None,
      precompute_ref_logps=True,
      f_divergence_type="reverse_kl",
      loss_types=list(loss_types),
      loss_weights=list(weights),
      beta=beta,
      label_smoothing=label_smoothing,
      use_weighting=False,
      args=types.SimpleNamespace(discopop_tau=0.05),
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      _total_train_tokens=0,
      _tp_size=1,
  )
  inputs = {
      "input_ids": torch.zeros((2 * B, T), dtype=torch.long),
      "attention_mask": torch.ones((2 * B, T), dtype=torch.long),
      "completion_mask": torch.tensor(mask, dtype=torch.long),
      "ref_chosen_logps": torch.tensor(ref_seq[:B]),
      "ref_rejected_logps": torch.tensor(ref_seq[B:]),
  }
  loss = trl_dpo.DPOTrainer._compute_loss(fake, lambda **kw: fake_outputs, inputs, return_outputs=False)
  return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


TRL_CASES = [
    ("sigmoid", 0.0),
    ("hinge", 0.0),
    ("ipo", 0.0),
    ("exo_pair", 1e-3),
    ("exo_pair", 0.2),
    ("nca_pair", 0.0),
    ("robust", 0.0),
    ("robust", 0.2),
    ("bco_pair", 0.0),
    ("sppo_hard", 0.0),
    ("aot", 0.0),
    ("aot", 0.1),
    ("aot_unpaired", 0.1),
    ("apo_zero", 0.0),
    ("apo_down", 0.0),
    ("discopop", 0.0),
    ("sft", 0.0),
    ("sigmoid_norm", 0.0),
]


@pytest.mark.parametrize("loss_type,label_smoothing", TRL_CASES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_each_loss_matches_trl(loss_type, label_smoothing, beta):
  logps, ref, mask = _random_inputs(seed=zlib.crc32(f"{loss_type},{beta}".encode()) % 1000)  # not hash(): salted per process
  cfg = DPOConfig(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
  ours, metrics = _ours(cfg, logps, ref, mask)
  theirs, trl_metrics = _trl([loss_type], [1.0], beta, label_smoothing, logps, ref, mask)
  np.testing.assert_allclose(float(ours), theirs, rtol=2e-5, atol=1e-6)
  if loss_type not in losses.LENGTH_NORMALISED_LOSSES and loss_type != "sft":
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(float(metrics[key]), trl_metrics[key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_weighted_combination_matches_trl():
  logps, ref, mask = _random_inputs(seed=3)
  cfg = DPOConfig(beta=0.2, loss_type="sigmoid,sft,hinge", loss_weights="1.0,0.5,0.25")
  ours, metrics = _ours(cfg, logps, ref, mask)
  theirs, _ = _trl(["sigmoid", "sft", "hinge"], [1.0, 0.5, 0.25], 0.2, 0.0, logps, ref, mask)
  np.testing.assert_allclose(float(ours), theirs, rtol=2e-5)
  parts = 1.0 * metrics["loss/sigmoid"] + 0.5 * metrics["loss/sft"] + 0.25 * metrics["loss/hinge"]
  np.testing.assert_allclose(float(parts), float(ours), rtol=1e-6)


# ---- numpy oracles for what TRL 1.16 does not have (cDPO smoothing on sigmoid, SimPO, RPO) ----


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _np_sums(logps, ref, mask):
  s = (logps * mask).sum(1)
  rs = (ref * mask).sum(1)
  n = mask.sum(1)
  return s[:B], s[B:], rs[:B], rs[B:], n[:B], n[B:]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_sigmoid_matches_formula(eps):
  logps, ref, mask = _random_inputs(seed=5)
  c, r, rc, rr, _, _ = _np_sums(logps, ref, mask)
  d = 0.3 * ((c - rc) - (r - rr))
  expected = np.mean(-(1 - eps) * _np_log_sigmoid(d) - eps * _np_log_sigmoid(-d))
  ours, _ = _ours(DPOConfig(beta=0.3, label_smoothing=eps), logps, ref, mask)
  np.testing.assert_allclose(float(ours), expected, rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_simpo_matches_formula_and_is_reference_free_default(gamma):
  logps, ref, mask = _random_inputs(seed=7)
  c, r, _, _, nc, nr = _np_sums(logps, ref, mask)
  x = 2.0 * (c / nc - r / nr) - gamma
  expected = np.mean(-_np_log_sigmoid(x))
  cfg = DPOConfig(beta=2.0, reference_free=True, simpo_gamma=gamma)
  assert cfg.loss_types == ("simpo",)
  ours, metrics = _ours(cfg, logps, np.zeros_like(ref), mask)
  np.testing.assert_allclose(float(ours), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/accuracies"]), np.mean(c / nc > r / nr))


def test_rpo_alpha_adds_chosen_nll():
  logps, ref, mask = _random_inputs(seed=9)
  c, r, rc, rr, _, _ = _np_sums(logps, ref, mask)
  dpo = np.mean(-_np_log_sigmoid(0.1 * ((c - rc) - (r - rr))))
  nll = -(logps[:B] * mask[:B]).sum() / mask[:B].sum()
  ours, metrics = _ours(DPOConfig(rpo_alpha=0.7), logps, ref, mask)
  np.testing.assert_allclose(float(ours), dpo + 0.7 * nll, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["nll_loss"]), nll, rtol=1e-5)


def test_mean_reduction_divides_by_response_length():
  logps, ref, mask = _random_inputs(seed=11)
  c, r, rc, rr, nc, nr = _np_sums(logps, ref, mask)
  d = 0.1 * ((c - rc) / nc - (r - rr) / nr)
  ours, metrics = _ours(DPOConfig(logp_reduction="mean"), logps, ref, mask)
  np.testing.assert_allclose(float(ours), np.mean(-_np_log_sigmoid(d)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/margins"]), np.mean(d), rtol=1e-5)
  # logps/* are always summed, whatever the loss uses.
  np.testing.assert_allclose(float(metrics["logps/chosen"]), np.mean(c), rtol=1e-5)


def test_seed_metric_keys_agree_with_trl_names():
  logps, ref, mask = _random_inputs(seed=13)
  _, m = _ours(DPOConfig(), logps, ref, mask)
  assert float(m["dpo_loss"]) == float(m["loss"])
  assert float(m["reward_accuracy"]) == float(m["rewards/accuracies"])
  np.testing.assert_allclose(float(m["margin"]), float(m["rewards/margins"]))
  np.testing.assert_allclose(0.1 * float(m["chosen_log_ratios"]), float(m["rewards/chosen"]), rtol=1e-6)
  np.testing.assert_allclose(0.1 * float(m["rejected_log_ratios"]), float(m["rewards/rejected"]), rtol=1e-6)


# ---- per-token log-probs ----


def _np_token_logps(logits, tokens):
  logits = logits.astype(np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  out = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      out[b, t] = logits[b, t - 1, tokens[b, t]] - lse[b, t - 1]
  return out


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_log_probs_match_full_log_softmax(chunk):
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(3, 13, 8)).astype(np.float32)
  w = rng.normal(size=(8, 50)).astype(np.float32)
  tokens = rng.integers(0, 50, size=(3, 13))
  expected = _np_token_logps(hidden @ w, tokens)
  got, means = losses.chunked_token_log_probs(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(tokens), chunk_size=chunk)
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)
  np.testing.assert_allclose(np.asarray(means)[:, 1:], (hidden @ w).mean(-1)[:, :-1], atol=2e-5)
  full, _ = losses.token_log_probs_from_logits(jnp.asarray(hidden @ w), jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(full), expected, atol=2e-5)

  # Gradients of the chunked path equal those of the plain one.
  f_chunk = lambda h, w: jnp.sum(losses.chunked_token_log_probs(h, w, jnp.asarray(tokens), chunk_size=chunk)[0])
  f_full = lambda h, w: jnp.sum(losses.token_log_probs_from_logits(h @ w, jnp.asarray(tokens))[0])
  for a, b in zip(jax.grad(f_chunk, (0, 1))(hidden, w), jax.grad(f_full, (0, 1))(hidden, w)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_chunked_log_probs_memory_stays_near_one_chunk():
  """A 128k vocabulary at 4k tokens: the compiled backward never holds [T, V] float32."""
  tokens_n, dim, vocab = 4096, 64, 131072
  full_bytes = tokens_n * vocab * 4
  h = jax.ShapeDtypeStruct((1, tokens_n, dim), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((dim, vocab), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((1, tokens_n), jnp.int32)
  f = lambda h, w, t: jnp.sum(losses.chunked_token_log_probs(h, w, t, chunk_size=256)[0])
  compiled = jax.jit(jax.grad(f, (0, 1))).lower(h, w, t).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < full_bytes / 4, (temp, full_bytes)


def test_config_validation_names_the_field():
  for kwargs, field in [
      (dict(beta=0.0), "beta"),
      (dict(beta=-1.0), "beta"),
      (dict(label_smoothing=0.5), "label_smoothing"),
      (dict(label_smoothing=-0.1), "label_smoothing"),
      (dict(loss_type="dpo_typo"), "loss_type"),
      (dict(loss_type="sigmoid,ipo", loss_weights=[1.0]), "loss_weights"),
      (dict(loss_type="exo_pair"), "label_smoothing"),
      (dict(logp_reduction="max"), "logp_reduction"),
  ]:
    with pytest.raises(ValueError, match=field):
      DPOConfig(**kwargs)
  assert DPOConfig().loss_types == ("sigmoid",)
  assert (DPOConfig().beta, DPOConfig().label_smoothing, DPOConfig().reference_free) == (0.1, 0.0, False)
  assert DPOConfig(loss_type="sigmoid, sft").loss_types == ("sigmoid", "sft")
  assert math.isclose(DPOConfig(loss_type=["ipo", "sft"], loss_weights=[1, 2]).loss_settings().loss_weights[1], 2.0)
