"""KTO with `dpo.precompute_ref_logps`: the reference scores each example's completion once and each KL row for
the batch order the run uses (step, position); the losses equal those of the live reference."""

from __future__ import annotations

import numpy as np
import pytest

from artifex_dpo.data import TruncationSettings, load_tokenizer
from artifex_dpo.data.synthetic import synthetic_records
from artifex_dpo.data.unpaired import read_unpaired
from artifex_dpo.data.unpaired_loader import (UnpairedDataset, UnpairedLoader, UnpairedReference, eval_kl_partners,
                                              train_kl_partners, unpaired_eval_batches)

TOK = load_tokenizer("byte")
MAX_LEN = 40


def _dataset(n_records=5, seed=3):
  records = [("m", i, r) for i, r in enumerate(synthetic_records(n_records, seed=seed))]
  examples, _ = read_unpaired(records, TOK, TruncationSettings(MAX_LEN, 24))
  rng = np.random.default_rng(seed)
  return UnpairedDataset([examples[i] for i in rng.permutation(len(examples))], TOK.pad_id)


def _rows(local, prefix):
  """The non-padding tokens of each row."""
  return [list(t[s > 0]) for t, s in zip(local[f"{prefix}_tokens"], local[f"{prefix}_segment_ids"])]


def _kl_row(ds, i, j):
  return (list(ds.examples[i].prompt_ids) + list(ds.examples[j].completion_ids))[:MAX_LEN]


def test_partners_are_the_kl_rows_the_loaders_build():
  """train_kl_partners / eval_kl_partners (what the precomputed KL sums are scored for) name the completions
  the padded batches really put in each KL row, over steps that straddle epochs (10 examples, batches of 4)."""
  ds = _dataset()
  assert len(ds) == 10
  loader = UnpairedLoader(ds, 4, seed=7, shuffle=True, process_index=0, process_count=1, pad_multiple=8,
                          max_length=MAX_LEN, with_kl=True)
  for step in range(6):
    g, partners = train_kl_partners(step, 4, len(ds), 7, True)
    local = loader.load(step)
    assert list(local["pair_indices"]) == list(g)
    assert _rows(local, "kl") == [_kl_row(ds, i, j) for i, j in zip(g, partners)], step
  partners = eval_kl_partners(len(ds), 4)  # batches 0-3, 4-7, 8-9
  assert list(partners) == [3, 0, 1, 2, 7, 4, 5, 6, 9, 8]
  for local in unpaired_eval_batches(ds, 4, max_length=MAX_LEN, pad_multiple=8):
    real = local["pair_indices"][local["pair_indices"] >= 0]
    assert _rows(local, "kl")[:len(real)] == [_kl_row(ds, i, partners[i]) for i in real]
  one = eval_kl_partners(9, 4)  # a last batch of one example pairs it with itself
  assert one[8] == 8


@pytest.mark.parametrize("packed", [False, True])
def test_loader_attaches_the_sums_of_its_rows(packed):
  """Each row (slot) carries its example's completion sum and its (step, position) KL sum; 2 processes
  split the rows of the 1-process batch."""
  ds = _dataset()
  steps, b = 5, 4
  # Values that name their source: completion sum = -example, KL sum = -(100 * step + position).
  ref = UnpairedReference(-np.arange(len(ds), dtype=np.float32),
                          -(100 * np.arange(steps)[:, None] + np.arange(b)[None, :]).astype(np.float32))
  kw = dict(seed=7, shuffle=True, pad_multiple=8, max_length=MAX_LEN, with_kl=True, reference=ref,
            pack_batches=packed, row_length=4 * MAX_LEN, max_pairs_per_row=3, share_prompt=packed)
  for step in (1, 4):
    g, _ = train_kl_partners(step, b, len(ds), 7, True)
    whole = UnpairedLoader(ds, b, process_index=0, process_count=1, row_multiple=2, **kw).load(step)
    parts = [UnpairedLoader(ds, b, process_index=p, process_count=2, **kw).load(step) for p in (0, 1)]
    keys = ("ref_logps",) if packed else ("completion_ref_logps", "kl_ref_logps")
    for key in keys:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key], err_msg=key)
    if not packed:
      np.testing.assert_array_equal(whole["completion_ref_logps"], -g.astype(np.float32))
      np.testing.assert_array_equal(whole["kl_ref_logps"], -(100 * step + np.arange(b)).astype(np.float32))
      continue
    slots = whole["pair_mask"] == 1
    assert slots.sum() == b
    idx, sums = whole["pair_indices"][slots], whole["ref_logps"][slots]
    np.testing.assert_array_equal(sums[:, 0], -idx.astype(np.float32))
    positions = -sums[:, 1] - 100 * step
    assert sorted(positions) == list(range(b)) and list(g[positions.astype(int)]) == list(idx)
    assert not whole["ref_logps"][~slots].any()
  with pytest.raises(ValueError, match="cover steps < 5"):
    UnpairedLoader(ds, b, process_index=0, process_count=1, **kw).load(steps)


SERVICE = ["--config.train.eval_every=4", "--config.checkpoint.save_every=0", "--config.export.hf=False",
           "--config.train.log_every=1", "--config.dpo.loss_type=kto", "--config.train.global_batch_size=8",
           "--config.train.eval_batch_size=8", "--config.data.synthetic_pairs=16", "--config.optim.warmup_steps=0",
           "--config.optim.schedule=constant", "--config.dpo.beta=0.5"]


