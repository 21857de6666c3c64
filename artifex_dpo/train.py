"""The training loop: config -> setup -> loop (with its hooks) -> outputs.

``run(config, workdir)`` is what ``python -m artifex_dpo.main`` calls on every process. It
returns the exit code (0 finished, 3 diverged, 75 preempted, 130 interrupted); bad config or data
raise :class:`~artifex_dpo.config.ConfigError` / :class:`~artifex_dpo.data.DataError`, which main
turns into exit code 2. What a run holds before its first step is built by :mod:`artifex_dpo.setup`;
the work timed by the step (metrics logging, eval, save, profile, TR-DPO's reference sync) hangs
off the :class:`Loop` as hooks (:meth:`Loop.add_hook`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from artifex_dpo import losses
from artifex_dpo import metrics as metrics_lib
from artifex_dpo import setup as setup_lib
from artifex_dpo import signals as signals_lib
from artifex_dpo import state as state_lib
from artifex_dpo import storage
from artifex_dpo.data import PreferenceDataset, eval_batches
from artifex_dpo.data.unpaired_loader import unpaired_eval_batches
from artifex_dpo.models import export_hf
from artifex_dpo.models import lora as lora_lib
from artifex_dpo.models.hf_export import clean_stale_exports

EXIT_OK, EXIT_DIVERGED, EXIT_PREEMPTED = 0, 3, 75

# When a hook runs, relative to its step.
BEFORE_STEP = "before_step"  # before the step's batch is made
AFTER_STEP = "after_step"  # right after the step is queued on the devices; its results are not read yet
METRICS = "metrics"  # when the step's metrics reach the host: one step late, so the devices always have work queued
BOUNDARY = "boundary"  # after the step's metrics, at the step boundary; a signal stops the run after these hooks


@dataclasses.dataclass
class StepInfo:
  """What a hook is told about its step.

  Attributes:
    step: the optimizer update, counted from 1.
    loop: the loop (its ``state``, ``ref_state``, ``counters``, ``nonfinite_run`` ...).
    metrics: the step's metrics on the host (METRICS and BOUNDARY hooks), else None.
    tokens, pairs, flops: the step's non-padding tokens, real pairs and model FLOPs (after the step).
    preempted: a signal asked the run to save and stop after this step (BOUNDARY hooks).
  """

  step: int
  loop: Loop
  metrics: dict[str, Any] | None = None
  tokens: float = 0.0
  pairs: float = 0.0
  flops: float = 0.0
  preempted: bool = False


@dataclasses.dataclass(frozen=True)
class Hook:
  """``fn(info)`` at ``phase`` of every ``every``-th step (0: none), and of the steps ``when(info)`` picks.

  ``before_last``: the clock skips the run's last step, whose outputs (final eval and save) are
  ``run``'s on every way out of the loop.
  """

  fn: Callable[[StepInfo], None]
  phase: str
  every: int = 0
  when: Callable[[StepInfo], bool] | None = None
  before_last: bool = False

  def due(self, info: StepInfo, last_step: int) -> bool:
    clock = bool(self.every) and info.step % self.every == 0 and not (self.before_last and info.step >= last_step)
    return clock or bool(self.when is not None and self.when(info))


class Loop:
  """The training steps and the hooks timed by them.

  Attributes:
    state, ref_state: the current (policy, optimizer) state and reference (TR-DPO's hook replaces it).
    step: the last step run (the resumed step before the first).
    counters: the counters every metrics row carries.
    nonfinite_run: non-finite steps in a row, up to the last settled one.
    steps_done: steps this process has run; pairs_read: real pairs it loaded.
  """

  def __init__(self, c: ml_collections.ConfigDict, setup: setup_lib.Setup, start_step: int):
    self.c, self.setup = c, setup
    self.compiled = setup_lib.CompiledSteps(setup, c.train.grad_accum_steps)
    self.state, self.ref_state, self.counters = setup.state, setup.ref_state, setup.counters
    self.step, self.steps_done, self.pairs_read, self.nonfinite_run = start_step, 0, 0, 0
    self._hooks: list[Hook] = []
    self._pending: tuple[StepInfo, Any] | None = None  # a step whose metrics are not fetched yet

  def add_hook(self, fn: Callable[[StepInfo], None], *, phase: str = BOUNDARY, every: int = 0,
               when: Callable[[StepInfo], bool] | None = None, before_last: bool = False) -> None:
    """Runs ``fn(info)`` at ``phase`` of the due steps (see :class:`Hook`), in the order added."""
    self._hooks.append(Hook(fn, phase, every, when, before_last))

  def _due(self, phase: str, info: StepInfo) -> list[Hook]:
    return [h for h in self._hooks if h.phase == phase and h.due(info, self.c.train.steps)]

  def run(self, loader: Iterator, signals: signals_lib.Signals) -> int:
    """Steps through ``loader`` until it ends, training diverges or a signal stops it; returns the exit code."""
    for step_index, local in loader:
      info = StepInfo(step=step_index + 1, loop=self)  # steps count optimizer updates from 1
      self.step = info.step
      for hook in self._due(BEFORE_STEP, info):
        hook.fn(info)
      batch = state_lib.global_batch(local, self.setup.mesh, with_pair_mask=False,
                                     reference_table=self.setup.train_ref)
      self.pairs_read += int(np.sum(local["pair_indices"] >= 0))
      self.state, metrics = self.compiled.train(self.state, self.ref_state, batch)
      signals.unsaved = True  # from now on a signal saves first (at the next step boundary)
      for hook in self._due(AFTER_STEP, info):
        hook.fn(info)
      info.tokens, info.pairs, info.flops = self.setup.step_flops(local, self.c)
      self.steps_done += 1
      if not self.settle():  # the previous step's metrics, fetched only now
        return EXIT_DIVERGED
      self._pending = (info, metrics)
      # Multi-host hazard: every process must take the same decisions at the same step (eval and
      # save are collectives): they depend only on the step number and on the preemption sync
      # point, where every process gets the same answer at the same step.
      info.preempted = signals.reached(info.step)
      due = self._due(BOUNDARY, info)
      if (due or info.preempted) and not self.settle():  # this step's bookkeeping first: counters saved up to date
        return EXIT_DIVERGED
      for hook in due:
        hook.fn(info)
      if info.preempted:
        code = signals.exit_code()
        logging.warning("%s: saved step %d; exiting with code %d", "interrupted (Ctrl-C)"
                        if code == signals_lib.EXIT_INTERRUPTED else "preempted (SIGTERM)", info.step, code)
        return code
    return EXIT_OK if self.settle() else EXIT_DIVERGED

  def sync_reference(self, info: StepInfo) -> None:
    """TR-DPO: mixes the policy into the reference (a hook after the step: queued, nothing read)."""
    del info
    self.ref_state = self.compiled.sync_reference(self.ref_state, self.state)

  def settle(self) -> bool:
    """Fetches the pending step's metrics, counts non-finite steps, runs the METRICS hooks; False if diverged."""
    if self._pending is None:
      return True
    (info, metrics), self._pending = self._pending, None
    info.metrics = jax.device_get(metrics)
    self.counters["train/nonfinite_steps"] += int(info.metrics["nonfinite"])
    self.nonfinite_run = self.nonfinite_run + 1 if info.metrics["nonfinite"] else 0
    for hook in self._due(METRICS, info):
      hook.fn(info)
    if self.nonfinite_run >= self.c.train.max_nonfinite_steps:
      logging.error("stopping: %d non-finite steps in a row (loss or gradients NaN/inf); the last good "
                    "state is checkpointed", self.nonfinite_run)
      return False
    return True


def run(c: ml_collections.ConfigDict, workdir: str) -> int:
  """Trains as configured; returns the exit code."""
  is_main = jax.process_index() == 0
  if is_main:  # what a killed export left (the workdir lease rules out a live one)
    for name in clean_stale_exports(storage.join(workdir, "export")):
      logging.warning("removed the stale export folder %s (left by an interrupted export)", storage.join(workdir, name))
  setup = setup_lib.build(c, workdir)
  checkpoints = setup_lib.resume(c, workdir, setup)
  loader = setup.loader(c, start_step=checkpoints.start_step, num_steps=c.train.steps)
  if c.data.packing:
    logging.info("packing: %d pairs in %d rows of %d tokens (%.1f%% real tokens)", len(setup.train_ds),
                 loader.plan.num_rows, loader.plan.row_length, 100 * loader.plan.fill)
  elif getattr(loader, "row_budget", None):  # data.pack_batches: one row count for every step (one compile)
    logging.info("pack_batches: %d rows of %d tokens per step (the most this run's steps need)", loader.row_budget,
                 c.data.pack_length or 2 * c.data.max_length)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  peak, peak_source = metrics_lib.device_peak_flops()
  logging.info("MFU peak: %.3g FLOP/s per device (%s), %d devices", peak, peak_source, jax.device_count())

  # --- The loop and its hooks. Multi-host hazard: eval and save are collectives, so what decides
  # them (the step, the preemption sync point) is the same on every process. ----------------------
  loop = Loop(c, setup, checkpoints.start_step)
  save = lambda step: checkpoints.save(step, loop.state, loop.ref_state, loop.counters)
  if setup.dpo_config.sync_ref_model:  # TR-DPO, after the step (as TRL's callback)
    loop.add_hook(loop.sync_reference, phase=AFTER_STEP, every=setup.dpo_config.ref_model_sync_steps)
  if c.train.profile_steps:
    profiler = Profiler(workdir, *(int(x) for x in c.train.profile_steps.split(",")))
    loop.add_hook(profiler.start, phase=BEFORE_STEP, when=lambda info: info.step == profiler.first)
    loop.add_hook(profiler.stop, phase=METRICS, when=lambda info: info.step == profiler.last)
  logger = metrics_lib.TrainLogger(writer, setup.schedule, c.train.steps, peak)
  loop.add_hook(lambda info: logger.count(info.tokens, info.flops), phase=METRICS, every=1)
  loop.add_hook(lambda info: logger.write(info.step, info.metrics, info.tokens, info.pairs, loop.counters,
                                          loop.steps_done),
                phase=METRICS, every=c.train.log_every,
                when=lambda info: info.step == c.train.steps or loop.nonfinite_run > 0)
  loop.add_hook(lambda info: evaluate(loop, writer), every=c.train.eval_every, before_last=True)
  loop.add_hook(lambda info: save(info.step), every=c.checkpoint.save_every, before_last=True,
                when=lambda info: info.preempted)

  with signal_handlers() as signals:
    try:
      with setup.mesh:
        code = loop.run(loader, signals)
        # --- Outputs: on every way out, the last step is checkpointed (committed) --------------------
        if code == EXIT_OK:
          evaluate(loop, writer)
        if checkpoints.checkpointer.latest_step() != loop.step:
          save(loop.step)
        checkpoints.checkpointer.wait()
        signals.unsaved = False  # all steps are committed: a signal from here on exits at once
        if code == EXIT_OK and signals.requested:  # a signal during the final eval or save
          code = signals.exit_code()
          logging.warning("stopped by a signal: saved step %d; exiting with code %d", loop.step, code)
        if code == EXIT_OK and c.export.hf:
          export(c, loop, workdir, checkpoints.checkpointer.directory)
        logging.info("process %d of %d read %d training pairs", jax.process_index(), jax.process_count(),
                     loop.pairs_read)
    finally:
      try:
        checkpoints.checkpointer.close()
      finally:
        writer.close()
  return code


@contextlib.contextmanager
def signal_handlers() -> Iterator[signals_lib.Signals]:
  """SIGTERM / SIGINT: main installed the handlers at its first line; a library call gets them here."""
  signals = signals_lib.active()
  if signals is not None:
    yield signals
    return
  signals = signals_lib.Signals()
  try:
    signals.install()
  except ValueError:  # not the main thread: no handlers
    yield signals
    return
  try:
    yield signals
  finally:
    signals.uninstall()


def evaluate(loop: Loop, writer: metrics_lib.MetricsWriter) -> None:
  """One ``eval/`` row over the whole eval set, at ``loop.step`` (a collective: every process calls it)."""
  c, setup, dpo_cfg, eval_ds = loop.c, loop.setup, loop.setup.dpo_config, loop.setup.eval_ds
  if eval_ds is None:
    return
  # Every eval batch is normalised by the counts of the whole eval set (pairs, scored tokens of
  # each side), so each batch's metrics are its share of the set's and the shares add up; the
  # filler pairs of a last, partial batch count nowhere (pair_mask).
  normalizers = None if dpo_cfg.unpaired else eval_normalizers(eval_ds)
  sums: dict[str, float] = {}
  if dpo_cfg.unpaired:  # KTO: each batch's means, weighted by its share of the examples
    batches = unpaired_eval_batches(eval_ds, c.train.eval_batch_size, jax.process_index(), jax.process_count(),
                                    c.data.pad_multiple, c.data.max_length, "kto" in dpo_cfg.loss_types,
                                    reference=setup.eval_ref)
    normalizers = losses.Normalizers(*(np.float32(1.0),) * 3)  # not read by the unpaired losses
  else:
    batches = eval_batches(eval_ds, c.train.eval_batch_size, jax.process_index(), jax.process_count(),
                           c.data.pad_multiple, c.data.max_length)
  for local in batches:
    share = local["global_num_pairs"] / len(eval_ds) if dpo_cfg.unpaired else 1.0
    batch = state_lib.global_batch(local, setup.mesh, with_pair_mask=True, reference_table=setup.eval_ref)
    m = jax.device_get(loop.compiled.eval(loop.state, loop.ref_state, batch, normalizers))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * (share if k != "tokens" else 1.0)
  row = {"step": loop.step, "time": time.time()}
  row.update({f"eval/{k}": v for k, v in sums.items()})
  writer.write(row)
  if jax.process_index() == 0:
    logging.info("eval at step %d: loss %.4f accuracy %.3f margin %.4f", loop.step, row["eval/loss"],
                 row.get("eval/rewards/accuracies", float("nan")), row["eval/rewards/margins"])


def eval_normalizers(dataset: PreferenceDataset) -> losses.Normalizers:
  """The denominators of the eval metrics: the set's pairs and scored chosen / rejected tokens.

  Every process holds the whole eval set, so each computes the same numbers without a collective.
  """
  scored = dataset.scored_lengths.sum(axis=0)
  # ORPO's NLL: every token of prompt + chosen but the first (each is predicted from the one before).
  sequence = np.maximum(dataset.offsets[:, 2] - dataset.offsets[:, 0] - 1, 0).sum()
  return losses.Normalizers(*(np.float32(x) for x in (len(dataset), scored[0], scored[1], sequence)))


def export(c: ml_collections.ConfigDict, loop: Loop, workdir: str, checkpoint_dir: str) -> None:
  """The policy at ``loop.step`` in Hugging Face format (or a PEFT adapter) under ``WORKDIR/export``."""
  spec, step = loop.setup.spec, loop.step
  model = nnx.merge(spec.graphdef, loop.state)[0]
  out_dir = storage.join(workdir, "export")
  info = {"step": step, "checkpoint": f"{checkpoint_dir}/{step}"}
  if spec.lora is not None and c.export.format == "peft":
    lora_lib.export_peft(model, out_dir, dtype=c.export.dtype, base_model_name_or_path=c.model.hf_checkpoint,
                         info=info)
  else:
    if spec.lora is not None:
      model = lora_lib.merged_model(model)
    export_hf(model, out_dir, dtype=c.export.dtype, tokenizer_dir=_tokenizer_dir(c), info=info)
  logging.info("exported the policy at step %d to %s", step, out_dir)


def _tokenizer_dir(c) -> str | None:
  spec = c.data.tokenizer or c.model.hf_checkpoint
  if not spec or spec == "byte":
    return None
  return spec if storage.isdir(spec) else storage.dirname(spec)


class Profiler:
  """A JAX profiler trace of the steps ``first..last`` (``train.profile_steps``) in the workdir's ``profile/``.

  On a ``gs://`` workdir the trace is written to a local folder and uploaded when it stops.
  """

  def __init__(self, workdir: str, first: int, last: int):
    self.workdir, self.first, self.last = workdir, first, last
    self._local: str | None = None

  def start(self, info: StepInfo | None = None) -> None:
    del info
    if not storage.is_remote(self.workdir):
      self._local = os.path.join(self.workdir, "profile")
    else:
      import tempfile

      self._local = tempfile.mkdtemp(prefix="artifex-profile-")
    jax.profiler.start_trace(self._local)

  def stop(self, info: StepInfo | None = None) -> None:
    del info
    if self._local is None:  # resumed past the first profiled step: nothing was traced
      return
    jax.profiler.stop_trace()
    if storage.is_remote(self.workdir):
      for root, _, names in os.walk(self._local):
        for name in names:
          src = os.path.join(root, name)
          storage.copy(src, storage.join(self.workdir, "profile", *os.path.relpath(src, self._local).split(os.sep)))
    self._local = None
