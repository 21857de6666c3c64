"""The device mesh from config and the map from the model's logical axes to mesh axes.

Mesh axes are ``("data", "fsdp", "tensor")``. Within a slice the sizes come from ``mesh.ici``;
across slices (multi-slice over DCN) from ``mesh.dcn``, DCN axes outermost. Parameters carry
logical axis names (``nnx.Param(..., logical_axes=(...))``); :data:`LOGICAL_RULES` maps them to
mesh axes: FSDP shards the embedding dimension over ``fsdp``, tensor parallelism shards heads,
MLP and vocabulary over ``tensor``; the batch goes over ``data`` and ``fsdp``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None: replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


class MeshError(ValueError):
  """The mesh sizes do not match the devices (a config error: exit code 2)."""


def _fill(sizes: Mapping[str, int], total: int, level: str) -> tuple[int, ...]:
  values = [int(sizes[a]) for a in MESH_AXES]
  fills = [i for i, v in enumerate(values) if v == -1]
  if len(fills) > 1:
    raise MeshError(f"config key mesh.{level}: at most one axis may be -1, got {dict(sizes)}")
  known = math.prod(v for v in values if v != -1)
  if fills:
    if total % known:
      raise MeshError(f"config key mesh.{level}: {total} devices are not divisible by {known} ({dict(sizes)})")
    values[fills[0]] = total // known
  if math.prod(values) != total:
    raise MeshError(f"config key mesh.{level}: axis sizes {dict(zip(MESH_AXES, values))} multiply to "
                    f"{math.prod(values)}, but there are {total} {'devices per slice' if level == 'ici' else 'slices'}")
  return tuple(values)


def mesh_shape(ici: Mapping[str, int], dcn: Mapping[str, int], num_devices: int,
               num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Resolves -1 entries: ``(ici_shape, dcn_shape)`` over :data:`MESH_AXES`."""
  if num_devices % num_slices:
    raise MeshError(f"{num_devices} devices do not split into {num_slices} slices")
  return _fill(ici, num_devices // num_slices, "ici"), _fill(dcn, num_slices, "dcn")


def num_slices_of(devices: Sequence[Any]) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config: Mapping[str, Mapping[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh; DCN axes are outermost on multi-slice."""
  from jax.experimental import mesh_utils

  devices = list(jax.devices() if devices is None else devices)
  slices = num_slices_of(devices)
  ici, dcn = mesh_shape(mesh_config["ici"], mesh_config["dcn"], len(devices), slices)
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(ici)  # CPU / unknown topologies: plain order
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Any] = LOGICAL_RULES) -> P:
  """The PartitionSpec of an array with these logical axes on ``mesh``.

  A dimension that the mesh axis does not divide (e.g. 8 KV heads over tensor=16) stays
  replicated, and a mesh axis is used at most once per array.
  """
  if not logical_axes:
    return P()
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape, strict=True):
    target = rules.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an (abstract) NNX state: from each Variable's ``logical_axes``."""

  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      axes = x.get_metadata().get("logical_axes")
      spec = logical_to_spec(axes, value.shape, mesh) if axes and len(axes) == len(value.shape) else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over (data, fsdp), everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_parallelism(mesh: Mesh) -> int:
  return int(mesh.shape["data"] * mesh.shape["fsdp"])
