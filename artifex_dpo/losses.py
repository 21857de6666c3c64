"""Pure preference-optimization math: per-token log-probs, sequence reductions, losses, reward metrics.

Everything here is a pure function over arrays (no model, no state), so it can be tested against
independent formulas and reused by the library trainer and the training service alike.

Conventions (as in TRL): ``c`` and ``r`` are the policy-minus-reference log-ratios of the chosen
and rejected responses, ``d = c - r``. Log-probs are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# Names accepted by ``DPOConfig.loss_type``. ``simpo`` is reference-free with mean log-probs.
LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "simpo",
)
# Losses defined on length-normalised (token-mean) log-probs whatever ``logp_reduction`` says.
LENGTH_NORMALISED_LOSSES = frozenset({"ipo", "simpo", "sigmoid_norm"})
# Losses whose per-pair values depend on the other pairs of the batch (AOT sorts over it): a
# microbatch cannot compute its share of the whole batch's loss, so gradient accumulation is refused.
BATCH_COUPLED_LOSSES = frozenset({"aot", "aot_unpaired"})


# --------------------------------------------------------------------------------------------
# Per-token log-probs
# --------------------------------------------------------------------------------------------


def shift_targets(tokens: jax.Array) -> jax.Array:
  """Targets aligned with the logits that predict them: position t holds token t+1 (last: 0)."""
  return jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)


def _align_to_tokens(x: jax.Array) -> jax.Array:
  """Maps values computed at predicting position t-1 onto token t (entry 0 becomes 0)."""
  return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def token_log_probs_from_logits(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs from full logits.

  Args:
    logits: ``[B, T, V]`` in any float dtype; position t predicts token t+1.
    tokens: ``[B, T]`` int tokens.

  Returns:
    ``(log_probs, logit_means)``, both float32 ``[B, T]`` and aligned with ``tokens``: entry t is
    ``log p(x_t | x_<t)`` and the mean logit over the vocabulary at the position that predicts
    ``x_t``. Entry 0 has no context and is 0.
  """
  logits = logits.astype(jnp.float32)
  targets = shift_targets(tokens)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return _align_to_tokens(picked - lse), _align_to_tokens(jnp.mean(logits, axis=-1))


