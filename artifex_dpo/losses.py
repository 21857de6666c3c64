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
    "alphapo",
    "orpo",
    "kto",
    "apo_zero_unpaired",
)
# Losses defined on length-normalised (token-mean) log-probs whatever ``logp_reduction`` says.
LENGTH_NORMALISED_LOSSES = frozenset({"ipo", "simpo", "sigmoid_norm", "alphapo", "orpo"})
# Losses that never read a reference (ORPO; CPO / AlphaPO are the others run with reference_free).
REFERENCE_FREE_LOSSES = frozenset({"orpo", "alphapo"})
# Unpaired losses (TRL's KTOTrainer): one completion per example with a desirable / undesirable label.
UNPAIRED_LOSSES = frozenset({"kto", "apo_zero_unpaired"})
# Losses that accept an f-divergence other than reverse KL (TRL 1.16's DPOTrainer rule: the beta log Z(x)
# term of the f-DPO reparameterisation cancels only in the chosen-minus-rejected score difference).
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
LOGP_REDUCTIONS = ("sum", "mean")  # the values of DPOConfig.logp_reduction / reduce_logps
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


def token_log_probs_from_logits(logits: jax.Array, tokens: jax.Array, *,
                                with_log_sum_sq: bool = False) -> tuple[jax.Array, ...]:
  """Per-token log-probs from full logits.

  Args:
    logits: ``[B, T, V]`` in any float dtype; position t predicts token t+1.
    tokens: ``[B, T]`` int tokens.
    with_log_sum_sq: also return ``log sum_v p_v^2`` per position (WPO's weights), never differentiated.

  Returns:
    ``(log_probs, logit_means)``, both float32 ``[B, T]`` and aligned with ``tokens``: entry t is
    ``log p(x_t | x_<t)`` and the mean logit over the vocabulary at the position that predicts
    ``x_t``. Entry 0 has no context and is 0. With ``with_log_sum_sq`` a third array of the same
    layout follows.
  """
  logits = logits.astype(jnp.float32)
  targets = shift_targets(tokens)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  out = (_align_to_tokens(picked - lse), _align_to_tokens(jnp.mean(logits, axis=-1)))
  if with_log_sum_sq:
    out += (_align_to_tokens(_log_sum_sq_probs(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(lse))),)
  return out


def _log_sum_sq_probs(logits: jax.Array, lse: jax.Array) -> jax.Array:
  """``log sum_v softmax(logits)_v^2`` = logsumexp(2 z) - 2 logsumexp(z) (TRL's ``log_sum_sq_probs``)."""
  return jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse


