"""KTO on packed rows (`data.pack_batches`): each example and its KL row laid out as one packed pair
(prompt shared or not) give the padded layout's loss, metrics and gradients."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from artifex_dpo import DPOConfig
from artifex_dpo.data import TruncationSettings, load_tokenizer
from artifex_dpo.data.synthetic import synthetic_records
from artifex_dpo.data.unpaired import make_packed_unpaired_batch, make_unpaired_batch, read_unpaired
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.trainer import dpo_loss
from artifex_dpo.types import PackedUnpairedBatch, UnpairedBatch

TOK = load_tokenizer("byte")
MAX_LEN = 40


def _examples(n, seed):
  records = [("m", i, r) for i, r in enumerate(synthetic_records(n, seed=seed))]
  examples, _ = read_unpaired(records, TOK, TruncationSettings(MAX_LEN, 24))
  # Unequal lengths and labels out of step with the order, so the KL rotation crosses rows.
  rng = np.random.default_rng(seed)
  return [examples[i] for i in rng.permutation(len(examples))]


def test_packed_rows_hold_each_example_with_its_kl_row():
  examples = _examples(5, 3)
  b = make_packed_unpaired_batch(examples, pad_id=TOK.pad_id, row_length=2 * MAX_LEN, max_pairs_per_row=3,
                                 max_length=MAX_LEN, row_multiple=4)
  assert b["tokens"].shape[0] % 4 == 0 and b["pair_mask"].sum() == len(examples)
  for r, k in zip(*np.nonzero(b["pair_mask"])):
    i = int(b["pair_indices"][r, k])
    e, prev = examples[i], examples[i - 1]
    seg = b["segment_ids"][r]
    completion = b["tokens"][r][(seg == 2 * k + 1)]
    kl = b["tokens"][r][(seg == 2 * k + 2)]
    assert list(completion) == list(e.prompt_ids) + list(e.completion_ids)
    expected_kl = list(e.prompt_ids) + list(prev.completion_ids)
    assert list(kl) == expected_kl[:MAX_LEN]
    assert b["labels"][r, k] == int(e.label)
  assert not b["labels"][b["pair_mask"] == 0].any()


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_kto_equals_padded_kto(share_prompt):
  examples = _examples(6, 5)  # 12 examples (paired records unpaired)
  padded = UnpairedBatch.from_arrays(make_unpaired_batch(examples, pad_id=TOK.pad_id, with_kl=True,
                                                         pad_multiple=8, max_length=MAX_LEN))
  arrays = make_packed_unpaired_batch(examples, pad_id=TOK.pad_id, row_length=4 * MAX_LEN, max_pairs_per_row=4,
                                      max_length=MAX_LEN, share_prompt=share_prompt, row_multiple=2)
  packed = PackedUnpairedBatch.from_arrays(arrays)
  assert arrays["tokens"].shape[0] < len(examples)  # really packed (several examples per row)
  cfg = get_preset("llama-tiny", vocab_size=TOK.vocab_size)
  policy, ref = LlamaModel(cfg, rngs=nnx.Rngs(2)), LlamaModel(cfg, rngs=nnx.Rngs(3))  # seeds with KL > 0
  graph, ref_graph = nnx.graphdef(policy), nnx.graphdef(ref)
  s = DPOConfig(loss_type="kto", beta=0.5, desirable_weight=1.2).loss_settings()

  def loss_of(batch):
    def f(p, r):
      return dpo_loss(nnx.merge(graph, p), nnx.merge(ref_graph, r), batch, s)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(nnx.state(policy), nnx.state(ref))

  (want, wm), wg = loss_of(padded)
  (got, gm), gg = loss_of(packed)
  assert float(wm["kl"]) > 0  # the KL point is live: a wrong KL row would move the loss
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for key in wm:
    np.testing.assert_allclose(float(gm[key]), float(wm[key]), rtol=2e-5, atol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6), gg, wg)
