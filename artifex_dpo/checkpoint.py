"""Orbax checkpoints: asynchronous saves, automatic resume, restore onto any mesh.

A checkpoint ``checkpoints/<step>/`` holds ``state`` (policy params, optimizer state, RNG state:
everything in the trainer's NNX state) and ``meta`` (JSON: the step, i.e. the data position,
the resolved config, fingerprints of the data). Orbax writes into a temporary folder and renames
it when complete, so a checkpoint is complete or invisible; a restart loads the newest complete
one. The reference model is never saved: it is rebuilt from its source. With LoRA the caller saves
only the adapters and their optimizer state (``models.lora.checkpointed``): the frozen base is
rebuilt from its source too.

Multi-host: every process calls ``save`` with the same step (the decision depends only on the
step and on values that every process agrees on) because saving is a collective.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(ValueError):
  """A checkpoint that cannot be used here (names the path and what differs)."""


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
      return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - orbax raises many kinds; say where and what
      raise CheckpointError(f"{self.directory}/{step}: cannot read the checkpoint's metadata ({e})") from None

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
      raise CheckpointError(f"{path}: not a checkpoint of this program ({e})") from None
    _check_structure(path, saved, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state

  def wait(self) -> None:
    """Blocks until a background save has finished (and is committed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


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
