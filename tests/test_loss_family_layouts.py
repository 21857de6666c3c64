"""The new loss options give the same losses, metrics and gradients in the padded, packed and shared-prompt
layouts (LD-DPO's tails, WPO's weights and ORPO's whole-sequence NLL are per-token quantities)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from artifex_dpo import DPOConfig
from artifex_dpo.trainer import dpo_loss
from layout_batches import packed_batch, padded_batch, tiny_models_and_pairs


@pytest.fixture(scope="module")
def setup():
  return tiny_models_and_pairs(10, seed=5)


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected")
# f-DPO and AlphaPO act on sequence sums only (nothing per-token), so the layouts cannot differ for them.
CONFIGS = {
    "ld_wpo": dict(ld_alpha=0.3, use_weighting=True, loss_type="sigmoid,hinge", beta=0.5),
    "orpo": dict(loss_type="orpo", reference_free=True, beta=0.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layouts_agree(setup, name):
  ds, policy, ref = setup
  cfg = DPOConfig(**CONFIGS[name])
  settings = cfg.loss_settings()
  reference = ref if cfg.needs_reference else None

  def run(batch):
    def f(p):
      return dpo_loss(nnx.merge(nnx.graphdef(policy), p), reference, batch, settings, chunk_size=32)
    (_, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(nnx.state(policy))
    return metrics, grads

  m_plain, g_plain = run(padded_batch(ds, np.arange(len(ds))))
  extra = {"ld_wpo": ("wpo/weights",), "orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen")}[name]
  for share in (False, True):
    if share:  # gradients on the shared-prompt rows (the layout furthest from the padded one)
      m, g = run(packed_batch(ds, share=share))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6), g, g_plain)
    else:
      m = jax.jit(lambda b: dpo_loss(policy, reference, b, settings, chunk_size=32)[1])(packed_batch(ds, share=share))
    for k in KEYS + extra:
      np.testing.assert_allclose(float(m[k]), float(m_plain[k]), rtol=2e-5, atol=1e-5, err_msg=f"{k} share={share}")
  # The option changes the loss (the test would not notice a path that ignores it).
  base = {"ld_wpo": dict(loss_type="sigmoid,hinge"), "orpo": dict(loss_type="simpo", reference_free=True)}
  base_settings = DPOConfig(**base[name], beta=CONFIGS[name]["beta"]).loss_settings()
  plain = padded_batch(ds, np.arange(len(ds)))
  plain_base, _ = jax.jit(lambda b: dpo_loss(policy, ref, b, base_settings, chunk_size=32))(plain)
  assert abs(float(plain_base) - float(m_plain["loss"])) > 1e-4
