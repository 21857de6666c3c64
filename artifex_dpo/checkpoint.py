"""Orbax checkpoints: asynchronous saves, automatic resume, restore onto any mesh.

A checkpoint ``checkpoints/<step>/`` holds ``state`` (policy params, optimizer state, RNG state:
everything in the trainer's NNX state) and ``meta`` (JSON: the step, i.e. the data position,
the resolved config, fingerprints of the data). Orbax writes into a temporary folder and renames
it when complete, so a checkpoint is complete or invisible; a restart loads the newest one that
restores completely (:meth:`Checkpointer.restore_latest`): a damaged one (a file truncated or
deleted, its metadata gone, an empty step folder) is renamed to ``<step>.damaged-<UTC time>``
(never deleted) with one warning line, and the one before it is used. The reference model is never
saved: it is rebuilt from its source.

Multi-host: every process calls ``save`` with the same step (the decision depends only on the
step and on values that every process agrees on) because saving is a collective.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils


class CheckpointError(ValueError):
  """A checkpoint that cannot be used here (names the path and what differs)."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint whose files are incomplete or unreadable (as opposed to one of another model)."""


class Checkpointer:
  """A thin layer over ``ocp.CheckpointManager`` for the trainer's NNX state."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        ),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: nnx.State, meta: dict[str, Any]) -> None:
    """Starts saving (in the background when async); all processes must call it."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )

  def read_meta(self, step: int) -> dict[str, Any]:
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; say where and what
      raise DamagedCheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's metadata "
                                   f"({_first_line(e)})") from None
    if not isinstance(meta, dict) or "step" not in meta:
      raise DamagedCheckpointError(f"{self.directory}/{step}: the checkpoint's metadata has no step")
    return meta

  def restore_latest(self, abstract_state: nnx.State, shardings: Any,
                     check_meta: Callable[[dict[str, Any], str], None] | None = None
                     ) -> tuple[int, nnx.State, dict[str, Any]] | None:
    """Restores the newest checkpoint that restores completely; None when there is none.

    Damaged checkpoints newer than it are moved aside (renamed ``<step>.damaged-<UTC time>``, never
    deleted), each with one warning line naming it and why. When checkpoints exist but none
    restores, nothing is moved and a CheckpointError names the folder (the run must not silently
    start over). A checkpoint of another model or config (``check_meta`` raising, a shape
    mismatch) is not damage: that error propagates and nothing is moved.

    Multi-host: every process tries every step and all agree (an all-gather of the outcome) before
    process 0 renames anything, so all processes resume from the same step.

    Args:
      abstract_state: the expected state (shapes/dtypes).
      shardings: NamedShardings with the structure of ``abstract_state``.
      check_meta: ``(meta, path)`` -> None, raising when the checkpoint must not be resumed.

    Returns:
      ``(step, state, meta)``, or None when the folder holds no checkpoint.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    damaged: list[tuple[int, str]] = []
    for step in steps:
      path = f"{self.directory}/{step}"
      reason = None
      try:
        if "://" not in path and os.path.isdir(path) and not os.listdir(path):
          raise DamagedCheckpointError(f"{path}: the folder is empty")
        meta = self.read_meta(step)
        if check_meta is not None:
          check_meta(meta, path)
        state = self.restore(step, abstract_state, shardings)
      except DamagedCheckpointError as e:
        reason = str(e)[len(path) + 2:] if str(e).startswith(path) else str(e)
      if not _all_processes_agree(reason is None):
        damaged.append((step, reason or "damaged on another process"))
        continue
      for bad_step, why in damaged:
        self._move_aside(bad_step, why)
      if damaged:
        self._manager.reload()
      return step, state, meta
    if damaged:
      details = "; ".join(f"{s}: {why}" for s, why in damaged)
      raise CheckpointError(f"{self.directory}: no checkpoint restores ({details})")
    return None

  def _move_aside(self, step: int, why: str) -> None:
    src = epath.Path(self.directory) / str(step)
    dst = epath.Path(self.directory) / f"{step}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jax.process_index() == 0:
      src.rename(dst)
      logging.warning("checkpoint %s is damaged (%s): moved aside to %s; resuming from an earlier one", src,
                      why, dst.name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"artifex_dpo_move_aside_{step}")

  def restore(self, step: int, abstract_state: nnx.State, shardings: Any) -> nnx.State:
    """Restores ``state`` onto ``shardings`` (any mesh: Orbax reshards on read).

    Args:
      step: the checkpoint step.
      abstract_state: the expected state (shapes/dtypes); a mismatch is a CheckpointError.
      shardings: NamedShardings with the structure of ``abstract_state``.
    """
    pure_abstract = nnx.to_pure_dict(abstract_state)
    pure_shardings = nnx.to_pure_dict(shardings)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure_abstract, pure_shardings)
    path = f"{self.directory}/{step}"
    try:
      saved = self._manager.item_metadata(step)["state"]
      saved = getattr(saved, "tree", saved)
    except Exception as e:  # noqa: BLE001
      raise DamagedCheckpointError(f"{path}: cannot read the state's metadata ({_first_line(e)})") from None
    if not isinstance(saved, dict) or not saved:
      # Orbax reads a missing state/_METADATA as an empty tree: damage, not another model.
      raise DamagedCheckpointError(f"{path}: the state's metadata (state/_METADATA) is missing or empty")
    _check_structure(path, saved, target)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # noqa: BLE001 - tensorstore / orbax raise many kinds on missing or short files
      raise DamagedCheckpointError(f"{path}: cannot read the state's arrays ({_first_line(e)})") from None
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state

  def wait(self) -> None:
    """Blocks until a background save has finished (and is committed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(e: BaseException) -> str:
  """The root cause's first line (tensorstore's wrapped errors say what is wrong only at the root)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _all_processes_agree(ok: bool) -> bool:
  """True when ``ok`` holds on every process (a collective: every process calls it)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _check_structure(path: str, saved: Any, target: Any) -> None:
  """Refuses a checkpoint whose arrays differ from the model's in name, shape or dtype."""
  flat_saved = dict(_flatten(saved))
  flat_target = dict(_flatten(target))
  missing = sorted(set(flat_target) - set(flat_saved))
  extra = sorted(set(flat_saved) - set(flat_target))
  if missing or extra:
    raise CheckpointError(f"{path}: state differs from the model: missing {missing[:3]}, unexpected {extra[:3]}")
  for key, t in flat_target.items():
    s = flat_saved[key]
    shape = tuple(getattr(s, "shape", ()) or ())
    if shape != tuple(t.shape):
      raise CheckpointError(f"{path}: {key} has shape {shape} in the checkpoint, {tuple(t.shape)} in the model")


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
  if isinstance(tree, dict):
    out = []
    for k, v in tree.items():
      out.extend(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return [(prefix, tree)]
