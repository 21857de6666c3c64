"""The training loop's hooks (train.Loop): when each phase runs, with stand-ins for the compiled step.

The real step, checkpoints and outputs are run end to end by test_service / test_checkpoint /
test_faults; here the loop's own contract is checked step by step: metrics fetched one step late,
settled before a boundary hook, the clock's cadence, divergence and a signal stopping the run.
"""

from __future__ import annotations

import types

import ml_collections
import numpy as np
import pytest

from artifex_dpo import train


class FakeSignals:
  def __init__(self, at: int | None = None, code: int = 75):
    self.at, self.code, self.unsaved = at, code, False

  def reached(self, step: int) -> bool:
    return self.at is not None and step >= self.at

  def exit_code(self) -> int:
    return self.code


class FakeSteps:
  """``train``: state counts the updates; the metrics say whether the batch was marked non-finite."""

  def __init__(self, log):
    self.log = log

  def train(self, state, ref_state, batch):
    self.log.append(("train", batch["step"]))
    return state + 1, {"nonfinite": batch["nonfinite"], "loss": float(batch["step"])}


def make_loop(monkeypatch, steps=6, max_nonfinite=3, start=0):
  c = ml_collections.ConfigDict({"train": {"steps": steps, "grad_accum_steps": 1, "max_nonfinite_steps": max_nonfinite}})
  setup = types.SimpleNamespace(spec=None, dpo_config=None, state=start, ref_state=None, mesh=None, train_ref=None,
                                counters={"train/nonfinite_steps": 0},
                                step_flops=lambda local, c: (10.0 * local["step"], 2.0, 0.0))
  monkeypatch.setattr(train.state_lib, "global_batch", lambda local, mesh, **kw: local)
  loop = train.Loop(c, setup, start)
  log = []
  loop.compiled = FakeSteps(log)
  return loop, log


def loader(steps, start=0, nonfinite=()):
  for i in range(start, steps):
    yield i, {"step": i + 1, "nonfinite": int(i + 1 in nonfinite), "pair_indices": np.array([0, 1, -1])}


def record(log, name):
  return lambda info: log.append((name, info.step))


def test_phases_run_in_order_and_metrics_arrive_one_step_late(monkeypatch):
  loop, log = make_loop(monkeypatch, steps=4)
  seen = {}

  def keep(info):
    seen[info.step] = (info.metrics["loss"], info.tokens)

  loop.add_hook(record(log, "before"), phase=train.BEFORE_STEP, every=1)
  loop.add_hook(record(log, "after"), phase=train.AFTER_STEP, every=2)
  loop.add_hook(keep, phase=train.METRICS, every=1)
  loop.add_hook(record(log, "metrics"), phase=train.METRICS, every=1)
  loop.add_hook(record(log, "boundary"), every=3)
  assert loop.run(loader(4), FakeSignals()) == train.EXIT_OK
  assert log == [("before", 1), ("train", 1),
                 ("before", 2), ("train", 2), ("after", 2), ("metrics", 1),
                 ("before", 3), ("train", 3), ("metrics", 2), ("metrics", 3), ("boundary", 3),  # settled first
                 ("before", 4), ("train", 4), ("after", 4),
                 ("metrics", 4)]  # the last step's, after the loader ends
  assert seen == {s: (float(s), 10.0 * s) for s in (1, 2, 3, 4)}
  assert (loop.step, loop.state, loop.steps_done, loop.pairs_read) == (4, 4, 4, 8)


def test_the_clock_skips_the_last_step_for_run_outputs_and_when_adds_steps():
  hook = train.Hook(lambda info: None, train.BOUNDARY, every=2, before_last=True,
                    when=lambda info: info.preempted)
  due = lambda step, preempted=False: hook.due(train.StepInfo(step, None, preempted=preempted), 6)
  assert [s for s in range(1, 7) if due(s)] == [2, 4]
  assert due(6, preempted=True) and due(5, preempted=True)
  assert not train.Hook(lambda info: None, train.BOUNDARY).due(train.StepInfo(4, None), 6)  # every=0: never


def test_nonfinite_steps_in_a_row_stop_with_exit_3(monkeypatch):
  loop, log = make_loop(monkeypatch, steps=10, max_nonfinite=2)
  rows = []
  loop.add_hook(lambda info: rows.append((info.step, loop.nonfinite_run)), phase=train.METRICS, every=1)
  code = loop.run(loader(10, nonfinite=(3, 4, 6)), FakeSignals())
  assert code == train.EXIT_DIVERGED
  assert rows == [(1, 0), (2, 0), (3, 1), (4, 2)]  # step 4's metrics come during step 5
  assert loop.step == 5 and loop.counters["train/nonfinite_steps"] == 2


def test_a_signal_settles_runs_the_boundary_hooks_and_stops(monkeypatch):
  loop, log = make_loop(monkeypatch, steps=10, start=2)
  loop.add_hook(record(log, "metrics"), phase=train.METRICS, every=1)
  loop.add_hook(record(log, "save"), when=lambda info: info.preempted)
  signals = FakeSignals(at=4, code=130)
  assert loop.run(loader(10, start=2), signals) == 130
  assert log == [("train", 3), ("train", 4), ("metrics", 3), ("metrics", 4), ("save", 4)]
  assert signals.unsaved and loop.step == 4 and loop.state == 4


@pytest.mark.parametrize("every", [0, 1])
def test_a_resumed_loop_with_nothing_left_runs_no_step(monkeypatch, every):
  loop, log = make_loop(monkeypatch, steps=6, start=6)
  loop.add_hook(record(log, "metrics"), phase=train.METRICS, every=every)
  assert loop.run(loader(6, start=6), FakeSignals()) == train.EXIT_OK
  assert log == [] and loop.step == 6