def chunk_positions(rows: int, seq_len: int, chunk_size: int) -> int:
  """Sequence positions per chunk so that one chunk holds about ``chunk_size`` tokens of ``rows`` rows.

  At least one position; at most the whole row.
  """
  return max(1, min(seq_len, chunk_size // max(rows, 1)))


def chunked_token_log_probs(
    hidden: jax.Array,
    unembedding: jax.Array,
    tokens: jax.Array,
    *,
    chunk_size: int = 512,
    with_log_sum_sq: bool = False,
) -> tuple[jax.Array, ...]:
  """Per-token log-probs without materialising the ``[B, T, V]`` float32 logits.

  The final projection and the log-softmax run over sequence chunks inside a ``lax.scan``; a
  chunk holds :func:`chunk_positions` positions of every row, i.e. about ``chunk_size`` tokens
  (rows x positions) whatever the batch size. A caller whose rows are split over devices passes
  ``chunk_size`` times the number of batch shards, so each device holds about ``chunk_size``
  tokens' worth of logits. A custom VJP recomputes each chunk's logits in the backward pass and
  turns them into their cotangent in place (``softmax - onehot``), accumulating the gradient of
  the unembedding in the scan: peak memory holds one ``[B, chunk, V]`` float32 block (two while
  XLA fuses), never the whole.

  Args:
    hidden: final hidden states ``[B, T, D]`` (any float dtype).
    unembedding: the output projection ``[D, V]``.
    tokens: ``[B, T]`` int tokens.
    chunk_size: tokens (rows x positions) per chunk.
    with_log_sum_sq: also return WPO's ``log sum_v p_v^2`` per position (not differentiated; one
      more projection pass over the chunks, without a backward).

  Returns:
    ``(log_probs, logit_means[, log_sum_sq])`` as in :func:`token_log_probs_from_logits`.
  """
  batch, seq_len, dim = hidden.shape
  targets = shift_targets(tokens).astype(jnp.int32)
  chunk = chunk_positions(batch, seq_len, chunk_size)
  num_chunks = -(-seq_len // chunk)
  pad = num_chunks * chunk - seq_len
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  # [num_chunks, B, chunk, ...] so scan walks the sequence; the batch axis keeps its sharding.
  hidden_chunks = hidden.reshape(batch, num_chunks, chunk, dim).swapaxes(0, 1)
  target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)
  logps, means = _chunked_log_softmax(hidden_chunks, unembedding, target_chunks)
  outs = [logps, means]
  if with_log_sum_sq:
    outs.append(_chunked_log_sum_sq(jax.lax.stop_gradient(hidden_chunks), jax.lax.stop_gradient(unembedding)))
  return tuple(_align_to_tokens(x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :seq_len]) for x in outs)


def _chunk_logits(h: jax.Array, w: jax.Array) -> jax.Array:
  """float32 logits ``[B, c, V]`` of one chunk (the matmul in the compute dtype of ``h``)."""
  return jnp.einsum("bcd,dv->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def _picked(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``logits[..., targets]`` as a fused select-and-sum (no gather, no ``[.., V]`` one-hot kept)."""
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  return jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)


def _chunked_forward(hidden_chunks, w, target_chunks):
  def body(_, xs):
    h, t = xs
    logits = _chunk_logits(h, w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return None, (_picked(logits, t) - lse, jnp.mean(logits, axis=-1), lse)

  _, (logps, means, lse) = jax.lax.scan(body, None, (hidden_chunks, target_chunks))
  return logps, means, lse


def _chunked_log_sum_sq(hidden_chunks, w):
  """WPO's ``log sum_v p_v^2`` per position of ``[N, B, c, D]`` chunks (``[N, B, c]``), chunk by chunk."""

  def body(_, h):
    logits = _chunk_logits(h, w)
    return None, _log_sum_sq_probs(logits, jax.nn.logsumexp(logits, axis=-1))

  return jax.lax.scan(body, None, hidden_chunks)[1]


@jax.custom_vjp
def _chunked_log_softmax(hidden_chunks, w, target_chunks):
  """``(log p(target), mean logit)`` per position of ``[N, B, c, D]`` chunks; both ``[N, B, c]``."""
  logps, means, _ = _chunked_forward(hidden_chunks, w, target_chunks)
  return logps, means


def _chunked_log_softmax_fwd(hidden_chunks, w, target_chunks):
  logps, means, lse = _chunked_forward(hidden_chunks, w, target_chunks)
  return (logps, means), (hidden_chunks, w, target_chunks, lse)


def _chunked_log_softmax_bwd(res, cotangents):
  hidden_chunks, w, target_chunks, lse = res
  g_logp, g_mean = cotangents
  vocab = w.shape[-1]

  def body(dw, xs):
    h, t, lse_c, gl, gm = xs
    logits = _chunk_logits(h, w)
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    # d/dlogits of gl * (logit[t] - lse) + gm * mean(logits): one elementwise pass over the block.
    dlogits = (gl[..., None] * (jnp.where(vocab_ids == t[..., None], 1.0, 0.0) - jnp.exp(logits - lse_c[..., None]))
               + gm[..., None] / vocab).astype(h.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, w.astype(h.dtype), preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)
    return dw, dh.astype(h.dtype)

  dw0 = jnp.zeros(w.shape, jnp.float32)
  dw, dh = jax.lax.scan(body, dw0, (hidden_chunks, target_chunks, lse, g_logp, g_mean))
  return dh, dw.astype(w.dtype), None


_chunked_log_softmax.defvjp(_chunked_log_softmax_fwd, _chunked_log_softmax_bwd)


# --------------------------------------------------------------------------------------------
# Sequence reductions
# --------------------------------------------------------------------------------------------


class SequenceStats(NamedTuple):
  """Per-sequence reductions of per-token values over the response mask (all ``[B]`` float32)."""

  logp_sum: jax.Array
  num_tokens: jax.Array
  logit_sum: jax.Array
  # WPO: sum over response tokens of (log p - log sum_v p_v^2), unweighted by LD-DPO; None when unused.
  wpo_sum: jax.Array | None = None

  @property
  def logp_mean(self) -> jax.Array:
    return self.logp_sum / jnp.maximum(self.num_tokens, 1.0)


def sequence_stats(token_logps: jax.Array, response_mask: jax.Array, logit_means: jax.Array | None = None,
                   *, token_weights: jax.Array | None = None, log_sum_sq: jax.Array | None = None) -> SequenceStats:
  """Sums per-token log-probs (and mean logits) over the response tokens of each sequence.

  ``token_weights`` (LD-DPO, :func:`ld_token_weights`) weight the log-prob sum only; the token count
  stays the plain count (as TRL divides by it). ``log_sum_sq`` (per-token ``log sum_v p_v^2``) adds
  WPO's ``wpo_sum``.
  """
  mask = response_mask.astype(jnp.float32)
  logit_sum = jnp.sum(logit_means * mask, axis=-1) if logit_means is not None else jnp.zeros(mask.shape[0])
  weighted = mask if token_weights is None else mask * token_weights
  wpo = None
  if log_sum_sq is not None:
    wpo = jax.lax.stop_gradient(jnp.sum((token_logps - log_sum_sq) * mask, axis=-1))
  return SequenceStats(jnp.sum(token_logps * weighted, axis=-1), jnp.sum(mask, axis=-1), logit_sum, wpo)


def ld_token_weights(response_mask: jax.Array, sequence_ids: jax.Array, shared_lengths: jax.Array,
                     ld_alpha: float) -> jax.Array:
  """LD-DPO's per-token weights (Liu et al. 2024, TRL's ``ld_alpha``): 1 on the first ``shared_lengths``
  response tokens of each sequence, ``ld_alpha`` beyond (the part longer than the pair's other response).

  Works for any layout where each sequence's tokens are contiguous within a row: padded rows
  (``sequence_ids`` = row index) and packed rows (one id per packed sequence).

  Args:
    response_mask: ``[R, L]`` 0/1, the scored tokens.
    sequence_ids: ``[R, L]`` int in ``[0, S)``: the sequence each token belongs to (any id on
      unscored tokens; they get weight 0).
    shared_lengths: ``[S]``: per sequence, min(chosen, rejected) response length of its pair.
    ld_alpha: the weight of tokens beyond the shared length, in [0, 1].

  Returns:
    float32 ``[R, L]`` weights (0 where ``response_mask`` is 0).
  """
  mask = response_mask.astype(jnp.float32)
  running = jnp.cumsum(mask, axis=-1)
  num = shared_lengths.shape[0]
  ids = sequence_ids.reshape(-1)
  # The row's running count just before each sequence's first scored token.
  start = jax.ops.segment_min(jnp.where(mask > 0, running - mask, jnp.inf).reshape(-1), ids, num_segments=num)
  position = running - start[sequence_ids]  # 1-based index among the sequence's response tokens
  return jnp.where(position <= shared_lengths[sequence_ids], 1.0, ld_alpha) * mask


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


def f_divergence_scores(logratios: jax.Array, f_divergence_type: str, alpha_coef: float = 0.5) -> jax.Array:
  """f-DPO (Wang et al. 2023): f'(pi / pi_ref) of the policy/reference ratio, from its log (TRL 1.16's forms).

  reverse_kl: log t (standard DPO); forward_kl: 1 - 1/t; js_divergence: log 2 + log s(log t);
  alpha_divergence: (t^(a-1) - 1) / (a - 1) (a = 1: log t), the exponent clamped at 80 as TRL does.
  """
  if f_divergence_type == "reverse_kl":
    return logratios
  if f_divergence_type == "forward_kl":
    return 1.0 - jnp.exp(-logratios)
  if f_divergence_type == "js_divergence":
    return math.log(2.0) + jax.nn.log_sigmoid(logratios)
  if f_divergence_type == "alpha_divergence":
    if abs(alpha_coef - 1.0) < 1e-6:
      return logratios
    t = jnp.minimum((alpha_coef - 1.0) * logratios, 80.0)
    return (jnp.exp(t) - 1.0) / (alpha_coef - 1.0)
  raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; known: {', '.join(F_DIVERGENCE_TYPES)}")


def alphapo_rewards(logps: jax.Array, alpha: float) -> jax.Array:
  """AlphaPO (Gupta et al. 2025) reward shape: (1 - p^-alpha) / alpha with p = exp(logps); alpha 0: logps."""
  if alpha == 0.0:
    return logps
  return (1.0 - jnp.exp(-alpha * logps)) / alpha


def log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for x < 0, stable on both sides of -log 2 (TRL ORPO's branch point)."""
  x = jnp.minimum(x, -1e-7)  # x = 0 (a certain response) would be -inf
  branch = x < -math.log(2.0)
  return jnp.where(branch, jnp.log1p(-jnp.exp(jnp.where(branch, x, -1.0))),
                   jnp.log(-jnp.expm1(jnp.where(branch, -1.0, x))))


def orpo_log_odds(chosen_mean_logps: jax.Array, rejected_mean_logps: jax.Array) -> jax.Array:
  """ORPO (Hong et al. 2024, Eqs. 4 and 7): log odds(y_w) - log odds(y_l) on token-mean log-probs."""
  return (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))


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
  # ORPO's NLL: every predicted token of the chosen sequences (prompt included); None: counted here.
  chosen_sequence_tokens: jax.Array | None = None


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
  f_divergence_type: str = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5
  use_weighting: bool = False
  ld_alpha: float | None = None
  cpo_alpha: float | None = None
  alpha: float = 0.0
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0


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
      "alphapo": lambda: simpo_loss(p, s.beta, s.simpo_gamma, s.label_smoothing),
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
    chosen_sequence_mask: jax.Array | None = None,
    normalizers: Normalizers | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted sum of the configured losses and its metrics (batch means over pairs).

  Args:
    s: loss settings.
    chosen, rejected: policy sequence statistics (with ``wpo_sum`` when ``s.use_weighting``; LD-DPO
      weighting, when on, is already in their ``logp_sum``).
    ref_chosen, ref_rejected: reference statistics (zeros when reference-free).
    chosen_token_logps, chosen_response_mask: per-token policy log-probs and the response mask of
      the chosen side (any layout, e.g. ``[B, T]`` or packed rows; the mask must be 0 on filler
      pairs), for the SFT / RPO / CPO negative log-likelihood term.
    pair_mask: ``[B]`` 0/1; pairs with 0 (filler rows of a last, partial eval batch, empty
      slots of packed rows) count in no mean and are left out of the AOT losses' sorting.
      None: every pair counts.
    chosen_sequence_mask: ORPO's NLL mask, laid out like ``chosen_token_logps``: every predicted
      token of the chosen sequences, prompt included (TRL's ORPO trains on both). None: the
      response mask.
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

  def scored(name: str, reduction: str) -> PairLogps:
    """The pair the loss sees: f-DPO scores or AlphaPO rewards in place of the log-ratios."""
    p = pairs(reduction)
    if s.f_divergence_type != "reverse_kl" and name in F_DIVERGENCE_LOSSES:
      f = lambda x: f_divergence_scores(x, s.f_divergence_type, s.f_alpha_divergence_coef)
      if name in LENGTH_NORMALISED_LOSSES:  # TRL: f of the summed log-ratio, then divided by the length
        ps = pairs("sum")
        c = f(ps.chosen_logratios) / jnp.maximum(chosen.num_tokens, 1.0)
        r = f(ps.rejected_logratios) / jnp.maximum(rejected.num_tokens, 1.0)
      else:
        c, r = f(p.chosen_logratios), f(p.rejected_logratios)
      return PairLogps(c, r, jnp.zeros_like(c), jnp.zeros_like(r))
    if s.alpha != 0.0:  # reference-free (CPO family): the reward shape replaces the log-probs
      c, r = alphapo_rewards(p.chosen_logratios, s.alpha), alphapo_rewards(p.rejected_logratios, s.alpha)
      return PairLogps(c, r, jnp.zeros_like(c), jnp.zeros_like(r))
    return p

  w = jnp.ones_like(chosen.logp_sum) if pair_mask is None else pair_mask.astype(jnp.float32)
  if normalizers is None:
    normalizers = Normalizers(jnp.sum(w), jnp.sum(chosen.num_tokens * w), jnp.sum(rejected.num_tokens * w))
  n_pairs = jnp.maximum(normalizers.pairs, 1.0)
  mean = lambda x, weights=w: jnp.sum(x * weights) / n_pairs
  pair_weights = None
  if s.use_weighting:  # WPO (Zhou et al. 2024, Eq. 2), as TRL: never differentiated
    pair_weights = jax.lax.stop_gradient(
        jnp.exp(chosen.wpo_sum / jnp.maximum(chosen.num_tokens, 1.0))
        * jnp.exp(rejected.wpo_sum / jnp.maximum(rejected.num_tokens, 1.0)))
  metrics: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  nll = None
  for name, weight in zip(s.loss_types, s.loss_weights, strict=True):
    if name == "sft":
      nll = sft_loss(chosen_token_logps, chosen_response_mask, normalizers.chosen_tokens) if nll is None else nll
      term = nll
    elif name == "orpo":
      # NLL over the whole chosen sequence minus lambda * mean log s(log odds ratio) (TRL experimental/orpo).
      p = pairs("mean")
      safe = lambda x: jnp.where(w > 0, x, -1.0)  # filler pairs have no tokens: mean log-prob 0
      log_odds = orpo_log_odds(safe(p.chosen), safe(p.rejected))
      seq_mask = chosen_response_mask if chosen_sequence_mask is None else chosen_sequence_mask
      orpo_nll = sft_loss(chosen_token_logps, seq_mask, normalizers.chosen_sequence_tokens)
      ratio = jax.nn.log_sigmoid(log_odds)
      term = orpo_nll - s.beta * mean(ratio)
      metrics.update({"nll_loss": orpo_nll, "log_odds_ratio": mean(ratio), "log_odds_chosen": mean(log_odds)})
    else:
      reduction = "mean" if name in LENGTH_NORMALISED_LOSSES else s.logp_reduction
      if name in ("aot", "aot_unpaired"):  # values in sorted order, real pairs first
        term = mean(_pair_loss(name, s, pairs(reduction), None if pair_mask is None else w),
                    w if pair_mask is None else sorted_weights(w))
      else:
        per_pair = _pair_loss(name, s, scored(name, reduction))
        term = mean(per_pair if pair_weights is None else per_pair * pair_weights)
    if len(s.loss_types) > 1:
      metrics[f"loss/{name}"] = term
    total = total + weight * term
  nll_weight = s.rpo_alpha if s.rpo_alpha is not None else s.cpo_alpha
  if nll_weight is not None:  # RPO / CPO: token-mean NLL of the chosen responses
    nll = sft_loss(chosen_token_logps, chosen_response_mask, normalizers.chosen_tokens) if nll is None else nll
    metrics["nll_loss"] = nll
    total = total + nll_weight * nll

  rp = pairs(reward_reduction(s))
  chosen_lr, rejected_lr = rp.chosen_logratios, rp.rejected_logratios
  if s.alpha != 0.0:  # CPO/AlphaPO logs the shaped rewards
    chosen_lr, rejected_lr = alphapo_rewards(chosen_lr, s.alpha), alphapo_rewards(rejected_lr, s.alpha)
  chosen_rewards = jax.lax.stop_gradient(s.beta * chosen_lr)
  rejected_rewards = jax.lax.stop_gradient(s.beta * rejected_lr)
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
  if pair_weights is not None:
    metrics["wpo/weights"] = mean(pair_weights)
  return total, jax.tree.map(jax.lax.stop_gradient, metrics)


# --------------------------------------------------------------------------------------------
# Unpaired losses (KTO)
# --------------------------------------------------------------------------------------------


def unpaired_loss(
    s: LossSettings,
    logps: jax.Array,
    ref_logps: jax.Array,
    labels: jax.Array,
    kl_logps: jax.Array | None = None,
    ref_kl_logps: jax.Array | None = None,
    example_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KTO (Ethayarajh et al. 2024, Eq. 7) or unpaired APO-zero over ``[N]`` single completions (TRL KTOTrainer).

  Args:
    s: loss settings; ``s.loss_types`` is ``("kto",)`` or ``("apo_zero_unpaired",)``.
    logps, ref_logps: ``[N]`` summed response log-probs under the policy and the reference.
    labels: ``[N]`` bool, True for desirable completions.
    kl_logps, ref_kl_logps: ``[N]`` summed log-probs of the mismatched (prompt, completion) pairs
      that estimate the KL reference point (KTO only; the policy's are not differentiated).
    example_mask: ``[N]`` 0/1; 0 marks filler examples. None: all count.

  Returns:
    ``(loss, metrics)``: the loss is the mean over examples of the weighted per-example losses;
    metrics ``kl``, ``rewards/chosen`` / ``rewards/rejected`` / ``logps/*`` (means over the
    desirable / undesirable examples, 0 when there are none), ``rewards/margins``.
  """
  w = jnp.ones_like(logps) if example_mask is None else example_mask.astype(jnp.float32)
  labels = labels.astype(bool)
  logratios = logps - ref_logps
  (name,) = s.loss_types
  if name == "kto":
    kl_terms = jax.lax.stop_gradient(kl_logps - ref_kl_logps)
    kl = jnp.maximum(jnp.sum(kl_terms * w) / jnp.maximum(jnp.sum(w), 1.0), 0.0)
    chosen_losses = 1.0 - jax.nn.sigmoid(s.beta * (logratios - kl))
    rejected_losses = 1.0 - jax.nn.sigmoid(s.beta * (kl - logratios))
  elif name == "apo_zero_unpaired":
    kl = jnp.zeros((), jnp.float32)
    chosen_losses = 1.0 - jax.nn.sigmoid(s.beta * logratios)
    rejected_losses = jax.nn.sigmoid(s.beta * logratios)
  else:
    raise ValueError(f"unpaired_loss: unknown loss {name!r}")
  per_example = jnp.where(labels, s.desirable_weight * chosen_losses, s.undesirable_weight * rejected_losses)
  loss = jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)
  wc, wr = w * labels, w * (~labels)
  rewards = jax.lax.stop_gradient(s.beta * logratios)
  over = lambda x, m: jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)
  metrics = {
      "loss": loss,
      "kl": kl,
      "rewards/chosen": over(rewards, wc),
      "rewards/rejected": over(rewards, wr),
      "rewards/margins": over(rewards, wc) - over(rewards, wr),
      "logps/chosen": over(logps, wc),
      "logps/rejected": over(logps, wr),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
