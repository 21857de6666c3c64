"""``DPOConfig``: the hyper-parameters of the preference loss (the seed's fields plus TRL's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from artifex_dpo import losses


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Configuration for Direct Preference Optimization and its family.

  The first three fields and their defaults are the seed trainer's; the rest follow TRL's
  ``DPOConfig`` names.

  Attributes:
    beta: reward scale (the KL-penalty strength). Higher keeps the policy closer to the reference.
    label_smoothing: cDPO / robust-DPO label-flip rate eps, in [0, 0.5).
    reference_free: score against a uniform reference (log-probs 0) instead of a reference model.
      With ``loss_type`` left unset this is SimPO (mean log-probs, margin ``simpo_gamma``).
    loss_type: one loss name or several (``"sigmoid,sft"`` or a sequence); see
      ``losses.LOSS_TYPES``. None: ``"simpo"`` when reference-free, else ``"sigmoid"``.
    loss_weights: one weight per loss (default all 1.0); the loss is ``sum(w_i * mean(loss_i))``.
    simpo_gamma: SimPO target reward margin gamma (0 reproduces the seed's reference-free loss).
    rpo_alpha: when set, adds ``rpo_alpha * NLL(chosen)`` (RPO, Pang et al. 2024).
    logp_reduction: ``"sum"`` (the DPO paper) or ``"mean"`` (length-normalised) sequence
      log-probs. IPO, SimPO and sigmoid_norm always use means.
    discopop_tau: DiscoPOP temperature.
    logits_chunk_size: tokens (rows x positions) per chunk of the chunked output projection and
      log-softmax (for models that expose ``hidden_states``/``unembedding``): a chunk holds
      ``max(1, logits_chunk_size // rows)`` positions of every row, so the float32 logits held at
      once are about ``logits_chunk_size x vocabulary`` whatever the batch size. The training
      service counts it per device (rows split over the mesh's batch axes).
    precompute_ref_logps: batches carry precomputed ``reference_log_probs`` on both sides, so no
      reference model is needed (a batch without them is then an error, never reference-free).
  """

  beta: float = 0.1
  label_smoothing: float = 0.0
  reference_free: bool = False
  loss_type: str | Sequence[str] | None = None
  loss_weights: Sequence[float] | str | None = None
  simpo_gamma: float = 0.0
  rpo_alpha: float | None = None
  logp_reduction: str = "sum"
  discopop_tau: float = 0.05
  logits_chunk_size: int = 512
  precompute_ref_logps: bool = False

  def __post_init__(self):
    self.loss_settings()  # validates

  @property
  def loss_types(self) -> tuple[str, ...]:
    """The loss names, resolved (default depends on ``reference_free``)."""
    if self.loss_type is None:
      return ("simpo",) if self.reference_free else ("sigmoid",)
    if isinstance(self.loss_type, str):
      names = tuple(n.strip() for n in self.loss_type.split(",") if n.strip())
    else:
      names = tuple(self.loss_type)
    if not names:
      raise ValueError("DPOConfig.loss_type is empty")
    return names

  def loss_settings(self) -> losses.LossSettings:
    """Validates the fields and returns the hashable settings the pure loss functions take."""
    if not self.beta > 0:
      raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    names = self.loss_types
    for name in names:
      if name not in losses.LOSS_TYPES:
        raise ValueError(f"DPOConfig.loss_type: unknown loss {name!r}; known: {', '.join(losses.LOSS_TYPES)}")
    if len(set(names)) != len(names):
      raise ValueError(f"DPOConfig.loss_type lists a loss twice: {names}")
    if "exo_pair" in names and self.label_smoothing == 0.0:
      raise ValueError("DPOConfig.label_smoothing must be > 0 for loss 'exo_pair' (1e-3 is usual)")
    weights = self.loss_weights
    if weights is None:
      weights = (1.0,) * len(names)
    elif isinstance(weights, str):
      try:
        weights = tuple(float(w) for w in weights.split(",") if w.strip())
      except ValueError as e:
        raise ValueError(f"DPOConfig.loss_weights must be comma-separated floats, got {self.loss_weights!r}") from e
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(names):
      raise ValueError(
          f"DPOConfig.loss_weights has {len(weights)} values for {len(names)} losses {names}")
    if self.logp_reduction not in ("sum", "mean"):
      raise ValueError(f"DPOConfig.logp_reduction must be 'sum' or 'mean', got {self.logp_reduction!r}")
    if self.rpo_alpha is not None and self.rpo_alpha < 0:
      raise ValueError(f"DPOConfig.rpo_alpha must be >= 0, got {self.rpo_alpha}")
    if not self.discopop_tau > 0:
      raise ValueError(f"DPOConfig.discopop_tau must be > 0, got {self.discopop_tau}")
    if self.logits_chunk_size < 1:
      raise ValueError(f"DPOConfig.logits_chunk_size must be >= 1, got {self.logits_chunk_size}")
    return losses.LossSettings(
        loss_types=names,
        loss_weights=weights,
        beta=float(self.beta),
        label_smoothing=float(self.label_smoothing),
        simpo_gamma=float(self.simpo_gamma),
        rpo_alpha=None if self.rpo_alpha is None else float(self.rpo_alpha),
        logp_reduction=self.logp_reduction,
        discopop_tau=float(self.discopop_tau),
        reference_free=bool(self.reference_free),
    )

  @property
  def needs_reference(self) -> bool:
    """Whether the losses need reference log-probs (a model or precomputed values)."""
    return not self.reference_free and any(n not in ("simpo", "sft") for n in self.loss_types)