def chunked_token_log_probs(
    hidden: jax.Array,
    unembedding: jax.Array,
    tokens: jax.Array,
    *,
    chunk_size: int = 512,
) -> tuple[jax.Array, jax.Array]:
  """Per-token log-probs without materialising the ``[B, T, V]`` float32 log-softmax.

  The final projection and the log-softmax run over sequence chunks of ``chunk_size``
  positions inside a ``lax.scan``; each chunk is rematerialised in the backward pass
  (``jax.checkpoint``), so peak memory holds one ``[B, chunk, V]`` block, not the whole.

  Args:
    hidden: final hidden states ``[B, T, D]`` (any float dtype).
    unembedding: the output projection ``[D, V]``.
    tokens: ``[B, T]`` int tokens.
    chunk_size: sequence positions per chunk.

  Returns:
    ``(log_probs, logit_means)`` as in :func:`token_log_probs_from_logits`.
  """
  batch, seq_len, dim = hidden.shape
  targets = shift_targets(tokens)
  chunk = max(1, min(chunk_size, seq_len))
  num_chunks = -(-seq_len // chunk)
  pad = num_chunks * chunk - seq_len
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # [num_chunks, B, chunk, ...] so scan walks the sequence.
  hidden_chunks = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

  def one_chunk(h, t):
    logits = jnp.einsum("bcd,dv->bcv", h, unembedding.astype(h.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return picked - lse, jnp.mean(logits, axis=-1)

  # Several chunks: recompute each chunk's logits in the backward pass instead of keeping them
  # all. One chunk: nothing to save by recomputing.
  chunk_fn = jax.checkpoint(one_chunk) if num_chunks > 1 else one_chunk

  def body(carry, xs):
    return carry, chunk_fn(*xs)

  _, (logps, means) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  logps = logps.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq_len]
  means = means.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq_len]
  return _align_to_tokens(logps), _align_to_tokens(means)


# --------------------------------------------------------------------------------------------
# Sequence reductions
# --------------------------------------------------------------------------------------------


class SequenceStats(NamedTuple):
  """Per-sequence reductions of per-token values over the response mask (all ``[B]`` float32)."""

  logp_sum: jax.Array
  num_tokens: jax.Array
  logit_sum: jax.Array

  @property
  def logp_mean(self) -> jax.Array:
    return self.logp_sum / jnp.maximum(self.num_tokens, 1.0)


def sequence_stats(token_logps: jax.Array, response_mask: jax.Array, logit_means: jax.Array | None = None) -> SequenceStats:
  """Sums per-token log-probs (and mean logits) over the response tokens of each sequence."""
  mask = response_mask.astype(jnp.float32)
  logit_sum = jnp.sum(logit_means * mask, axis=-1) if logit_means is not None else jnp.zeros(mask.shape[0])
  return SequenceStats(jnp.sum(token_logps * mask, axis=-1), jnp.sum(mask, axis=-1), logit_sum)


def reduce_logps(stats: SequenceStats, reduction: str) -> jax.Array:
  """``sum`` (the DPO paper) or ``mean`` (length-normalised) sequence log-prob."""
  if reduction == "sum":
    return stats.logp_sum
  if reduction == "mean":
    return stats.logp_mean
  raise ValueError(f"logp_reduction must be 'sum' or 'mean', got {reduction!r}")


# --------------------------------------------------------------------------------------------
# Losses: per-pair values [B]
# --------------------------------------------------------------------------------------------


class PairLogps(NamedTuple):
  """The four sequence log-probs a preference loss needs (``[B]`` each)."""

  chosen: jax.Array
  rejected: jax.Array
  ref_chosen: jax.Array
  ref_rejected: jax.Array

  @property
  def chosen_logratios(self) -> jax.Array:
    return self.chosen - self.ref_chosen

  @property
  def rejected_logratios(self) -> jax.Array:
    return self.rejected - self.ref_rejected

  @property
  def delta(self) -> jax.Array:
    return self.chosen_logratios - self.rejected_logratios


def _smoothed_sigmoid(x: jax.Array, label_smoothing: float) -> jax.Array:
  """cDPO: -(1-eps) log s(x) - eps log s(-x)."""
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(-x)


def sigmoid_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> jax.Array:
  """DPO (Rafailov et al. 2023) with cDPO label smoothing."""
  return _smoothed_sigmoid(beta * p.delta, label_smoothing)


def robust_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0) -> jax.Array:
  """Robust DPO (Chowdhury et al. 2024): unbiased under label-flip rate eps."""
  x = beta * p.delta
  clean = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x)
  flipped = -label_smoothing * jax.nn.log_sigmoid(-x)
  return (clean - flipped) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(p: PairLogps, beta: float) -> jax.Array:
  """SLiC hinge: relu(1 - beta d)."""
  return jax.nn.relu(1.0 - beta * p.delta)


def ipo_loss(p: PairLogps, beta: float) -> jax.Array:
  """IPO (Azar et al. 2023), Eq. 17: (d - 1/(2 beta))^2 on token-averaged log-ratios.

  ``p`` must hold token-mean log-probs (the caller passes mean reductions), as TRL does.
  """
  return (p.delta - 1.0 / (2.0 * beta)) ** 2


def exo_pair_loss(p: PairLogps, beta: float, label_smoothing: float) -> jax.Array:
  """EXO-pref (Ji et al. 2024, Eq. 16): KL(p_f || p_rh) with p_rh = [1-eps, eps]; eps > 0."""
  x = beta * p.delta
  log_pw = math.log1p(-label_smoothing)
  log_pl = math.log(label_smoothing)
  return jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - log_pw) + jax.nn.sigmoid(-x) * (jax.nn.log_sigmoid(-x) - log_pl)


def nca_pair_loss(p: PairLogps, beta: float) -> jax.Array:
  """NCA (Chen et al. 2024), pairwise form."""
  c, r = beta * p.chosen_logratios, beta * p.rejected_logratios
  return -jax.nn.log_sigmoid(c) - 0.5 * jax.nn.log_sigmoid(-c) - 0.5 * jax.nn.log_sigmoid(-r)


