"""The service: accumulation over per-batch packed rows equals one padded batch; eval ignores its batch size.

Two real runs over the same pairs per step (``data.pack_batches`` keeps the padded layout's pairs):
one padded batch per update with an eval batch size dividing the held-out pairs, and packed rows (a
different number of pairs in each row) accumulated over 2 microbatches with an eval batch size that does
not divide them (the last eval batch is filled up with filler pairs). Every training and eval metric
must agree: a mean of microbatch means, or a filler pair counted, would show.
"""

from __future__ import annotations

import numpy as np
import pytest

from service_runs import read_rows, run_main

from artifex_dpo import config as config_lib

COMMON = ["--config.data.synthetic_pairs=96", "--config.data.eval_split=0.25",  # 24 held-out pairs
          "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.checkpoint.save_every=0", "--config.export.hf=False", "--config.optim.warmup_steps=0",
          "--config.dpo.loss_type=sigmoid,sft",
          # Large enough that after one update the rewards are far from ties (accuracies compare them).
          "--config.optim.learning_rate=1e-3"]
SAME = ("loss", "loss/sigmoid", "loss/sft", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "tokens", "pairs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("accum")
  one = run_main(root / "one", *COMMON, "--config.data.pack_batches=False", "--config.train.eval_batch_size=8")
  assert one.returncode == 0, one.stderr[-3000:]
  packed = run_main(root / "packed", *COMMON, "--config.data.pack_batches=True", "--config.train.grad_accum_steps=2",
                    "--config.train.eval_batch_size=5")
  assert packed.returncode == 0, packed.stderr[-3000:]
  return read_rows(root / "one"), read_rows(root / "packed")


def test_packed_rows_accumulated_equal_one_padded_batch(runs):
  (_, one, _), (_, packed, _) = runs
  assert sorted(one) == sorted(packed) == [1, 2]
  for step in (1, 2):  # step 2 also checks that both updates were the same
    for k in SAME:
      if step == 1 and k == "rewards/accuracies":
        # Before the first update the policy is the reference: every reward is 0 up to rounding, and
        # "chosen > rejected" compares rounding noise, which differs between layouts.
        assert abs(one[1]["rewards/chosen"]) < 1e-4 and abs(packed[1]["rewards/chosen"]) < 1e-4
        continue
      np.testing.assert_allclose(packed[step][k], one[step][k], rtol=2e-4, atol=1e-6, err_msg=f"step {step} {k}")
  assert one[1]["pairs"] == 16


def test_eval_metrics_do_not_depend_on_the_eval_batch_size(runs):
  (_, _, one), (_, _, packed) = runs
  assert len(one) == len(packed) == 1
  a, b = one[0], packed[0]
  assert set(a) == set(b)
  for k in a:
    if k.startswith("eval/"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-6, err_msg=k)
  # The held-out set, each pair once: 24 pairs, their tokens counted once.
  assert b["eval/rewards/accuracies"] * 24 == pytest.approx(round(b["eval/rewards/accuracies"] * 24), abs=1e-4)


def test_accumulation_with_a_sorting_loss_is_refused_naming_both_keys():
  c = config_lib.default_config()
  c.data.tokenizer = "byte"
  c.dpo.loss_type = "sigmoid,aot"
  c.train.grad_accum_steps = 2
  with pytest.raises(config_lib.ConfigError, match=r"config key train\.grad_accum_steps: .*dpo\.loss_type"):
    config_lib.validate(c)
  c.train.grad_accum_steps = 1
  config_lib.validate(c)
