"""The service's default layout (issue 14) and the fixed row budget of `data.pack_batches`.

Unset, `data.pack_batches` / `data.share_prompt` give paired data packed shared-prompt rows and
unpaired data (KTO) padded batches; explicit values are kept. A packed step always has the same
number of rows (the run's budget), so a run compiles its train step once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artifex_dpo import config as config_lib
from artifex_dpo.data import DataError, PreferenceDataset, PreferenceLoader, plan_packing
from artifex_dpo.data.formats import TokenizedPair
from artifex_dpo.data.packing import (ffd_row_counts, guaranteed_pairs_per_row, packed_lengths, resolve_layout,
                                      row_budget_bound)

ROOT = Path(__file__).resolve().parents[1]


def dataset(n: int, max_length: int, seed: int = 0) -> PreferenceDataset:
  """Pairs of every size up to ``max_length`` per side (prompt 0..max_length // 2)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for i in range(n):
    p = int(rng.integers(0, max_length // 2 + 1))
    c, r = (int(rng.integers(1, max_length - p + 1)) for _ in range(2))
    pairs.append(TokenizedPair(np.full(p, 1 + i % 50, np.int32), np.full(c, 2, np.int32), np.full(r, 3, np.int32)))
  return PreferenceDataset.from_pairs(pairs, pad_id=0)


# --------------------------------------------------------------------------- the layout default


def _cfg(**data):
  c = config_lib.default_config()
  c.data.tokenizer = "byte"
  for k, v in data.items():
    c.data[k] = v
  return c


def test_default_is_packed_shared_rows_for_paired_data_and_padded_for_unpaired():
  c = _cfg()
  assert c.data.pack_batches is None and c.data.share_prompt is None  # unset until validated
  config_lib.validate(c, check_files=False)
  assert (c.data.pack_batches, c.data.share_prompt) == (True, True)
  kto = _cfg()
  kto.dpo.loss_type = "kto"
  config_lib.validate(kto, check_files=False)  # the default does not make KTO configs fail
  assert (kto.data.pack_batches, kto.data.share_prompt) == (False, False)


@pytest.mark.parametrize("data,expected", [
    (dict(pack_batches=False), (False, False)),            # the padded layout, one key
    (dict(pack_batches=True, share_prompt=False), (True, False)),
    (dict(share_prompt=False), (True, False)),
    (dict(packing=True), (False, False)),                  # data.packing's plan is not changed by the default
    (dict(packing=True, share_prompt=True), (False, True)),
])
def test_explicit_settings_are_kept(data, expected):
  c = _cfg(**data)
  config_lib.validate(c, check_files=False)
  assert (c.data.pack_batches, c.data.share_prompt) == expected


@pytest.mark.parametrize("loss,data,key", [
    ("apo_zero_unpaired", dict(pack_batches=True), "data.pack_batches"),  # no KTO rows to pack: refused, not ignored
    ("kto", dict(share_prompt=True), "data.share_prompt"),  # unset pack_batches: KTO's padded batches cannot share
])
def test_explicit_packed_settings_with_unpaired_losses_are_refused(loss, data, key):
  c = _cfg(**data)
  c.dpo.loss_type = loss
  with pytest.raises(config_lib.ConfigError, match=f"config key {key}:"):
    config_lib.validate(c, check_files=False)


def test_explicit_pack_batches_with_kto_is_kept():
  c = _cfg(pack_batches=True)
  c.dpo.loss_type = "kto"
  config_lib.validate(c, check_files=False)
  assert (c.data.pack_batches, c.data.share_prompt) == (True, True)  # the packed KTO layout, prompts shared


def test_resolve_layout_rules():
  assert resolve_layout(None, None, False, False) == (True, True)
  assert resolve_layout(None, None, False, True) == (False, False)
  assert resolve_layout(None, None, True, False) == (False, False)
  assert resolve_layout(False, None, False, False) == (False, False)
  assert resolve_layout(True, True, False, True) == (True, True)  # explicit: kept
  assert resolve_layout(True, None, False, True) == (True, True)  # packed KTO batches share the prompt


# --------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("row_length,cap", [(128, 4), (128, 1), (256, 8), (100, 3), (512, 16)])
def test_ffd_row_counts_are_the_plans_rows(row_length, cap):
  rng = np.random.default_rng(row_length + cap)
  totals = rng.integers(1, row_length + 1, size=(200, 24))
  totals[::3] = rng.integers(1, row_length // 4 + 1, size=totals[::3].shape)
  got = ffd_row_counts(totals, row_length, cap)
  want = [plan_packing(np.stack([t, np.zeros_like(t)], 1), row_length, cap).num_rows for t in totals]
  np.testing.assert_array_equal(got, want)


def test_ffd_row_counts_refuse_a_pair_longer_than_a_row():
  with pytest.raises(DataError, match="data.max_length"):
    ffd_row_counts(np.array([[10, 129]]), 128, 4)


@pytest.mark.parametrize("max_length,row_length,cap", [(64, 128, 4), (64, 256, 8), (64, 300, 3), (32, 512, 16)])
def test_bound_holds_any_batch(max_length, row_length, cap):
  """Every batch of pairs of at most 2 * max_length tokens fits the config's bound, the worst one included."""
  batch = 24
  bound = row_budget_bound(batch, max_length, row_length, cap, row_multiple=1)
  rng = np.random.default_rng(max_length + row_length)
  totals = rng.integers(1, 2 * max_length + 1, size=(300, batch))
  totals[0] = 2 * max_length  # the worst case: every pair as long as it can be
  totals[1] = row_length // (guaranteed_pairs_per_row(max_length, row_length, cap) + 1) + 1  # one too many a row
  counts = ffd_row_counts(totals, row_length, cap)
  assert counts.max() <= bound
  assert counts[0] == bound  # tight: the worst case needs all of it


def test_bound_rounds_up_to_the_row_multiple():
  assert row_budget_bound(10, 64, 128, 4, row_multiple=4) == 12
  assert row_budget_bound(10, 64, 512, 4, row_multiple=4) == 4  # ceil(10 / 4) = 3 rows -> 4


@pytest.mark.parametrize("share_prompt", [False, True])
def test_loader_yields_the_same_rows_every_step(share_prompt):
  ds = dataset(300, max_length=32)
  kw = dict(seed=3, max_length=32, pack_batches=True, share_prompt=share_prompt, num_steps=40, row_multiple=2)
  loader = PreferenceLoader(ds, 16, **kw)
  budget = loader.row_budget
  totals = packed_lengths(ds.offsets, share_prompt).sum(1)
  needed = [plan_packing(np.stack([totals[loader.global_indices(s)], 0 * totals[:16]], 1), 64, 2).num_rows
            for s in range(40)]
  assert budget == -(-max(needed) // 2) * 2  # the most any step of the run needs, rounded up to the multiple
  assert len(set(needed)) > 1  # the steps alone would need different row counts
  assert budget <= row_budget_bound(16, 32, 64, 2, row_multiple=2)
  shapes = {loader.load(s)["tokens"].shape for s in range(40)}
  assert shapes == {(budget, 64)}
  # Every pair of every step is in its batch (same pairs per step as padded batches).
  for s in (0, 17, 39):
    got = loader.load(s)["pair_indices"]
    assert sorted(got[got >= 0].tolist()) == sorted(loader.global_indices(s).tolist())
  # A resumed run (another start step) and another process count keep the shape.
  resumed = PreferenceLoader(ds, 16, start_step=25, **kw)
  assert resumed.row_budget == budget
  halves = [PreferenceLoader(ds, 16, process_index=i, process_count=2, **{**kw, "row_multiple": 1}) for i in (0, 1)]
  assert {h.row_budget for h in halves} == {budget}
  assert halves[0].load(5)["tokens"].shape == (budget // 2, 64)


def test_loader_without_a_step_count_uses_the_bound_and_a_given_budget_too_small_is_refused():
  ds = dataset(100, max_length=32)
  endless = PreferenceLoader(ds, 8, max_length=32, pack_batches=True)
  assert endless.row_budget == row_budget_bound(8, 32, 64, 2, row_multiple=1) == 8
  small = PreferenceLoader(ds, 8, max_length=32, pack_batches=True, row_budget=1)
  with pytest.raises(DataError, match="row budget of 1"):
    small.load(0)


# --------------------------------------------------------------------------- one compile per run


def test_a_multi_step_run_compiles_its_train_step_once(tmp_path):
  """The tiny run on the default layout: the step's rows would vary (checked above), its shape does not."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
  cmd = [sys.executable, "-m", "artifex_dpo.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         "--config.train.steps=12", "--config.train.log_every=4", "--config.train.eval_every=0",
         "--config.checkpoint.save_every=0", "--config.export.hf=False"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  compiles = [line for line in proc.stderr.splitlines() if "Compiling jit(step)" in line]
  assert len(compiles) == 1, [line[:300] for line in compiles]
  assert "int32[" in compiles[0]
