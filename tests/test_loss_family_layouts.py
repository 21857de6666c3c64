"""The new loss options give the same losses, metrics and gradients in the padded, packed and shared-prompt
layouts (LD-DPO's tails, WPO's weights and ORPO's whole-sequence NLL are per-token quantities)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from artifex_dpo import DPOConfig
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
  texts = [parse_record(r, tok, "mem", i) for i, r in enumerate(synthetic_records(10, seed=5))]
  ds = PreferenceDataset.from_pairs(tokenize_pairs(texts, tok), tok.pad_id)
  cfg = get_preset("llama-tiny", vocab_size=tok.vocab_size)
  return ds, LlamaModel(cfg, rngs=nnx.Rngs(0)), LlamaModel(cfg, rngs=nnx.Rngs(1))


def _plain(ds):
  idx = np.arange(len(ds))
  b = make_batch(ds, idx, int(ds.lengths[idx].max()))
  side = lambda s: GeneratedSequenceBatch(sequences=jnp.asarray(b[f"{s}_tokens"]),
                                         response_mask=jnp.asarray(b[f"{s}_response_mask"]),
                                         segment_ids=jnp.asarray(b[f"{s}_segment_ids"]))
  return PreferenceBatch(chosen=side("chosen"), rejected=side("rejected"))


def _packed(ds, share):
  plan = plan_packing(packed_lengths(ds.offsets, share), row_length=160, max_pairs_per_row=4)
  b = make_packed_batch(ds, plan, np.arange(plan.num_rows), share_prompt=share)
  shared = {k: jnp.asarray(b[k]) for k in ("positions", "prefix_ids")} if share else {}
  return PackedPreferenceBatch(sequences=jnp.asarray(b["tokens"]), segment_ids=jnp.asarray(b["segment_ids"]),
                               response_mask=jnp.asarray(b["response_mask"]), pair_mask=jnp.asarray(b["pair_mask"]),
                               **shared)


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

  m_plain, g_plain = run(_plain(ds))
  extra = {"ld_wpo": ("wpo/weights",), "orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen")}[name]
  for share in (False, True):
    if share:  # gradients on the shared-prompt rows (the layout furthest from the padded one)
      m, g = run(_packed(ds, share))
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6), g, g_plain)
    else:
      m = jax.jit(lambda b: dpo_loss(policy, reference, b, settings, chunk_size=32)[1])(_packed(ds, share))
    for k in KEYS + extra:
      np.testing.assert_allclose(float(m[k]), float(m_plain[k]), rtol=2e-5, atol=1e-5, err_msg=f"{k} share={share}")
  # The option changes the loss (the test would not notice a path that ignores it).
  base = {"ld_wpo": dict(loss_type="sigmoid,hinge"), "orpo": dict(loss_type="simpo", reference_free=True)}
  base_settings = DPOConfig(**base[name], beta=CONFIGS[name]["beta"]).loss_settings()
  plain_base, _ = jax.jit(lambda b: dpo_loss(policy, ref, b, base_settings, chunk_size=32))(_plain(ds))
  assert abs(float(plain_base) - float(m_plain["loss"])) > 1e-4
