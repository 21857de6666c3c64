"""The one table of TPU chip facts: memory, speed, and how GKE / XManager name and schedule them.

Used by ``metrics`` (MFU), ``aot`` (fit and roofline) and ``launch/`` (slice names, node labels, hosts).
This module imports nothing beyond the standard library, so the launchers run without JAX.

Slice names follow Google Cloud: v4 / v5p names count TensorCores (2 per chip: v5p-32 = 16 chips,
topology 2x2x4), v5e / v6e names count chips (v5e-16 = 16 chips, 4x4).
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation (Google Cloud TPU docs).

  Attributes:
    name: short name used in slice names (``v5p``).
    hbm_bytes: high-bandwidth memory per chip.
    peak_flops: published dense bf16 peak FLOP/s per chip.
    hbm_bandwidth: HBM bandwidth, bytes/s per chip.
    device_kinds: JAX ``device_kind`` strings of this chip (lower case, matched as substrings).
    gke_accelerator: value of the ``cloud.google.com/gke-tpu-accelerator`` node label.
    xm_resource: ``xm.ResourceType`` name (``xm.JobRequirements(tpu_v5p="2x2x4")``).
    cores_per_chip: TensorCores per chip: the unit a slice name counts (v5p-32 = 32 cores).
    dims: topology dimensions (2: ``4x4``, 3: ``2x2x4``).
    chips_per_host: chips of one host (VM) of a multi-host slice.
    single_host_chips: the largest slice that is a single host.
  """

  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  device_kinds: tuple[str, ...]
  gke_accelerator: str
  xm_resource: str
  cores_per_chip: int
  dims: int
  chips_per_host: int
  single_host_chips: int


CHIPS: dict[str, TpuChip] = {
    "v4": TpuChip("v4", 32 * GIB, 275e12, 1228e9, ("tpu v4",), "tpu-v4-podslice", "tpu_v4", 2, 3, 4, 4),
    "v5e": TpuChip("v5e", 16 * GIB, 197e12, 819e9, ("tpu v5 lite", "tpu v5e"), "tpu-v5-lite-podslice",
                   "tpu_v5e", 1, 2, 4, 8),
    "v5p": TpuChip("v5p", 95 * GIB, 459e12, 2765e9, ("tpu v5p", "tpu v5"), "tpu-v5p-slice", "tpu_v5p", 2, 3, 4, 4),
    "v6e": TpuChip("v6e", 32 * GIB, 918e12, 1640e9, ("tpu v6 lite", "tpu v6e"), "tpu-v6e-slice", "tpu_v6e",
                   1, 2, 4, 8),
}
# Other spellings of generation names (topology names, older docs).
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# Published dense bf16 peak FLOP/s of GPUs, by device_kind substring (for MFU only).
GPU_PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}


def canonical_name(name: str) -> str:
  """``v5litepod`` -> ``v5e``; names that are no alias come back lower-cased."""
  name = name.lower()
  return ALIASES.get(name, name)


def peak_flops_of_device_kind(kind: str) -> float | None:
  """Published bf16 peak FLOP/s of a JAX ``device_kind``, or None when unknown (e.g. a CPU).

  The most specific match wins ("TPU v5 lite" is a v5e, not a v5p).
  """
  kind = kind.lower()
  candidates = [(len(k), chip.peak_flops) for chip in CHIPS.values() for k in chip.device_kinds if k in kind]
  candidates += [(len(k), peak) for k, peak in GPU_PEAK_FLOPS.items() if k in kind]
  return max(candidates)[1] if candidates else None
