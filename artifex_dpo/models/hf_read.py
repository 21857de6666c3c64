"""Reading Hugging Face safetensors checkpoints into :class:`LlamaModel` parameters (no torch).

Slice-wise: with shardings, every device shard is built from the HF tensor slices it covers
(:meth:`Layout.read_block` of :mod:`artifex_dpo.models.hf_layout`), so a host never reads a whole
tensor it does not need. Local files are memory mapped. Files on a bucket are read by byte range
(:class:`RangedSafetensors`): the header once, then per slice only the byte runs it covers.

Byte ranges of a slice (multi-host hazard: every host of a pod reads its own slices at once, so
request counts multiply by the host count). A slice of rows is one run. A slice of columns (a tensor
sharded along its last axis, e.g. ``q_proj`` under FSDP) is one run per row; runs separated by less
than ``merge_gap`` bytes (default :data:`MERGE_GAP`, 4 MiB) are read as one run, the columns in
between included: a GET costs a first-byte latency of some 30-50 ms on GCS, worth about 4 MiB at
~100 MB/s per stream (GCS's typical figures, not measured here: the tests reach only a local emulator),
so a gap smaller than that is cheaper to read than to skip. Consequence for
real models: HF rows are at most a few hundred KiB (Llama-3-70B ``down_proj``: 28672 bf16 = 56 KiB),
so their column slices read whole rows — one GET per slice, at most ``1 / column fraction`` times the
slice's bytes — while a checkpoint with rows wider than the gap reads only the slice's bytes in
one GET per row. Several runs are fetched concurrently (:data:`READ_THREADS`).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from artifex_dpo import storage
from artifex_dpo.models.config import ModelConfig
from artifex_dpo.models.hf_config import config_from_hf
from artifex_dpo.models.hf_layout import INDEX_FILE, SINGLE_FILE, TensorSpec, norm_index, param_specs
from artifex_dpo.models.llama import LlamaModel

MERGE_GAP = 4 * 1024**2
READ_THREADS = 16
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}


def byte_runs(shape: tuple[int, ...], itemsize: int, index: tuple[slice, ...],
              merge_gap: int = MERGE_GAP) -> tuple[tuple[slice, ...], int, list[tuple[int, int]]]:
  """The byte runs (relative to the tensor's first byte) to read for ``tensor[index]``.

  Inner axes are widened to their full extent while the bytes skipped between consecutive runs
  would be under ``merge_gap`` (those runs are read as one); what remains is one run per position
  of the outer axes, each at least ``merge_gap`` from the next.

  Args:
    shape: the stored tensor's shape (C order).
    itemsize: bytes per element.
    index: unit-step slices into ``shape``.
    merge_gap: runs separated by fewer bytes are read as one.

  Returns:
    ``(region, k, runs)``: the (widened) region read, which contains ``index``; the number of
    outer axes (one run per position of ``region[:k]``, in C order); the runs as ``[start, end)``
    byte offsets, each holding ``region[k:]`` of one outer position.
  """
  idx = list(norm_index(index, shape))
  inner = itemsize  # bytes of one step along axis k
  k = len(shape) - 1
  while k > 0 and (shape[k] - (idx[k].stop - idx[k].start)) * inner < merge_gap:
    idx[k] = slice(0, shape[k])
    inner *= shape[k]
    k -= 1
  strides = [math.prod(shape[j + 1:]) * itemsize for j in range(len(shape))]
  runs = []
  if all(s.stop > s.start for s in idx):
    for pos in np.ndindex(*(s.stop - s.start for s in idx[:k])):
      start = sum((idx[j].start + p) * strides[j] for j, p in enumerate(pos)) + idx[k].start * strides[k]
      runs.append((start, start + (idx[k].stop - idx[k].start) * strides[k]))
  return tuple(idx), k, runs


class RangedSafetensors:
  """A safetensors file (on a bucket) read by byte range: the header once, then for each slice
  only its :func:`byte_runs`. Same ``keys`` / ``get_slice`` surface as ``safetensors.safe_open``
  (which needs a local, memory-mappable file).

  Args:
    path: the file (any path :mod:`artifex_dpo.storage` reads).
    merge_gap: see :func:`byte_runs`.
  """

  def __init__(self, path: str, merge_gap: int = MERGE_GAP):
    self.path, self.merge_gap = path, merge_gap
    (n,) = struct.unpack("<Q", storage.read_range(path, 0, 8))
    header = json.loads(storage.read_range(path, 8, 8 + n))
    header.pop("__metadata__", None)
    self._header = header
    self._base = 8 + n

  def keys(self) -> list[str]:
    return list(self._header)

  def get_slice(self, name: str) -> "RangedSafetensors._Slice":
    return self._Slice(self, name)

  def _read_runs(self, runs: list[tuple[int, int]]) -> list[bytes]:
    base = self._base
    if len(runs) <= 1:
      return [storage.read_range(self.path, base + a, base + b) for a, b in runs]
    with concurrent.futures.ThreadPoolExecutor(min(READ_THREADS, len(runs))) as pool:
      return list(pool.map(lambda r: storage.read_range(self.path, base + r[0], base + r[1]), runs))

  class _Slice:
    def __init__(self, f: "RangedSafetensors", name: str):
      self._f, meta = f, f._header[name]  # pylint: disable=protected-access
      self._dtype = np.dtype(SAFETENSORS_DTYPES[meta["dtype"]])
      self._shape = tuple(int(d) for d in meta["shape"])
      self._start = int(meta["data_offsets"][0])

    def get_shape(self) -> list[int]:
      return list(self._shape)

    def __getitem__(self, index) -> np.ndarray:
      index = norm_index(index if isinstance(index, tuple) else (index,), self._shape)
      if not self._shape:
        (raw,) = self._f._read_runs([(self._start, self._start + self._dtype.itemsize)])  # pylint: disable=protected-access
        return np.frombuffer(raw, self._dtype).reshape(())
      region, k, runs = byte_runs(self._shape, self._dtype.itemsize, index, self._f.merge_gap)
      raws = self._f._read_runs([(self._start + a, self._start + b) for a, b in runs])  # pylint: disable=protected-access
      shape = [s.stop - s.start for s in region]
      block = np.empty(shape, self._dtype)
      for pos, raw in zip(np.ndindex(*shape[:k]), raws):
        block[pos] = np.frombuffer(raw, self._dtype).reshape(shape[k:])
      local = tuple(slice(i.start - r.start, i.stop - r.start) for i, r in zip(index, region))
      return np.ascontiguousarray(block[local])


def _inside(folder: str, name: str) -> bool:
  """``name`` is a plain file name of ``folder`` (locally: also after resolving symlinks)."""
  if storage.is_remote(folder):
    return bool(name) and "/" not in name and name not in (".", "..")
  root = Path(folder).resolve()
  return (root / name).resolve().parent == root


class CheckpointReader:
  """Slice-wise access to the tensors of an HF safetensors checkpoint (local or ``gs://``).

  Local files are memory mapped; files on a bucket are read by byte range (a slice reads only
  the byte runs of the tensor it covers), so a host never downloads tensors it does not hold.

  Args:
    path: folder holding ``model.safetensors`` or ``model.safetensors.index.json``.
    ranged: read by byte range (:class:`RangedSafetensors`); default: on a bucket only.
    merge_gap: for ranged reads, see :func:`byte_runs`.
  """

  def __init__(self, path: str | os.PathLike, *, ranged: bool | None = None, merge_gap: int = MERGE_GAP):
    self.path = storage.local_or_uri(path)
    self._ranged = storage.is_remote(self.path) if ranged is None else ranged
    self._merge_gap = merge_gap
    index = storage.join(self.path, INDEX_FILE)
    single = storage.join(self.path, SINGLE_FILE)
    if storage.isfile(index):
      weight_map = json.loads(storage.read_text(index))["weight_map"]
      self.source = index
    elif storage.isfile(single):
      weight_map = {k: SINGLE_FILE for k in self._open(single).keys()}
      self.source = single
    else:
      raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
    self.weight_map: dict[str, str] = dict(weight_map)
    for name, fname in self.weight_map.items():
      # An index is input: its entries must name files in this folder (no ../, no absolute paths, no
      # symlinks out of it).
      if not isinstance(fname, str) or not _inside(self.path, fname):
        raise ValueError(f"{self.source}: tensor {name!r} points outside the model folder ({fname!r})")
    self._handles: dict[str, Any] = {}

  def _open(self, path: str):
    if self._ranged:
      return RangedSafetensors(path, self._merge_gap)
    return safe_open(path, framework="numpy")

  def file_of(self, name: str) -> str:
    """The file holding tensor ``name`` (for messages)."""
    return storage.join(self.path, self.weight_map[name])

  def _handle(self, name: str):
    fname = self.weight_map[name]
    if fname not in self._handles:
      fpath = storage.join(self.path, fname)
      if not storage.isfile(fpath):
        raise ValueError(f"tensor {name!r}: file {fpath} listed in {self.source} is missing")
      self._handles[fname] = self._open(fpath)
    return self._handles[fname]

  def shape(self, name: str) -> tuple[int, ...]:
    """The stored shape of tensor ``name``."""
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Reads ``tensor[index]`` (only that slice is read from disk)."""
    return self._handle(name).get_slice(name)[index]

  def close(self) -> None:
    """Drops the open file handles."""
    self._handles.clear()


def _check_tensors(reader: CheckpointReader, specs, shapes, config: ModelConfig) -> None:
  expected: dict[str, tuple[int, ...]] = {}
  for path, spec in specs.items():
    shape = shapes[path]
    per_layer = shape[1:] if spec.stacked else shape
    want = spec.layout.hf_shape(per_layer)
    names = [spec.hf_name.format(i=i) for i in range(config.num_layers)] if spec.stacked else [spec.hf_name]
    for n in names:
      expected[n] = want
  for name, want in expected.items():
    if name not in reader.weight_map:
      raise ValueError(f"missing tensor {name!r} in checkpoint {reader.source}")
    got = reader.shape(name)
    if got != want:
      raise ValueError(
          f"tensor {name!r} in {reader.file_of(name)} has shape {got}, expected {want}"
      )
  for name in reader.weight_map:
    if name in expected or name.endswith("rotary_emb.inv_freq"):
      continue
    if name == "lm_head.weight" and config.tie_word_embeddings:
      continue  # some tied checkpoints store the (identical) head as well
    raise ValueError(f"unexpected tensor {name!r} in {reader.file_of(name)}")


def make_block_reader(
    reader: CheckpointReader,
    spec: TensorSpec,
    shape: tuple[int, ...],
    np_dtype: Any,
) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """The ``jax.make_array_from_callback`` callback for one of our parameters.

  Args:
    reader: the open checkpoint.
    spec: the parameter's :class:`TensorSpec`.
    shape: our full parameter shape (with the layer axis when stacked).
    np_dtype: dtype of the returned blocks.

  Returns:
    ``cb(index) -> np.ndarray`` building ``ours[index]`` from only the HF tensor
    slices it covers (for stacked params: only the layers in ``index[0]``). A
    block requested again (a replicated shard on another device) is served from
    memory instead of being re-read.
  """
  cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}  # replicated shards: read once

  def cb(index: tuple[slice, ...]) -> np.ndarray:
    index = norm_index(index, shape)
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      cache[key] = _read(index)
    return cache[key]

  def _read(index: tuple[slice, ...]) -> np.ndarray:
    if not spec.stacked:
      blk = spec.layout.read_block(lambda i: reader.read(spec.hf_name, i), shape, index)
      return np.ascontiguousarray(blk, dtype=np_dtype)
    layers = range(index[0].start, index[0].stop)
    blocks = [
        spec.layout.read_block(
            lambda i, name=spec.hf_name.format(i=layer): reader.read(name, i),
            shape[1:],
            index[1:],
        ).astype(np_dtype)
        for layer in layers
    ]
    if not blocks:
      return np.zeros((0, *(s.stop - s.start for s in index[1:])), np_dtype)
    return np.ascontiguousarray(np.stack(blocks, axis=0))

  return cb


def load_hf_params(
    path: str | os.PathLike,
    abstract_model: LlamaModel,
    shardings: Any = None,
) -> nnx.State:
  """Reads an HF checkpoint into the parameters of ``abstract_model``.

  Args:
    path: HF folder (``model.safetensors`` or a sharded index).
    abstract_model: a model (usually from ``nnx.eval_shape``) giving the config,
      the parameter shapes/dtypes (targets are cast to each Param's dtype) and
      metadata.
    shardings: optional pytree with the structure of
      ``nnx.state(abstract_model, nnx.Param)`` whose leaves are
      ``jax.sharding.Sharding``; each array is then built with
      ``jax.make_array_from_callback`` and every callback reads only the HF
      slices of its own shard. None: plain (default-device) arrays.

  Returns:
    ``nnx.State`` of Params (same paths and metadata as the abstract model's),
    ready for ``nnx.merge(graphdef, state)`` or ``nnx.update``.

  Raises:
    ValueError: missing/unexpected tensor or shape mismatch (names tensor and file).
  """
  config: ModelConfig = abstract_model.config
  abstract = nnx.state(abstract_model, nnx.Param)
  flat = list(nnx.to_flat_state(abstract))
  specs = param_specs(config)
  paths = {p for p, _ in flat}
  if paths != set(specs):
    raise ValueError(f"model parameters {sorted(paths)} do not match the HF layout {sorted(specs)}")
  sh_leaves = None
  if shardings is not None:
    sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(sh_leaves) != len(flat):
      raise ValueError(f"shardings has {len(sh_leaves)} leaves, the model {len(flat)} params")
  shapes = {p: tuple(v.get_value().shape) for p, v in flat}
  reader = CheckpointReader(path)
  try:
    _check_tensors(reader, specs, shapes, config)
    out = []
    for k, (p, var) in enumerate(flat):
      abs_value = var.get_value()
      shape, dtype = tuple(abs_value.shape), abs_value.dtype
      cb = make_block_reader(reader, specs[p], shape, np.dtype(dtype))
      if sh_leaves is None:
        arr = jnp.asarray(cb(tuple(slice(None) for _ in shape)))
      else:
        arr = jax.make_array_from_callback(shape, sh_leaves[k], cb)
      out.append((p, type(var).from_metadata(arr, var.get_metadata())))
  finally:
    reader.close()
  return nnx.from_flat_state(out)


def load_hf_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: str | None = None,
) -> LlamaModel:
  """Loads an HF Llama/Mistral/Qwen2 folder as a :class:`LlamaModel` (no torch needed).

  Args:
    path: folder with config.json and safetensors weights.
    dtype: compute dtype (default: the checkpoint's dtype).
    param_dtype: parameter dtype (default: ``dtype``).
    remat: remat policy (default "none").

  Returns:
    The model with the checkpoint's weights.
  """
  config = config_from_hf(path, dtype=dtype, param_dtype=param_dtype, remat=remat)
  abstract = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, load_hf_params(path, abstract))
