"""Metrics outputs: ``metrics.jsonl``, TensorBoard, the progress line, throughput and MFU.

Only process 0 writes (every process computes the same global metrics). ``metrics.jsonl`` is
appended to, so a resumed run continues the file; for a step that appears twice the later row
counts. Everything goes through :mod:`artifex_dpo.storage`: on a ``gs://`` workdir, which cannot
append, each row is uploaded as a small part object and composed onto ``metrics.jsonl``
server-side at once (nothing is rewritten, nothing logged is lost to a preemption). TensorBoard
event files on a bucket are written the same way (a writer factory registered with
tensorboardX for ``gs://``): each flush composes the new records onto the event file.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from artifex_dpo import storage, tpu_chips

# The seed trainer's names of metrics that also have TRL's names (``dpo_loss`` = ``loss``,
# ``reward_accuracy`` = ``rewards/accuracies``, ``margin`` = ``rewards/margins``, the log-ratios =
# ``rewards/*`` / beta). The library's DPOTrainer returns them for code written for the seed; the
# service's outputs (metrics.jsonl, TensorBoard) carry the TRL names only.
SEED_METRIC_NAMES = frozenset({"dpo_loss", "reward_accuracy", "chosen_log_ratios", "rejected_log_ratios", "margin"})


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
  """The FLOP/s of a square float32 matmul on the default device (best of ``repeats``)."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * size**3 / best


def device_peak_flops() -> tuple[float, str]:
  """``(peak FLOP/s per device, where it came from)``: published bf16 peak, or measured on CPU."""
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  peak = tpu_chips.peak_flops_of_device_kind(kind)
  if peak is not None:
    return peak, f"published bf16 peak of {kind}"
  return measure_matmul_peak(), f"float32 matmul measured on {kind or device.platform}"


def format_eta(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def _drop_torn_tail(path: str) -> None:
  """Cuts off a last row without its newline (a kill or a full disk mid-write) that the next row would join."""
  try:
    with open(path, "rb+") as f:
      size = f.seek(0, os.SEEK_END)
      if not size:
        return
      f.seek(max(0, size - (1 << 20)))
      tail = f.read()
      if not tail.endswith(b"\n"):
        f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
  except FileNotFoundError:
    pass


class MetricsWriter:
  """Writes metric rows on process 0; a no-op on other processes."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._path = storage.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and not storage.is_remote(workdir):  # a bucket object is never torn (one upload)
      _drop_torn_tail(self._path)
    if enabled:
      from tensorboardX import SummaryWriter

      _register_tensorboard_storage()
      self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))

  def write(self, row: dict[str, Any]) -> None:
    """Appends ``row`` to metrics.jsonl and TensorBoard (the seed's duplicate names, ``eval/`` ones too, left out)."""
    if not self.enabled:
      return
    row = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v) for k, v in row.items()
           if k.removeprefix("eval/") not in SEED_METRIC_NAMES}
    line = json.dumps(row, sort_keys=True) + "\n"
    storage.append(self._path, line.encode("utf-8"))
    step = int(row["step"])
    for k, v in row.items():
      if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def progress(self, step: int, total: int, row: dict[str, Any], eta_s: float) -> None:
    if not self.enabled:
      return
    logging.info(
        "step %d/%d  loss %.4f  acc %.3f  margin %.4f  %.0f tok/s  mfu %.1f%%  eta %s",
        step, total, row["loss"], row.get("rewards/accuracies", float("nan")), row["rewards/margins"],
        row.get("tokens_per_s", 0.0), 100 * row.get("mfu", 0.0), format_eta(eta_s))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class TrainLogger:
  """The training rows of metrics.jsonl and the progress line.

  A row holds the logged step's own metrics and the throughput (tokens/s, seconds per step, MFU)
  over the steps since the previous row: :meth:`count` is called for every step, :meth:`write`
  for the logged ones.
  """

  def __init__(self, writer: MetricsWriter, schedule: Any, total_steps: int, peak_flops: float):
    self._writer, self._schedule, self._total_steps = writer, schedule, total_steps
    self._peak_flops = peak_flops * jax.device_count()
    self._start = self._last_time = time.time()
    self._tokens, self._flops, self._steps = 0.0, 0.0, 0

  def count(self, tokens: float, flops: float) -> None:
    """Adds a finished step's tokens and model FLOPs to the interval's."""
    self._tokens += tokens
    self._flops += flops
    self._steps += 1

  def write(self, step: int, metrics: dict[str, Any], tokens: float, pairs: float, counters: dict[str, int],
            steps_done: int) -> None:
    """Writes step ``step``'s row (``metrics``: its host values) and starts a new interval.

    ``steps_done``: the steps this process has run since it started (for the ETA).
    """
    now = time.time()
    elapsed = max(now - self._last_time, 1e-9)
    row = {"step": step, "time": now, "learning_rate": float(self._schedule(step - 1)),
           "tokens_per_s": self._tokens / elapsed, "step_s": elapsed / self._steps,
           "mfu": self._flops / elapsed / self._peak_flops}
    row.update({k: float(v) for k, v in metrics.items()})
    row["tokens"], row["pairs"] = tokens, pairs
    row.update(counters)
    self._writer.write(row)
    eta = (self._total_steps - step) * (now - self._start) / max(steps_done, 1)
    self._writer.progress(step, self._total_steps, row, eta)
    self._last_time, self._tokens, self._flops, self._steps = now, 0.0, 0.0, 0


class _AppendingEventFile:
  """A tensorboardX record sink on a bucket: buffered records, composed onto the object at flush."""

  def __init__(self, path: str):
    self.path = path
    self._buffer = bytearray()

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    if self._buffer:
      storage.append(self.path, bytes(self._buffer))
      self._buffer.clear()

  def close(self) -> None:
    self.flush()


class _StorageWriterFactory:
  def open(self, path: str) -> _AppendingEventFile:
    return _AppendingEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # objects need no folders


def _register_tensorboard_storage() -> None:
  """tensorboardX's own gs:// writer re-uploads the whole event file at each flush through
  google-cloud-storage's client; ours appends through the storage layer."""
  from tensorboardX import record_writer

  for scheme in ("gs", "gcs"):
    record_writer.register_writer_factory(scheme, _StorageWriterFactory())
