"""Export of a :class:`LlamaModel` as a Hugging Face folder (safetensors shards + index + configs).

Who writes what (multi-host). Every process computes the same plan from the tensors' shapes and
shardings alone (:func:`plan_export`; no communication): a tensor's *holders* are the processes
whose addressable shards cover it whole (``sharding.devices_indices_map``). Tensors are taken in
file order (embedding, layer by layer, final norm, head); each goes to the least-loaded (in bytes)
of its holders, or, when no process holds it whole, to the least-loaded process. Each process
packs its tensors, in order, into files of at most ``max_shard_bytes``; files are numbered process
by process. A writer copies a tensor it holds from its own shards (no communication); a tensor it
does not hold is fetched for it alone: every process takes part in one collective that replicates
that one tensor (one layer of a stacked parameter) on the devices, and only the writer copies it to
host memory. Files are processed round-robin over the processes, in the same order everywhere, so
the collectives match up. Process 0 then writes the index, the configs and, last, the marker.

Memory bound. Files are streamed: the safetensors header is computed from the plan and each tensor
is written as soon as it is on the host, so a writer holds at most one tensor at a time (in our
layout, in the HF layout and in the export dtype: at most three copies of the largest tensor, e.g.
Llama-3-70B's 128256 x 8192 head, 3.9 GiB in float32), whatever the file or model size (measured by
``tests/test_hf_export.py``: a 1.3 MB one-file export peaks at 0.21 MB of host allocations, under
4x its largest tensor; the former whole-shard writer peaked at 1.42 MB); a process holds no
host copy of a tensor it does not write. On the devices, a fetched tensor is replicated on every
device for the time of its copy (as a whole-model gather would, one tensor at a time).

Atomicity. Everything goes to a temporary sibling folder named after the step (``info["step"]``),
moved into place by process 0 when complete (:func:`replace_dir`); ``artifex_dpo_export.json`` (the
step, the files) is written last, so an export holding it is complete. The folder must be shared by
all processes (a bucket, or a shared file system).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from artifex_dpo import storage
from artifex_dpo.models.config import ModelConfig
from artifex_dpo.models.hf_config import config_to_hf, generation_config
from artifex_dpo.models.hf_layout import (
    EXPORT_INFO_FILE, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, Layout, norm_index, param_specs)
from artifex_dpo.models.llama import LlamaModel

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
EXPORT_DTYPES = tuple(_NP_DTYPES)
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


@dataclasses.dataclass(frozen=True)
class ExportTensor:
  """One HF tensor of the export.

  Attributes:
    name: HF tensor name.
    shape: HF shape.
    nbytes: bytes in the export dtype.
    holders: processes whose addressable shards hold it whole.
    param: our parameter path.
    layer: the layer index in a stacked parameter, else None.
    layout: how it converts to the HF layout.
  """

  name: str
  shape: tuple[int, ...]
  nbytes: int
  holders: frozenset[int]
  param: tuple[str, ...]
  layer: int | None
  layout: Layout


@dataclasses.dataclass(frozen=True)
class ExportFile:
  """One safetensors file of the export: its name, the process writing it, its tensors (indices)."""

  name: str
  writer: int
  tensors: tuple[int, ...]


def holders(arr: Any, layer: int | None, num_processes: int) -> frozenset[int]:
  """The processes whose addressable shards cover ``arr`` (``arr[layer]`` if given) whole.

  Computed from the global sharding, identically on every process. A fully addressable array
  (each process has its own copy) is held by every process.
  """
  if not isinstance(arr, jax.Array) or arr.is_fully_addressable:
    return frozenset(range(num_processes))
  shape = tuple(arr.shape)
  blocks: dict[int, set[tuple[tuple[int, int], ...]]] = {}
  for device, index in arr.sharding.devices_indices_map(shape).items():
    idx = norm_index(index, shape)
    if layer is not None:
      if not idx[0].start <= layer < idx[0].stop:
        continue
      idx = idx[1:]
    blocks.setdefault(device.process_index, set()).add(tuple((s.start, s.stop) for s in idx))
  whole = int(np.prod(shape[1:] if layer is not None else shape))
  # A sharding's blocks are equal or disjoint: distinct blocks adding up to the whole cover it.
  return frozenset(p for p, bs in blocks.items() if sum(int(np.prod([b - a for a, b in k])) for k in bs) == whole)


def export_tensors(model: LlamaModel, itemsize: int, num_processes: int) -> tuple[list[ExportTensor], dict]:
  """Every HF tensor of ``model`` in file order (embedding, layer by layer, the rest), and our params."""
  specs = param_specs(model.config)
  params = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  top, per_layer = [], []
  for p, spec in specs.items():
    arr = params[p]
    if spec.stacked:
      per_layer.append((p, spec, arr))
    else:
      shape = spec.layout.hf_shape(tuple(arr.shape))
      top.append(ExportTensor(spec.hf_name, shape, int(np.prod(shape)) * itemsize,
                              holders(arr, None, num_processes), p, None, spec.layout))
  out = [t for t in top if t.param == ("embed",)]
  for i in range(model.config.num_layers):
    for p, spec, arr in per_layer:
      shape = spec.layout.hf_shape(tuple(arr.shape[1:]))
      out.append(ExportTensor(spec.hf_name.format(i=i), shape, int(np.prod(shape)) * itemsize,
                              holders(arr, i, num_processes), p, i, spec.layout))
  out.extend(t for t in top if t.param != ("embed",))
  return out, params


def plan_shards(sizes: list[int], max_shard_bytes: int) -> list[list[int]]:
  """Greedy, order-preserving grouping of tensor indices into shards of at most
  ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own)."""
  shards: list[list[int]] = []
  current: list[int] = []
  total = 0
  for i, size in enumerate(sizes):
    if current and total + size > max_shard_bytes:
      shards.append(current)
      current, total = [], 0
    current.append(i)
    total += size
  if current:
    shards.append(current)
  return shards


def plan_export(tensors: list[ExportTensor], num_processes: int, max_shard_bytes: int) -> list[ExportFile]:
  """The files of the export, numbered process by process (see the module docstring for the rule).

  A function of the tensors' names, sizes and holders only: every process computes the same plan.
  """
  load = [0] * num_processes
  mine: list[list[int]] = [[] for _ in range(num_processes)]
  for i, t in enumerate(tensors):
    candidates = sorted(p for p in t.holders if p < num_processes) or range(num_processes)
    writer = min(candidates, key=lambda p: (load[p], p))
    load[writer] += t.nbytes
    mine[writer].append(i)
  groups = []
  for p in range(num_processes):
    for shard in plan_shards([tensors[i].nbytes for i in mine[p]], max_shard_bytes):
      groups.append((p, tuple(mine[p][j] for j in shard)))
  if len(groups) == 1:
    return [ExportFile(SINGLE_FILE, *groups[0])]
  n = len(groups)
  return [ExportFile(f"model-{k + 1:05d}-of-{n:05d}.safetensors", p, ts) for k, (p, ts) in enumerate(groups)]


def _round_robin(files: list[ExportFile], num_processes: int) -> list[ExportFile]:
  """The order every process walks the files in: the first file of each process, then the second..."""
  per = [[f for f in files if f.writer == p] for p in range(num_processes)]
  return [q[r] for r in range(max(map(len, per), default=0)) for q in per if r < len(q)]


# One compile per shard shape (``data[k]`` with a Python int would compile once per layer).
_take_layer = jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False))


def assemble_local(arr: Any, layer: int | None) -> np.ndarray:
  """``arr`` (or ``arr[layer]``) on the host from this process' addressable shards alone."""
  if not isinstance(arr, jax.Array):
    return np.asarray(arr if layer is None else arr[layer])
  shape = tuple(arr.shape[1:] if layer is not None else arr.shape)
  out = np.empty(shape, arr.dtype)
  seen, filled = set(), 0
  for shard in arr.addressable_shards:
    idx = norm_index(shard.index, tuple(arr.shape))
    data = shard.data
    if layer is not None:
      if not idx[0].start <= layer < idx[0].stop:
        continue
      data, idx = _take_layer(data, np.int32(layer - idx[0].start)), idx[1:]
    key = tuple((s.start, s.stop) for s in idx)
    if key in seen:
      continue  # a replica of a block already copied
    seen.add(key)
    out[idx] = np.asarray(data)
    filled += int(np.prod([s.stop - s.start for s in idx]))
  if filled != out.size:
    raise AssertionError(f"the addressable shards cover {filled} of {out.size} elements")
  return out


