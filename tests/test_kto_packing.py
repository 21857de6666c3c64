"""KTO on packed rows (`data.pack_batches`): each example and its KL row laid out as one packed pair
(prompt shared or not) give the padded layout's loss, metrics and gradients."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from artifex_dpo import DPOConfig
from artifex_dpo.data import DataError, TruncationSettings, load_tokenizer
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


def _assert_same_loss_metrics_and_grads(padded, packed, config, skip=()):
  """The KTO loss, its metrics (but ``skip``) and its gradients are the same on both layouts."""
  cfg = get_preset("llama-tiny", vocab_size=TOK.vocab_size)
  policy, ref = LlamaModel(cfg, rngs=nnx.Rngs(2)), LlamaModel(cfg, rngs=nnx.Rngs(3))  # seeds with KL > 0
  graph, ref_graph = nnx.graphdef(policy), nnx.graphdef(ref)
  s = config.loss_settings()

  def loss_of(batch):
    def f(p, r):
      return dpo_loss(nnx.merge(graph, p), nnx.merge(ref_graph, r), batch, s)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(nnx.state(policy), nnx.state(ref))

  (want, wm), wg = loss_of(padded)
  (got, gm), gg = loss_of(packed)
  assert float(wm["kl"]) > 0  # the KL point is live: a wrong KL row would move the loss
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for key in wm:
    if key not in skip:
      np.testing.assert_allclose(float(gm[key]), float(wm[key]), rtol=2e-5, atol=2e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6), gg, wg)


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
  _assert_same_loss_metrics_and_grads(padded, packed, DPOConfig(loss_type="kto", beta=0.5, desirable_weight=1.2))


def test_packed_loader_rows_do_not_depend_on_the_process_count():
  from artifex_dpo.data.unpaired_loader import UnpairedDataset, UnpairedLoader

  ds = UnpairedDataset(_examples(10, 2), TOK.pad_id)
  kw = dict(seed=1, shuffle=True, pad_multiple=8, max_length=MAX_LEN, with_kl=True, pack_batches=True,
            row_length=4 * MAX_LEN, max_pairs_per_row=4, share_prompt=True)
  whole = UnpairedLoader(ds, 8, process_index=0, process_count=1, row_multiple=2, **kw).load(3)
  parts = [UnpairedLoader(ds, 8, process_index=p, process_count=2, **kw).load(3) for p in (0, 1)]
  for key in ("tokens", "segment_ids", "response_mask", "positions", "prefix_ids", "pair_mask", "labels",
              "pair_indices"):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
  # Every example of the global batch once, labelled as in the dataset; tokens as the padded layout counts them.
  padded = UnpairedLoader(ds, 8, process_index=0, process_count=1, seed=1, shuffle=True, pad_multiple=8,
                          max_length=MAX_LEN, with_kl=True).load(3)
  got = whole["pair_indices"][whole["pair_mask"] == 1]
  assert sorted(got) == sorted(padded["pair_indices"])
  assert list(whole["labels"][whole["pair_mask"] == 1]) == [int(ds.examples[i].label) for i in got]
  assert whole["global_num_tokens"] == padded["global_num_tokens"]
  assert whole["global_computed_tokens"] < whole["global_num_tokens"]  # the prompt runs once per example
  with pytest.raises(ValueError, match="needs loss 'kto'"):
    UnpairedLoader(ds, 8, process_index=0, process_count=1, **dict(kw, with_kl=False))


SERVICE = ["--config.train.eval_every=6", "--config.checkpoint.save_every=0", "--config.export.hf=False",
           "--config.train.log_every=1", "--config.dpo.loss_type=kto", "--config.train.global_batch_size=8",
           "--config.train.eval_batch_size=16", "--config.train.steps=6", "--config.data.synthetic_pairs=128",
           "--config.optim.warmup_steps=0"]


def test_service_pack_batches_on_two_processes_gives_the_padded_per_step_losses(tmp_path):
  """1 process, padded rows vs 2 processes (127.0.0.1), packed rows with shared prompts: the same steps (the
  layouts agree in test_packed_kto_equals_padded_kto, the process counts in test_kto_service.py)."""
  from processes import start, wait
  from service_runs import read_rows, run_main

  padded = run_main(tmp_path / "padded", *SERVICE)
  assert padded.returncode == 0, padded.stderr[-3000:]
  for code, err in wait(start(tmp_path / "packed", *SERVICE, "--config.data.pack_batches=True",
                              "--config.data.share_prompt=True", processes=2)):
    assert code == 0, err[-3000:]
  _, one, eval_one = read_rows(tmp_path / "padded")
  _, two, eval_two = read_rows(tmp_path / "packed")
  assert sorted(one) == sorted(two) == list(range(1, 7))
  for step in one:
    assert two[step]["tokens"] == one[step]["tokens"]  # both sequences of every example, as the padded layout
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, atol=1e-6, err_msg=f"{key}@{step}")
    for key in ("kl", "rewards/chosen", "rewards/rejected"):  # log-ratios: absolute, in nats
      np.testing.assert_allclose(two[step][key], one[step][key], rtol=1e-5, atol=5e-5, err_msg=f"{key}@{step}")
  assert sum(one[s]["kl"] > 0.05 for s in one) >= 2  # the KL point is live (not clamped to 0) in several steps
  np.testing.assert_allclose(eval_two[-1]["eval/loss"], eval_one[-1]["eval/loss"], rtol=1e-5)


def test_service_refuses_packing_without_kl_rows_and_rows_too_short_for_two_examples(tmp_path):
  from service_runs import error_line, run_main

  for key in ("data.packing", "data.pack_batches"):
    proc = run_main(tmp_path / key, *SERVICE, "--config.dpo.loss_type=apo_zero_unpaired", f"--config.{key}=True")
    assert proc.returncode == 2 and key in error_line(proc) and "KL row" in error_line(proc)
  proc = run_main(tmp_path / "short", *SERVICE, "--config.data.packing=True", "--config.data.pack_length=200")
  assert proc.returncode == 2 and "data.pack_length" in error_line(proc) and ">= 256" in error_line(proc)
  proc = run_main(tmp_path / "cap", *SERVICE, "--config.data.packing=True", "--config.data.max_pairs_per_row=2")
  assert proc.returncode == 2 and "data.max_pairs_per_row" in error_line(proc)


# --- data.packing: rows planned once for the dataset, each example's KL row rotating within its row -------------


def _planned(n_records, seed, share_prompt, max_pairs_per_row=5):
  from artifex_dpo.data.unpaired import plan_unpaired_packing

  examples = _examples(n_records, seed)
  return examples, plan_unpaired_packing(examples, 6 * MAX_LEN, max_pairs_per_row, share_prompt)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_plan_puts_every_example_once_with_a_partner_of_its_own_row(share_prompt):
  from artifex_dpo.data.unpaired import make_planned_unpaired_batch, row_kl_partners

  examples, plan = _planned(7, 4, share_prompt)  # 14 examples; odd groups come from 15
  assert sorted(plan.pair_indices) == list(range(len(examples)))
  assert plan.row_sizes.min() >= 2 and plan.row_sizes.max() <= 5
  assert plan.row_sizes.max() > 2  # rows really pack more than one group
  partners = row_kl_partners(plan)
  rows = list(range(plan.num_rows)) + [-1]
  b = make_planned_unpaired_batch(examples, plan, rows, pad_id=TOK.pad_id, max_length=MAX_LEN,
                                  share_prompt=share_prompt)
  for r in range(plan.num_rows):
    members = list(plan.row(r))
    assert sorted(partners[members]) == sorted(members) and all(partners[i] != i for i in members)
    assert list(b["pair_indices"][r][b["pair_mask"][r] == 1]) == members
  assert not b["pair_mask"][-1].any() and (b["pair_indices"][-1] == -1).all()
  # The unshared rows' KL sequences are the prompt followed by the partner's completion, cut to max_length.
  if not share_prompt:
    for r, k in zip(*np.nonzero(b["pair_mask"])):
      i, j = int(b["pair_indices"][r, k]), int(b["kl_partners"][r, k])
      assert j == partners[i] and b["labels"][r, k] == int(examples[i].label)
      seg = b["segment_ids"][r]
      assert list(b["tokens"][r][seg == 2 * k + 1]) == list(examples[i].prompt_ids) + list(examples[i].completion_ids)
      kl = list(examples[i].prompt_ids) + list(examples[j].completion_ids)
      assert list(b["tokens"][r][seg == 2 * k + 2]) == kl[:MAX_LEN]
  odd = _planned(7, 4, share_prompt)[0][:13]  # an odd count: the three shortest share a group
  from artifex_dpo.data.unpaired import plan_unpaired_packing
  assert plan_unpaired_packing(odd, 6 * MAX_LEN, 5, share_prompt).row_sizes.min() >= 2
  with pytest.raises(DataError, match="data.pack_length: 120 cannot hold examples"):
    plan_unpaired_packing(odd, 3 * MAX_LEN, 5, share_prompt)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_planned_packed_kto_equals_the_padded_layout_of_the_same_kl_rows(share_prompt):
  """The oracle: the padded layout (checked against TRL's loss in test_loss_family) fed the same examples with the
  same KL rows (prompt i + the completion of i's partner in its row)."""
  from artifex_dpo.data.unpaired import _pad_rows, make_planned_unpaired_batch

  examples, plan = _planned(6, 5, share_prompt)
  rows = [0, plan.num_rows - 1, -1]
  arrays = make_planned_unpaired_batch(examples, plan, rows, pad_id=TOK.pad_id, max_length=MAX_LEN,
                                       share_prompt=share_prompt)
  packed = PackedUnpairedBatch.from_arrays(arrays)
  real = arrays["pair_mask"] == 1
  idx, partners = arrays["pair_indices"][real], arrays["kl_partners"][real]
  assert len(idx) > len(rows)  # several examples per row
  padded = {f"completion_{k}": v for k, v in _pad_rows([(examples[i].prompt_ids, examples[i].completion_ids)
                                                        for i in idx], MAX_LEN, TOK.pad_id).items()}
  padded.update({f"kl_{k}": v for k, v in _pad_rows([(examples[i].prompt_ids, examples[j].completion_ids)
                                                     for i, j in zip(idx, partners)], MAX_LEN, TOK.pad_id).items()})
  padded["labels"] = np.asarray([examples[i].label for i in idx], np.int32)
  padded = UnpairedBatch.from_arrays(padded)
  _assert_same_loss_metrics_and_grads(padded, packed, DPOConfig(loss_type="kto", beta=0.5, undesirable_weight=1.3),
                                      skip=("tokens",))