def bco_pair_loss(p: PairLogps, beta: float) -> jax.Array:
  """BCO pairwise, without the running-mean reward offset (as TRL 1.16)."""
  return -jax.nn.log_sigmoid(beta * p.chosen_logratios) - jax.nn.log_sigmoid(-beta * p.rejected_logratios)


def sppo_hard_loss(p: PairLogps, beta: float) -> jax.Array:
  """SPPO (Wu et al. 2024) with hard winner/loser probabilities."""
  return (p.chosen_logratios - 0.5 / beta) ** 2 + (p.rejected_logratios + 0.5 / beta) ** 2


def _sorted_real_first(x: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Ascending sort of the real entries; filler entries (weight 0) go last (as 0)."""
  if weights is None:
    return jnp.sort(x)
  n_real = jnp.sum(weights > 0)
  ordered = jnp.sort(jnp.where(weights > 0, x, jnp.inf))
  return jnp.where(jnp.arange(x.shape[0]) < n_real, ordered, 0.0)


def aot_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0, weights: jax.Array | None = None) -> jax.Array:
  """AOT paired (Melnyk et al. 2024): sorted policy vs sorted reference log-ratio margins over the batch.

  The values come in sorted order; with ``weights``, the real pairs come first (see
  :func:`sorted_weights`).
  """
  delta = (_sorted_real_first(p.chosen - p.rejected, weights)
           - _sorted_real_first(p.ref_chosen - p.ref_rejected, weights))
  return _smoothed_sigmoid(beta * delta, label_smoothing)


def aot_unpaired_loss(p: PairLogps, beta: float, label_smoothing: float = 0.0,
                      weights: jax.Array | None = None) -> jax.Array:
  """AOT unpaired: sorted chosen vs sorted rejected log-ratios over the batch (order as aot_loss)."""
  delta = _sorted_real_first(p.chosen_logratios, weights) - _sorted_real_first(p.rejected_logratios, weights)
  return _smoothed_sigmoid(beta * delta, label_smoothing)


def sorted_weights(weights: jax.Array) -> jax.Array:
  """The weights of sorted-order AOT values: real pairs first."""
  return jnp.sort(weights)[::-1]


def apo_zero_loss(p: PairLogps, beta: float) -> jax.Array:
  """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise chosen, lower rejected likelihood."""
  return (1.0 - jax.nn.sigmoid(beta * p.chosen_logratios)) + jax.nn.sigmoid(beta * p.rejected_logratios)


def apo_down_loss(p: PairLogps, beta: float) -> jax.Array:
  """APO-down (Eq. 8): lower chosen likelihood, rejected more."""
  return jax.nn.sigmoid(beta * p.chosen_logratios) + (1.0 - jax.nn.sigmoid(beta * p.delta))


def discopop_loss(p: PairLogps, beta: float, tau: float = 0.05) -> jax.Array:
  """DiscoPOP (Chris Lu et al. 2024, Eq. 5): log-ratio-modulated logistic/exponential blend."""
  x = beta * p.delta
  modulation = jax.nn.sigmoid(x / tau)
  return -jax.nn.log_sigmoid(x) * (1.0 - modulation) + jnp.exp(-x) * modulation


def simpo_loss(p: PairLogps, beta: float, gamma: float = 0.0, label_smoothing: float = 0.0) -> jax.Array:
  """SimPO (Meng et al. 2024): -log s(beta (c - r) - gamma) on mean log-probs, no reference."""
  return _smoothed_sigmoid(beta * (p.chosen - p.rejected) - gamma, label_smoothing)


def sft_loss(chosen_token_logps: jax.Array, chosen_response_mask: jax.Array,
             num_tokens: jax.Array | None = None) -> jax.Array:
  """Token-mean negative log-likelihood of the chosen responses over the whole batch (a scalar).

  As TRL 1.16's ``sft`` loss: the mean over every scored chosen token of the batch (not a mean
  of per-sequence means). ``num_tokens`` (default: the tokens of ``chosen_response_mask``) is
  the denominator; a microbatch passes the whole accumulated batch's count, so the microbatch
  values sum to the whole batch's loss.
  """
  mask = chosen_response_mask.astype(jnp.float32)
  denominator = jnp.sum(mask) if num_tokens is None else num_tokens
  return -jnp.sum(chosen_token_logps * mask) / jnp.maximum(denominator, 1.0)


# --------------------------------------------------------------------------------------------
# Combining
# --------------------------------------------------------------------------------------------


class Normalizers(NamedTuple):
  """The denominators of every batch mean (float32 scalars).

  By default each is counted on the batch the loss sees. A microbatch of an accumulated batch
  (or one eval batch of an eval set) is given the counts of the whole, so its loss and metrics
  are its exact share of the whole's and the shares simply add up.

  Attributes:
    pairs: real pairs (pair means: pair losses, rewards, accuracies, log-probs).
    chosen_tokens: scored chosen response tokens of the real pairs (``sft``, RPO's NLL,
      ``logits/chosen``).
    rejected_tokens: scored rejected response tokens of the real pairs (``logits/rejected``).
  """

  pairs: jax.Array
  chosen_tokens: jax.Array
  rejected_tokens: jax.Array


class LossSettings(NamedTuple):
  """The loss hyper-parameters (a hashable subset of DPOConfig, static under jit)."""

  loss_types: tuple[str, ...]
  loss_weights: tuple[float, ...]
  beta: float
  label_smoothing: float
  simpo_gamma: float
  rpo_alpha: float | None
  logp_reduction: str
  discopop_tau: float
  reference_free: bool


def _pair_loss(name: str, s: LossSettings, p: PairLogps, w: jax.Array | None = None) -> jax.Array:
  table: dict[str, Callable[[], jax.Array]] = {
      "sigmoid": lambda: sigmoid_loss(p, s.beta, s.label_smoothing),
      "robust": lambda: robust_loss(p, s.beta, s.label_smoothing),
      "hinge": lambda: hinge_loss(p, s.beta),
      "ipo": lambda: ipo_loss(p, s.beta),
      "sigmoid_norm": lambda: sigmoid_loss(p, s.beta, 0.0),
      "exo_pair": lambda: exo_pair_loss(p, s.beta, s.label_smoothing),
      "nca_pair": lambda: nca_pair_loss(p, s.beta),
      "bco_pair": lambda: bco_pair_loss(p, s.beta),
      "sppo_hard": lambda: sppo_hard_loss(p, s.beta),
      "aot": lambda: aot_loss(p, s.beta, s.label_smoothing, w),
      "aot_unpaired": lambda: aot_unpaired_loss(p, s.beta, s.label_smoothing, w),
      "apo_zero": lambda: apo_zero_loss(p, s.beta),
      "apo_down": lambda: apo_down_loss(p, s.beta),
      "discopop": lambda: discopop_loss(p, s.beta, s.discopop_tau),
      "simpo": lambda: simpo_loss(p, s.beta, s.simpo_gamma, s.label_smoothing),
  }
  return table[name]()


def reward_reduction(s: LossSettings) -> str:
  """The log-prob reduction that rewards and accuracies are reported on.

  ``logp_reduction`` unless every loss is defined on mean log-probs (IPO, SimPO), whose rewards
  are then reported on the mean log-probs the loss sees (as TRL does for IPO).
  """
  if s.logp_reduction == "mean" or all(t in LENGTH_NORMALISED_LOSSES or t == "sft" for t in s.loss_types):
    return "mean"
  return "sum"


def preference_loss(
    s: LossSettings,
    chosen: SequenceStats,
    rejected: SequenceStats,
    ref_chosen: SequenceStats,
    ref_rejected: SequenceStats,
    chosen_token_logps: jax.Array,
    chosen_response_mask: jax.Array,
    pair_mask: jax.Array | None = None,
    normalizers: Normalizers | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the configured losses and its metrics (batch means over pairs).

  Args:
    s: loss settings.
    chosen, rejected: policy sequence statistics.
    ref_chosen, ref_rejected: reference statistics (zeros when reference-free).
    chosen_token_logps, chosen_response_mask: per-token policy log-probs and the response mask of
      the chosen side (any layout, e.g. ``[B, T]`` or packed rows; the mask must be 0 on filler
      pairs), for the SFT / RPO negative log-likelihood term.
    pair_mask: ``[B]`` 0/1; pairs with 0 (filler rows of a last, partial eval batch, empty
      slots of packed rows) count in no mean and are left out of the AOT losses' sorting.
      None: every pair counts.
    normalizers: the denominators of the means (None: counted on this batch). Given the
      counts of a larger batch this batch is part of, every returned value is this batch's
      share (summing the shares gives the larger batch's values); the AOT losses, which sort
      over the batch, are the exception (see ``BATCH_COUPLED_LOSSES``).

  Returns:
    ``(loss, metrics)``; the metrics use TRL's names plus the seed trainer's keys.
  """

  def pairs(reduction: str) -> PairLogps:
    return PairLogps(
        reduce_logps(chosen, reduction),
        reduce_logps(rejected, reduction),
        reduce_logps(ref_chosen, reduction),
        reduce_logps(ref_rejected, reduction),
    )

  w = jnp.ones_like(chosen.logp_sum) if pair_mask is None else pair_mask.astype(jnp.float32)
  if normalizers is None:
    normalizers = Normalizers(jnp.sum(w), jnp.sum(chosen.num_tokens * w), jnp.sum(rejected.num_tokens * w))
  n_pairs = jnp.maximum(normalizers.pairs, 1.0)
  mean = lambda x, weights=w: jnp.sum(x * weights) / n_pairs
  metrics: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  nll = None
  for name, weight in zip(s.loss_types, s.loss_weights, strict=True):
    if name == "sft":
      nll = sft_loss(chosen_token_logps, chosen_response_mask, normalizers.chosen_tokens) if nll is None else nll
      term = nll
    else:
      reduction = "mean" if name in LENGTH_NORMALISED_LOSSES else s.logp_reduction
      if name in ("aot", "aot_unpaired"):  # values in sorted order, real pairs first
        term = mean(_pair_loss(name, s, pairs(reduction), None if pair_mask is None else w),
                    w if pair_mask is None else sorted_weights(w))
      else:
        term = mean(_pair_loss(name, s, pairs(reduction)))
    if len(s.loss_types) > 1:
      metrics[f"loss/{name}"] = term
    total = total + weight * term
  if s.rpo_alpha is not None:
    nll = sft_loss(chosen_token_logps, chosen_response_mask, normalizers.chosen_tokens) if nll is None else nll
    metrics["nll_loss"] = nll
    total = total + s.rpo_alpha * nll

  rp = pairs(reward_reduction(s))
  chosen_rewards = jax.lax.stop_gradient(s.beta * rp.chosen_logratios)
  rejected_rewards = jax.lax.stop_gradient(s.beta * rp.rejected_logratios)
  accuracy = mean((chosen_rewards > rejected_rewards).astype(jnp.float32))
  margin = mean(chosen_rewards - rejected_rewards)
  n_chosen = jnp.maximum(normalizers.chosen_tokens, 1.0)
  n_rejected = jnp.maximum(normalizers.rejected_tokens, 1.0)
  metrics.update({
      "loss": total,
      "rewards/chosen": mean(chosen_rewards),
      "rewards/rejected": mean(rejected_rewards),
      "rewards/accuracies": accuracy,
      "rewards/margins": margin,
      "logps/chosen": mean(chosen.logp_sum),
      "logps/rejected": mean(rejected.logp_sum),
      "logits/chosen": jnp.sum(chosen.logit_sum * w) / n_chosen,
      "logits/rejected": jnp.sum(rejected.logit_sum * w) / n_rejected,
      # The seed trainer's keys, kept so code written for it keeps working.
      "dpo_loss": total,
      "reward_accuracy": accuracy,
      "chosen_log_ratios": mean(rp.chosen_logratios),
      "rejected_log_ratios": mean(rp.rejected_logratios),
      "margin": margin,
  })
  return total, jax.tree.map(jax.lax.stop_gradient, metrics)
