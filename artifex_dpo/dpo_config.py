"""``DPOConfig``: the hyper-parameters of the preference loss (the seed's fields plus TRL's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from artifex_dpo import losses
from artifex_dpo.config_schema import check_fields, field


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Configuration for Direct Preference Optimization and its family.

  The first three fields and their defaults are the seed trainer's; the rest follow TRL's
  ``DPOConfig`` names. Each field is also the service's config key ``dpo.<field>``: its one-line doc
  and allowed values are declared with the field (``config_schema.field``) and checked here.

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
    f_divergence_type: f-DPO divergence: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence``,
      ``alpha_divergence``; a non-default value only with the losses of
      ``losses.F_DIVERGENCE_LOSSES`` (TRL's rule).
    f_alpha_divergence_coef: the alpha of ``alpha_divergence``.
    use_weighting: WPO: weight each pair's loss by the policy's length-normalised sequence
      probabilities of both responses (no gradient through the weights).
    ld_alpha: LD-DPO: weight of the response tokens beyond the shorter response of the pair, in
      [0, 1] (None: off; 1.0 is plain DPO).
    cpo_alpha: CPO's NLL weight on the chosen responses (reference-free losses only; TRL's CPO
      default is 1.0, here None = 0 so that ``reference_free`` keeps its seed meaning).
    alpha: AlphaPO reward shape ``(1 - p^-alpha) / alpha`` for the reference-free (CPO) losses
      sigmoid / hinge / ipo / simpo / alphapo; 0: log-prob rewards.
    desirable_weight, undesirable_weight: KTO weights of desirable / undesirable examples.
    sync_ref_model: TR-DPO: every ``ref_model_sync_steps`` updates the reference becomes
      ``ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference``.
    ref_model_mixup_alpha: the TR-DPO mix (1.0: a hard copy).
    ref_model_sync_steps: updates between TR-DPO syncs.
  """

  beta: float = field(0.1, "reward scale beta (KL strength)", bounds="> 0")
  label_smoothing: float = field(0.0, "cDPO / robust label-flip rate", bounds="[0, 0.5)")
  reference_free: bool = field(False, "score against a uniform reference (SimPO when loss_type is left empty)")
  loss_type: str | Sequence[str] | None = field(
      None, "loss name(s), e.g. sigmoid or sigmoid,sft; empty: sigmoid (simpo when reference-free)",
      choices=losses.LOSS_TYPES, separator=",")
  loss_weights: Sequence[float] | str | None = field(None, "comma-separated weights, one per loss; empty: all 1")
  simpo_gamma: float = field(0.0, "SimPO target margin gamma")
  rpo_alpha: float | None = field(None, "weight of the chosen NLL term (RPO); unset: off", bounds=">= 0")
  logp_reduction: str = field("sum", "sequence log-prob reduction", choices=losses.LOGP_REDUCTIONS)
  discopop_tau: float = field(0.05, "DiscoPOP temperature", bounds="> 0")
  logits_chunk_size: int = field(
      512, "tokens (rows x positions) per device in one chunk of the chunked output projection + log-softmax: "
      "each device holds about this many tokens' float32 logits at a time", bounds=">= 1")
  precompute_ref_logps: bool = field(
      False, "score the data with the reference once before training (cached in workdir/ref_logps); then no "
      "reference model in memory and no reference forward")
  f_divergence_type: str = field(
      "reverse_kl", "f-DPO divergence; reverse_kl is DPO's (others only with sigmoid, sigmoid_norm, hinge, ipo, "
      "exo_pair, robust, discopop, sft)", choices=losses.F_DIVERGENCE_TYPES)
  f_alpha_divergence_coef: float = field(0.5, "alpha of f_divergence_type=alpha_divergence")
  use_weighting: bool = field(
      False, "WPO: weight each pair by the policy's length-normalised probabilities of both responses")
  ld_alpha: float | None = field(
      None, "LD-DPO: weight of response tokens beyond the pair's shorter response; unset: off", bounds="[0, 1]")
  cpo_alpha: float | None = field(
      None, "CPO: weight of the chosen NLL term with reference_free=True (TRL's default 1.0); unset: off",
      bounds=">= 0")
  alpha: float = field(
      0.0, "AlphaPO reward shape (1 - p^-alpha)/alpha for reference-free sigmoid/hinge/ipo/simpo/alphapo; 0: off")
  desirable_weight: float = field(1.0, "KTO: weight of desirable (label true) examples", bounds="> 0")
  undesirable_weight: float = field(1.0, "KTO: weight of undesirable (label false) examples", bounds="> 0")
  sync_ref_model: bool = field(
      False, "TR-DPO: every ref_model_sync_steps updates, reference = a * policy + (1 - a) * reference")
  ref_model_mixup_alpha: float = field(0.6, "TR-DPO mix a, in [0, 1] (1: hard copy)")
  ref_model_sync_steps: int = field(512, "TR-DPO: updates between reference syncs (>= 1)")

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
    check_fields(self)  # the choices and bounds declared with each field
    names = self.loss_types
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
    self._check_family(names)
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
        f_divergence_type=self.f_divergence_type,
        f_alpha_divergence_coef=float(self.f_alpha_divergence_coef),
        use_weighting=bool(self.use_weighting),
        ld_alpha=None if self.ld_alpha is None else float(self.ld_alpha),
        cpo_alpha=None if self.cpo_alpha is None else float(self.cpo_alpha),
        alpha=float(self.alpha),
        desirable_weight=float(self.desirable_weight),
        undesirable_weight=float(self.undesirable_weight),
    )

  def _check_family(self, names: tuple[str, ...]) -> None:
    """The options of TR-DPO, WPO, LD-DPO, f-DPO, ORPO, CPO/AlphaPO and KTO, and their bad combinations."""
    listed = ",".join(names)
    if self.f_divergence_type != "reverse_kl" and not set(names) <= losses.F_DIVERGENCE_LOSSES:
      raise ValueError(f"DPOConfig.f_divergence_type={self.f_divergence_type!r} works only with the losses "
                       f"{', '.join(sorted(losses.F_DIVERGENCE_LOSSES))} (as TRL), not {listed}")
    if self.use_weighting and "sft" in names:
      raise ValueError("DPOConfig.use_weighting (WPO) does not work with 'sft' (TRL 1.16 fails on it: the batch "
                       "NLL has no per-pair value to weight)")
    if self.use_weighting and {"aot", "aot_unpaired"} & set(names):
      raise ValueError("DPOConfig.use_weighting (WPO) does not work with 'aot'/'aot_unpaired': they sort the "
                       "pairs, which would misalign the per-pair weights (as TRL)")
    own_family = set(names) & (losses.UNPAIRED_LOSSES | {"orpo"})
    if own_family and len(names) > 1:
      raise ValueError(f"DPOConfig.loss_type: {sorted(own_family)[0]!r} cannot be combined with other losses, got "
                       f"{listed}")
    paired_only = dict(label_smoothing=0.0, rpo_alpha=None, cpo_alpha=None, use_weighting=False, ld_alpha=None,
                       f_divergence_type="reverse_kl", alpha=0.0, logp_reduction="sum", reference_free=False)
    if set(names) & losses.UNPAIRED_LOSSES:
      for key, default in paired_only.items():
        if getattr(self, key) != default:
          raise ValueError(f"DPOConfig.{key} is an option of the paired losses; loss {listed!r} (unpaired, TRL's "
                           f"KTOTrainer) does not take it (leave it at {default!r})")
    else:
      for key in ("desirable_weight", "undesirable_weight"):
        if getattr(self, key) != 1.0:
          raise ValueError(f"DPOConfig.{key} is an option of the unpaired losses (kto, apo_zero_unpaired), not of "
                           f"{listed}")
    if "orpo" in names:
      for key, default in paired_only.items():
        if key != "reference_free" and getattr(self, key) != default:
          raise ValueError(f"DPOConfig.{key} is not an option of loss 'orpo' (TRL's ORPO has no such option)")
      if not self.reference_free:
        raise ValueError("DPOConfig.reference_free must be True for loss 'orpo': ORPO never reads a reference "
                         "model (set reference_free=True; no reference is then kept in memory)")
    cpo_losses = {"sigmoid", "hinge", "ipo", "simpo", "alphapo"}
    if "alphapo" in names and not self.reference_free:
      raise ValueError("DPOConfig.reference_free must be True for loss 'alphapo' (TRL's CPO family is "
                       "reference-free)")
    if self.cpo_alpha is not None:
      if not self.reference_free or not set(names) <= cpo_losses | {"sft"}:
        raise ValueError("DPOConfig.cpo_alpha is CPO's NLL weight: it needs reference_free=True and losses among "
                         f"{', '.join(sorted(cpo_losses))}, got reference_free={self.reference_free}, {listed}")
      if self.rpo_alpha is not None:
        raise ValueError("DPOConfig.cpo_alpha and DPOConfig.rpo_alpha are the same NLL term; set one")
    if self.alpha != 0.0:
      if not self.reference_free or not set(names) <= cpo_losses:
        raise ValueError("DPOConfig.alpha (AlphaPO reward shape) needs reference_free=True and losses among "
                         f"{', '.join(sorted(cpo_losses))}, got reference_free={self.reference_free}, {listed}")
      if self.f_divergence_type != "reverse_kl":
        raise ValueError("DPOConfig.alpha and DPOConfig.f_divergence_type both reshape the rewards; set one")
    if self.sync_ref_model:
      if self.precompute_ref_logps:
        raise ValueError("DPOConfig.sync_ref_model cannot be combined with DPOConfig.precompute_ref_logps: "
                         "precomputed reference log-probs assume a fixed reference, TR-DPO updates it (as TRL)")
      if not self.needs_reference:
        raise ValueError(f"DPOConfig.sync_ref_model needs a loss that reads a reference; {listed} with "
                         f"reference_free={self.reference_free} reads none")
      if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
        raise ValueError(f"DPOConfig.ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
      if int(self.ref_model_sync_steps) != self.ref_model_sync_steps or self.ref_model_sync_steps < 1:
        raise ValueError(f"DPOConfig.ref_model_sync_steps must be an integer >= 1, got {self.ref_model_sync_steps}")

  @property
  def unpaired(self) -> bool:
    """Whether the loss is an unpaired one (KTO): batches of single labelled completions."""
    return bool(set(self.loss_types) & losses.UNPAIRED_LOSSES)

  @property
  def needs_reference(self) -> bool:
    """Whether the losses need reference log-probs (a model or precomputed values)."""
    return not self.reference_free and any(
        n not in ("simpo", "sft") and n not in losses.REFERENCE_FREE_LOSSES for n in self.loss_types)