def _compare(want, got, steps):
  assert sorted(want[0]) == list(range(1, steps + 1)) and sorted(got[0]) == list(range(1, steps + 1))
  for step in want[0]:
    a, b = want[0][step], got[0][step]
    assert a["tokens"] == b["tokens"] and a["pairs"] == b["pairs"]
    for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"{key}@{step}")
    # Log-ratios: differences of float32 sums computed in batches of other shapes (absolute, in nats).
    for key in ("kl", "rewards/chosen", "rewards/rejected"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=5e-5, err_msg=f"{key}@{step}")
  got_evals = {r["step"]: r for r in got[1]}  # a resumed run also evaluated where its first part ended
  assert len(want[1]) >= 2 and {r["step"] for r in want[1]} <= set(got_evals)
  for a in want[1]:
    b = got_evals[a["step"]]
    for key in ("eval/loss", "eval/kl", "eval/rewards/margins"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=5e-5, err_msg=f"{key}@{a['step']}")


def test_service_precomputed_kto_gives_the_live_reference_losses(tmp_path):
  """28 training examples in batches of 8: the steps straddle epochs and the KL pairs change with each epoch's
  shuffle. Live reference (padded) vs precomputed: padded, resumed with more steps (the KL table is extended
  for the new steps only), and packed with shared prompts."""
  from processes import start, wait
  from service_runs import read_rows, run_main

  def rows(name):
    _, train, evals = read_rows(tmp_path / name)
    return train, evals

  live = run_main(tmp_path / "live", *SERVICE, "--config.train.steps=8")
  assert live.returncode == 0, live.stderr[-3000:]
  want = rows("live")
  # The KL point is live (not clamped to 0) in steps and evals: a wrong KL sum there moves the loss.
  assert sum(want[0][s]["kl"] > 0.05 for s in want[0]) >= 2 and all(r["eval/kl"] > 0.05 for r in want[1])

  pre = run_main(tmp_path / "pre", *SERVICE, "--config.train.steps=5", "--config.dpo.precompute_ref_logps=True")
  assert pre.returncode == 0, pre.stderr[-3000:]
  assert "reference log-probs: 28 examples' completions, the KL rows of steps 1..5" in pre.stderr
  more = run_main(tmp_path / "pre", *SERVICE, "--config.train.steps=8", "--config.dpo.precompute_ref_logps=True")
  assert more.returncode == 0, more.stderr[-3000:]
  assert "28 examples' completions (cached), the KL rows of steps 6..8" in more.stderr
  assert "resumed from" in more.stderr
  _compare(want, rows("pre"), 8)

  # Two processes (127.0.0.1) score the reference in their halves of each batch, then train on packed rows.
  for code, err in wait(start(tmp_path / "packed", *SERVICE, "--config.train.steps=8",
                              "--config.dpo.precompute_ref_logps=True", "--config.data.pack_batches=True",
                              "--config.data.share_prompt=True", processes=2)):
    assert code == 0, err[-3000:]
  _compare(want, rows("packed"), 8)


def test_service_precomputed_apo_zero_unpaired(tmp_path):
  """No KL rows (apo_zero_unpaired): only the completions are scored; the live reference's losses."""
  from service_runs import read_rows, run_main

  args = [*SERVICE, "--config.dpo.loss_type=apo_zero_unpaired", "--config.train.steps=4"]
  live = run_main(tmp_path / "live", *args)
  assert live.returncode == 0, live.stderr[-3000:]
  pre = run_main(tmp_path / "pre", *args, "--config.dpo.precompute_ref_logps=True")
  assert pre.returncode == 0, pre.stderr[-3000:]
  assert "reference log-probs: 28 examples' completions, no KL rows" in pre.stderr
  (_, a, a_eval), (_, b, b_eval) = read_rows(tmp_path / "live"), read_rows(tmp_path / "pre")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a[4]["loss"] != a[1]["loss"]
  for step in a:
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-5, atol=5e-5, err_msg=f"{key}@{step}")
  np.testing.assert_allclose(b_eval[-1]["eval/loss"], a_eval[-1]["eval/loss"], rtol=1e-5, atol=1e-6)


def test_service_data_packing_one_process_live_equals_two_processes_precomputed(tmp_path):
  """data.packing with KTO (rows planned once; each example's KL row rotates within its row, so its partner is
  fixed and precomputed by example): the number of examples per step varies, and 2 processes with precomputed
  reference sums give the 1-process live-reference losses."""
  from processes import start, wait
  from service_runs import read_rows, run_main

  args = [*SERVICE, "--config.train.global_batch_size=2", "--config.train.steps=6", "--config.data.packing=True",
          "--config.data.share_prompt=True", "--config.train.eval_every=3"]
  live = run_main(tmp_path / "live", *args)
  assert live.returncode == 0, live.stderr[-3000:]
  assert "packing: 28 pairs in" in live.stderr
  for code, err in wait(start(tmp_path / "pre", *args, "--config.dpo.precompute_ref_logps=True", processes=2)):
    assert code == 0, err[-3000:]
  _, a, a_eval = read_rows(tmp_path / "live")
  _, b, _ = read_rows(tmp_path / "pre")
  assert len({a[s]["pairs"] for s in a}) > 1 and min(a[s]["pairs"] for s in a) >= 4  # >= 2 examples per row
  assert sum(a[s]["kl"] > 0.05 for s in a) >= 2
  _compare((a, a_eval), (b, read_rows(tmp_path / "pre")[2]), 6)