@functools.lru_cache(maxsize=None)
def _replicator(mesh: jax.sharding.Mesh, stacked: bool) -> Callable:
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if stacked:  # the layer index is an argument, not a constant: one compile per parameter, not per layer
    return jax.jit(lambda a, i: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), out_shardings=replicated)
  return jax.jit(lambda a: a, out_shardings=replicated)


def fetch(arr: jax.Array, layer: int | None, keep: bool) -> np.ndarray | None:
  """A collective: every process calls it for the same tensor; only where ``keep`` is the tensor
  copied to host memory (it is replicated on the devices meanwhile, then dropped)."""
  sharding = arr.sharding
  if not isinstance(sharding, jax.sharding.NamedSharding):  # no mesh to replicate over: gather to all
    from jax.experimental import multihost_utils  # noqa: PLC0415

    full = multihost_utils.process_allgather(arr if layer is None else arr[layer], tiled=True)
    return np.asarray(full) if keep else None
  fn = _replicator(sharding.mesh, layer is not None)
  rep = fn(arr) if layer is None else fn(arr, np.int32(layer))
  out = np.asarray(rep.addressable_shards[0].data) if keep else None
  del rep
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """``x`` on the host of every process (a collective for a multi-host array); for small tensors."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _host_copy(tensor: ExportTensor, how: str, produce: Callable[[], np.ndarray]) -> np.ndarray:
  """The one place a tensor's values reach host memory (``how``: "local" or "fetched")."""
  del tensor, how  # named for logs and tests (which wrap this function)
  return produce()


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], str, int]],
                      arrays: Iterator[np.ndarray]) -> None:
  """Streams a safetensors file: the header from ``entries`` (name, shape, dtype tag, bytes), then
  each array of ``arrays`` as it comes (one in memory at a time).

  Raises:
    ValueError: an array that does not match its entry.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, tag, nbytes in entries:
    header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
  with storage.open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for (name, shape, _, nbytes), x in zip(entries, arrays, strict=True):
      if tuple(x.shape) != tuple(shape) or x.nbytes != nbytes:
        raise ValueError(f"{path}: tensor {name} has shape {x.shape} ({x.nbytes} bytes), planned {shape}")
      f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)


def replace_dir(tmp: str, out: str) -> None:
  """Moves ``tmp`` to ``out`` (files 0644, the folder 0755), replacing (and on failure restoring) an existing ``out``.

  Locally one rename of the folder (atomic). On a bucket, where there are no folders to rename,
  the old export's marker goes first, then its objects are replaced, and ``tmp``'s marker is
  moved last: a reader that sees the marker sees a complete export.
  """
  if not storage.is_remote(tmp):  # readable by a serving container running as another user
    for name in os.listdir(tmp):
      os.chmod(os.path.join(tmp, name), 0o644)
    os.chmod(tmp, 0o755)
  if storage.is_remote(out):
    storage.remove(storage.join(out, EXPORT_INFO_FILE))
    storage.remove(out, recursive=True)
    names = [n for n in storage.listdir(tmp) if n != EXPORT_INFO_FILE]
    for name in names:
      storage.rename(storage.join(tmp, name), storage.join(out, name))
    storage.rename(storage.join(tmp, EXPORT_INFO_FILE), storage.join(out, EXPORT_INFO_FILE))
    storage.remove(tmp, recursive=True)
    return
  old = None
  if os.path.exists(out):
    old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
  try:
    os.replace(tmp, out)
  except BaseException:
    if old is not None:
      os.replace(old, out)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)



def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(name)


def _file_arrays(f: ExportFile, tensors: list[ExportTensor], params: dict, np_dtype: np.dtype,
                 me: int, stats: dict[str, int]) -> Iterator[np.ndarray]:
  """The arrays of file ``f`` in the HF layout and ``np_dtype`` (nothing where this process is not the
  writer). Every process must run it to the end: a tensor the writer does not hold is a collective."""
  keep = f.writer == me
  for i in f.tensors:
    t = tensors[i]
    arr = params[t.param]
    if f.writer in t.holders:
      if not keep:
        continue
      x = _host_copy(t, "local", lambda a=arr, t=t: assemble_local(a, t.layer))
      stats["local"] += t.nbytes
    else:
      # Multi-host hazard: a collective; every process reaches it in the same (plan) order.
      if not keep:
        fetch(arr, t.layer, keep=False)
        continue
      x = _host_copy(t, "fetched", lambda a=arr, t=t: fetch(a, t.layer, keep=True))
      stats["fetched"] += t.nbytes
    stats["largest"] = max(stats["largest"], x.nbytes)
    x = t.layout.to_hf(x)
    yield x.astype(np_dtype, copy=False)
    del x


def export_hf(
    model: LlamaModel,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 1024**3,
    tokenizer_dir: str | os.PathLike | None = None,
    info: dict[str, Any] | None = None,
) -> str:
  """Writes ``model`` as an HF folder that ``AutoModelForCausalLM.from_pretrained`` loads.

  Writes config.json, generation_config.json (copied from ``tokenizer_dir`` when it has one, else
  built from the token ids), safetensors weights (one ``model.safetensors`` if there is one file,
  else numbered files plus ``model.safetensors.index.json``), the tokenizer files found in
  ``tokenizer_dir`` and ``artifex_dpo_export.json`` (``info`` and the weight files; written last, it
  marks a complete export), into a temporary sibling folder that replaces ``out_dir`` at the end
  (see :func:`replace_dir`): a crash leaves no half-written export. ``out_dir`` may be local or
  ``gs://``. Every file gets mode 0644 locally. :func:`clean_stale_exports` removes what a killed
  local export leaves behind.

  Multi-host: every process must call this; see the module docstring for who writes which file and
  the memory bound (no host gathers the model).

  Args:
    model: the model to export.
    out_dir: destination folder (replaced if it exists).
    dtype: "float32" or "bfloat16" for the stored weights.
    max_shard_bytes: largest file size (a larger tensor gets a file of its own).
    tokenizer_dir: folder to copy tokenizer files from, or None.
    info: written into ``EXPORT_INFO_FILE`` (e.g. the training step the weights are from).

  Returns:
    ``out_dir`` (a local path or URI).
  """
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype must be one of {tuple(_NP_DTYPES)}, got {dtype!r}")
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  np_dtype = np.dtype(_NP_DTYPES[dtype])
  out = storage.local_or_uri(out_dir).rstrip("/")
  hf_config = config_to_hf(model.config, torch_dtype=dtype)
  me, procs = jax.process_index(), jax.process_count()
  tensors, params = export_tensors(model, np_dtype.itemsize, procs)
  files = plan_export(tensors, procs, max_shard_bytes)
  # The same temporary name on every process (they write into one folder); a leftover of a
  # crashed export of the same step is cleared first.
  step = (info or {}).get("step")
  tag = f"step{step}" if step is not None else "nostep"
  tmp = storage.join(storage.dirname(out), f".{storage.basename(out)}.tmp-{tag}")
  if me == 0:
    storage.remove(tmp, recursive=True)
    storage.makedirs(tmp)  # not tempfile.mkdtemp: its 0700 mode would stick to the export
  _sync("artifex_export_start")
  stats = {"local": 0, "fetched": 0, "largest": 0}
  try:
    for f in _round_robin(files, procs):
      arrays = _file_arrays(f, tensors, params, np_dtype, me, stats)
      if f.writer == me:
        entries = [(tensors[i].name, tensors[i].shape, _ST_DTYPES[dtype], tensors[i].nbytes) for i in f.tensors]
        write_safetensors(storage.join(tmp, f.name), entries, arrays)
      else:
        for _ in arrays:  # take part in the collectives of the tensors its writer fetches
          pass
    logging.info("export: process %d of %d wrote %s: %d bytes from its own shards, %d fetched; largest "
                 "tensor held %d bytes", me, procs, [f.name for f in files if f.writer == me], stats["local"],
                 stats["fetched"], stats["largest"])
    _sync("artifex_export_shards")
    if me == 0:
      if len(files) > 1:
        weight_map = {tensors[i].name: f.name for f in files for i in f.tensors}
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors))}, "weight_map": weight_map}
        _write_json(storage.join(tmp, INDEX_FILE), index)
      _write_json(storage.join(tmp, "config.json"), hf_config)
      _write_aux_files(tmp, model.config, tokenizer_dir)
      _write_json(storage.join(tmp, EXPORT_INFO_FILE), dict(info or {}, files=sorted(f.name for f in files)))
      replace_dir(tmp, out)
  except BaseException:
    # Multi-host hazard: a process that fails here leaves the others waiting in the next collective
    # (or sync) until the job is torn down; the temporary folder never becomes the export.
    if me == 0:
      storage.remove(tmp, recursive=True)
    raise
  _sync("artifex_export_done")
  return out


def clean_stale_exports(out_dir: str | os.PathLike) -> list[str]:
  """Removes the temporary folders a killed :func:`export_hf` left beside ``out_dir``.

  A ``.<name>.old-*`` folder is the previous export, moved aside just before the new one took its
  place: restored when ``out_dir`` is missing (killed between the two renames), else removed.
  Call it only while no export is running (the workdir lease guarantees that for a run).

  Returns:
    The names removed.
  """
  if storage.is_remote(out_dir):
    return []  # a bucket export is replaced object by object, marker last (see replace_dir)
  out = Path(out_dir)
  if not out.parent.is_dir():
    return []
  removed = []
  for path in sorted(out.parent.glob(f".{out.name}.old-*")) + sorted(out.parent.glob(f".{out.name}.tmp-*")):
    if ".old-" in path.name and not out.exists():
      os.replace(path, out)
      continue
    shutil.rmtree(path, ignore_errors=True)
    removed.append(path.name)
  return removed


def _write_json(path: str, obj: Any) -> None:
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_aux_files(tmp: str, config: ModelConfig, tokenizer_dir) -> None:
  src = storage.local_or_uri(tokenizer_dir) if tokenizer_dir is not None else None
  if src is not None and not storage.isdir(src):
    raise ValueError(f"tokenizer_dir {src} is not a folder")
  if src is not None and storage.isfile(storage.join(src, "generation_config.json")):
    storage.copy(storage.join(src, "generation_config.json"), storage.join(tmp, "generation_config.json"))
  else:
    _write_json(storage.join(tmp, "generation_config.json"), generation_config(config))
  for name in TOKENIZER_FILES if src is not None else ():
    if storage.isfile(storage.join(src, name)):
      storage.copy(storage.join(src, name), storage.join(tmp, name))
