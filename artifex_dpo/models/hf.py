"""Hugging Face import/export for :class:`LlamaModel` (Llama, Mistral, Qwen2).

Needs only numpy, safetensors and json at runtime (no torch). Reading is memory
mapped and slice-wise: with shardings, every device shard is built from the HF
tensor slices it covers, so a host never reads a whole tensor it does not need.

HF stores linear weights in the torch ``[out, in]`` layout; ours are ``[in, out]``
with the head axes split out (``q_proj [D, N, Dh]``, ``o_proj [N, Dh, D]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy "bfloat16" so safetensors can read BF16)
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from artifex_dpo import storage
from artifex_dpo.models.config import ModelConfig
from artifex_dpo.models.llama import LlamaModel, layer_param_shapes

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_TO_HF = {v: k for k, v in HF_ARCHITECTURES.items()}
EXPORT_INFO_FILE = "artifex_dpo_export.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
EXPORT_DTYPES = tuple(_NP_DTYPES)  # the dtypes export_hf writes (config key export.dtype)
_HF_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}


# ----------------------------------------------------------------------------- config


def _read_config_json(path_or_dict: str | os.PathLike | dict[str, Any]) -> tuple[dict, str]:
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict), "<config dict>"
  path = str(path_or_dict)
  if storage.isdir(path):
    path = storage.join(path, "config.json")
  if not storage.isfile(path):
    raise ValueError(f"no config.json found at {path}")
  return json.loads(storage.read_text(path)), path


def _architecture(hf: dict[str, Any], source: str) -> str:
  archs = hf.get("architectures") or []
  for a in archs:
    if a in HF_ARCHITECTURES:
      return HF_ARCHITECTURES[a]
  if not archs and hf.get("model_type") in _ARCH_TO_HF:
    return hf["model_type"]
  name = archs[0] if archs else hf.get("model_type")
  raise ValueError(
      f"unsupported architecture {name!r} in {source}; supported: {sorted(HF_ARCHITECTURES)}"
  )


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling) from either transformers-5 ``rope_parameters`` or v4 keys."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
    raise ValueError("per-layer-type rope_parameters are not supported")
  params = dict(params or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = params or legacy
  if "type" in scaling and "rope_type" not in scaling:
    scaling["rope_type"] = scaling.pop("type")
  scaling.pop("rope_theta", None)
  if not scaling or scaling.get("rope_type", "default") == "default":
    return float(theta), None
  return float(theta), scaling


def _sliding_window(hf: dict[str, Any], arch: str, num_layers: int, source: str) -> int | None:
  if arch == "llama":
    return None
  window = hf.get("sliding_window")
  if arch == "mistral":
    return window
  # qwen2: a window only on layers >= max_window_layers, and only if use_sliding_window.
  layer_types = hf.get("layer_types")
  if layer_types is None:
    if not hf.get("use_sliding_window", False) or window is None:
      return None
    start = hf.get("max_window_layers", num_layers)
    layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(num_layers)]
  kinds = set(layer_types)
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and window is not None:
    return window
  raise ValueError(f"{source}: mixed full/sliding attention layers are not supported ({layer_types})")


def _first_id(v: Any) -> int | None:
  if isinstance(v, (list, tuple)):
    return int(v[0]) if v else None
  return None if v is None else int(v)


def config_from_hf(
    path_or_dict: str | os.PathLike | dict[str, Any],
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    remat: str | None = None,
) -> ModelConfig:
  """Reads an HF ``config.json`` (a folder, the file, or its dict) into a ModelConfig.

  Args:
    path_or_dict: HF model folder, path to config.json, or the parsed dict.
    dtype: compute dtype; default: the checkpoint's ``torch_dtype``/``dtype``
      (float16 maps to float32), else float32.
    param_dtype: parameter dtype; default as ``dtype``.
    remat: remat policy (default "none").

  Returns:
    The config. ``eos_token_id`` lists keep their first id.

  Raises:
    ValueError: unsupported architecture, activation, bias or rope type (names the file).
  """
  hf, source = _read_config_json(path_or_dict)
  arch = _architecture(hf, source)
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: unsupported hidden_act {hf['hidden_act']!r} (need 'silu')")
  if hf.get("mlp_bias", False):
    raise ValueError(f"{source}: mlp_bias=True is not supported")
  ckpt_dtype = _HF_DTYPE_NAMES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"))
  ckpt_dtype = ckpt_dtype or "float32"
  dtype = dtype or ckpt_dtype
  num_layers = int(hf["num_hidden_layers"])
  num_heads = int(hf["num_attention_heads"])
  theta, scaling = _rope_settings(hf)
  try:
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=hf.get("head_dim") or None,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        sliding_window=_sliding_window(hf, arch, num_layers, source),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
        architecture=arch,
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        remat=remat or "none",
    )
  except (ValueError, KeyError) as e:
    raise ValueError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
  """The HF ``config.json`` dict for ``config`` (loadable by transformers 4.4x and 5.x).

  Raises:
    ValueError: when the architecture cannot express the config (e.g. a Llama with a
      sliding window, a Qwen2 without q/k/v bias).
  """
  arch = config.architecture
  if arch == "qwen2" and not config.attention_bias:
    raise ValueError("qwen2 export needs attention_bias=True (Qwen2 always has q/k/v bias)")
  if arch == "mistral" and config.attention_bias:
    raise ValueError("mistral export does not support attention_bias=True")
  if arch == "llama" and config.sliding_window is not None:
    raise ValueError("llama export does not support sliding_window; use architecture='mistral'")
  scaling = dict(config.rope_scaling) if config.rope_type == "llama3" else None
  rope_parameters = {"rope_theta": config.rope_theta, **(scaling or {"rope_type": "default"})}
  out: dict[str, Any] = {
      "architectures": [_ARCH_TO_HF[arch]],
      "model_type": arch,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": scaling,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      "pad_token_id": config.pad_token_id,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": torch_dtype,
  }
  if arch == "llama":
    out.update(attention_bias=config.attention_bias, mlp_bias=False)
  elif arch == "mistral":
    out["sliding_window"] = config.sliding_window
  else:
    sliding = config.sliding_window is not None
    out.update(
        use_sliding_window=sliding,
        sliding_window=config.sliding_window,
        max_window_layers=0 if sliding else config.num_layers,
    )
  return out


# ----------------------------------------------------------------------------- name/layout map


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """How one of our parameters maps to HF tensors.

  Attributes:
    hf_name: HF tensor name, with ``{i}`` for the layer index when ``stacked``.
    kind: layout conversion: "identity" (same layout), "transpose" (2-D ``[out, in]``),
      "heads_in" (``[N*Dh, D]`` -> ``[D, N, Dh]``), "heads_out" (``[D, N*Dh]`` ->
      ``[N, Dh, D]``), "heads_bias" (``[N*Dh]`` -> ``[N, Dh]``).
    stacked: whether our array has a leading layer axis (one HF tensor per layer).
  """

  hf_name: str
  kind: str
  stacked: bool


_LAYER_SPECS = {
    "q_proj": ("model.layers.{i}.self_attn.q_proj.weight", "heads_in"),
    "k_proj": ("model.layers.{i}.self_attn.k_proj.weight", "heads_in"),
    "v_proj": ("model.layers.{i}.self_attn.v_proj.weight", "heads_in"),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight", "heads_out"),
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "heads_bias"),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "heads_bias"),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "heads_bias"),
    "gate_proj": ("model.layers.{i}.mlp.gate_proj.weight", "transpose"),
    "up_proj": ("model.layers.{i}.mlp.up_proj.weight", "transpose"),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight", "transpose"),
    "input_norm": ("model.layers.{i}.input_layernorm.weight", "identity"),
    "post_attention_norm": ("model.layers.{i}.post_attention_layernorm.weight", "identity"),
}


def param_specs(config: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
  """Our parameter path (as in ``nnx.to_flat_state``) -> its :class:`TensorSpec`."""
  specs = {
      ("embed",): TensorSpec("model.embed_tokens.weight", "identity", False),
      ("final_norm",): TensorSpec("model.norm.weight", "identity", False),
  }
  if not config.tie_word_embeddings:
    specs[("lm_head",)] = TensorSpec("lm_head.weight", "transpose", False)
  for name in layer_param_shapes(config):
    hf_name, kind = _LAYER_SPECS[name]
    specs[("layers", name)] = TensorSpec(hf_name, kind, True)
  return specs


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape for one (per-layer) array of ours with ``shape``."""
  if kind == "identity":
    return tuple(shape)
  if kind == "transpose":
    return (shape[1], shape[0])
  if kind == "heads_in":
    d, n, h = shape
    return (n * h, d)
  if kind == "heads_out":
    n, h, d = shape
    return (d, n * h)
  if kind == "heads_bias":
    n, h = shape
    return (n * h,)
  raise ValueError(f"unknown layout kind {kind!r}")


def to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
  """Converts one (per-layer) array of ours to the HF layout (inverse of reading)."""
  if kind == "identity":
    out = x
  elif kind == "transpose":
    out = x.T
  elif kind == "heads_in":
    out = x.reshape(x.shape[0], -1).T
  elif kind == "heads_out":
    out = x.reshape(-1, x.shape[-1]).T
  elif kind == "heads_bias":
    out = x.reshape(-1)
  else:
    raise ValueError(f"unknown layout kind {kind!r}")
  return np.ascontiguousarray(out)


def _norm_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for sl, dim in zip(index, shape):
    start, stop, step = sl.indices(dim)
    if step != 1:
      raise ValueError(f"strided index {sl} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def read_block(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    kind: str,
    shape: tuple[int, ...],
    index: tuple[slice, ...],
) -> np.ndarray:
  """Reads the block ``ours[index]`` of one (per-layer) array from its HF tensor.

  Only the HF rows/columns that the block covers are requested from ``read``
  (for the head layouts: whole heads of the requested head range, then the
  requested part of head_dim is taken, so a block that splits head_dim reads the
  enclosing heads).

  Args:
    read: ``read(hf_index) -> np.ndarray``, a slice reader of the HF tensor.
    kind: the layout kind (see :class:`TensorSpec`).
    shape: our (per-layer) array shape.
    index: tuple of unit-step slices into ``shape``.

  Returns:
    The block, in our layout.
  """
  idx = _norm_index(index, shape)
  if kind == "identity":
    return read(idx)
  if kind == "transpose":
    return read((idx[1], idx[0])).T
  if kind == "heads_in":
    d, n, h = idx
    hd = shape[2]
    rows = slice(n.start * hd, n.stop * hd)
    blk = read((rows, d)).reshape(n.stop - n.start, hd, d.stop - d.start)
    return blk[:, h, :].transpose(2, 0, 1)
  if kind == "heads_out":
    n, h, d = idx
    hd = shape[1]
    cols = slice(n.start * hd, n.stop * hd)
    blk = read((d, cols)).reshape(d.stop - d.start, n.stop - n.start, hd)
    return blk[:, :, h].transpose(1, 2, 0)
  if kind == "heads_bias":
    n, h = idx
    hd = shape[1]
    blk = read((slice(n.start * hd, n.stop * hd),)).reshape(n.stop - n.start, hd)
    return blk[:, h]
  raise ValueError(f"unknown layout kind {kind!r}")


# ----------------------------------------------------------------------------- reading


class _RangedSafetensors:
  """A safetensors file on a bucket, read by byte range: the header once, then for each slice
  only the bytes of the rows (first axis) it covers. Same ``keys`` / ``get_slice`` surface as
  ``safetensors.safe_open`` (which needs a local, memory-mappable file)."""

  _DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

  def __init__(self, path: str):
    self.path = path
    (n,) = struct.unpack("<Q", storage.read_range(path, 0, 8))
    header = json.loads(storage.read_range(path, 8, 8 + n))
    header.pop("__metadata__", None)
    self._header = header
    self._base = 8 + n

  def keys(self) -> list[str]:
    return list(self._header)

  def get_slice(self, name: str) -> "_RangedSafetensors._Slice":
    return self._Slice(self, name)

  class _Slice:
    def __init__(self, f: "_RangedSafetensors", name: str):
      self._f, meta = f, f._header[name]  # pylint: disable=protected-access
      self._dtype = np.dtype(f._DTYPES[meta["dtype"]])  # pylint: disable=protected-access
      self._shape = tuple(int(d) for d in meta["shape"])
      self._start = f._base + int(meta["data_offsets"][0])  # pylint: disable=protected-access

    def get_shape(self) -> list[int]:
      return list(self._shape)

    def __getitem__(self, index) -> np.ndarray:
      index = index if isinstance(index, tuple) else (index,)
      shape = self._shape
      if not shape:
        raw = storage.read_range(self._f.path, self._start, self._start + self._dtype.itemsize)
        return np.frombuffer(raw, self._dtype).reshape(())
      index = _norm_index(index, shape)
      rows = index[0]
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self._dtype.itemsize
      raw = storage.read_range(self._f.path, self._start + rows.start * row_bytes, self._start + rows.stop * row_bytes)
      block = np.frombuffer(raw, self._dtype).reshape((rows.stop - rows.start, *shape[1:]))
      return np.array(block[(slice(None), *index[1:])])


def _inside(folder: str, name: str) -> bool:
  """``name`` is a plain file name of ``folder`` (locally: also after resolving symlinks)."""
  if storage.is_remote(folder):
    return bool(name) and "/" not in name and name not in (".", "..")
  root = Path(folder).resolve()
  return (root / name).resolve().parent == root


class CheckpointReader:
  """Slice-wise access to the tensors of an HF safetensors checkpoint (local or ``gs://``).

  Local files are memory mapped; files on a bucket are read by byte range (a slice reads only
  the rows of the tensor it covers), so a host never downloads tensors it does not hold.

  Args:
    path: folder holding ``model.safetensors`` or ``model.safetensors.index.json``.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = storage.local_or_uri(path)
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

  @staticmethod
  def _open(path: str):
    if storage.is_remote(path):
      return _RangedSafetensors(path)
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
    want = hf_shape(spec.kind, per_layer)
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
    index = _norm_index(index, shape)
    key = tuple((s.start, s.stop) for s in index)
    if key not in cache:
      cache[key] = _read(index)
    return cache[key]

  def _read(index: tuple[slice, ...]) -> np.ndarray:
    if not spec.stacked:
      blk = read_block(lambda i: reader.read(spec.hf_name, i), spec.kind, shape, index)
      return np.ascontiguousarray(blk, dtype=np_dtype)
    layers = range(index[0].start, index[0].stop)
    blocks = [
        read_block(
            lambda i, name=spec.hf_name.format(i=layer): reader.read(name, i),
            spec.kind,
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


# ----------------------------------------------------------------------------- export


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _export_tensors(
    model: LlamaModel,
) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
  """(hf_name, hf_shape, fetch) for every HF tensor, embedding first then layer by layer."""
  config = model.config
  specs = param_specs(config)
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  top, per_layer = [], []
  for p, spec in specs.items():
    arr = params[p].get_value()
    if spec.stacked:
      per_layer.append((spec, arr))
    else:
      top.append((
          spec.hf_name,
          hf_shape(spec.kind, arr.shape),
          lambda s=spec, a=arr: to_hf_layout(s.kind, _to_host(a)),
      ))
  out = [t for t in top if t[0] == "model.embed_tokens.weight"]
  for i in range(config.num_layers):
    for spec, arr in per_layer:
      out.append((
          spec.hf_name.format(i=i),
          hf_shape(spec.kind, arr.shape[1:]),
          lambda s=spec, a=arr, i=i: to_hf_layout(s.kind, _to_host(a[i])),
      ))
  out.extend(t for t in top if t[0] != "model.embed_tokens.weight")
  return out


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


def _generation_config(config: ModelConfig) -> dict[str, Any]:
  out: dict[str, Any] = {"_from_model_config": True}
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    if getattr(config, k) is not None:
      out[k] = getattr(config, k)
  return out


def _replace_dir(tmp: str, out: str) -> None:
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


def _save_shard(data: dict[str, np.ndarray], path: str) -> None:
  if storage.is_remote(path):
    from safetensors.numpy import save

    storage.write_bytes(path, save(data, metadata={"format": "pt"}))
  else:
    save_file(data, path, metadata={"format": "pt"})


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


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

  Writes config.json, generation_config.json (copied from ``tokenizer_dir`` when
  it has one, else built from the token ids), safetensors weights (one
  ``model.safetensors`` if it fits in ``max_shard_bytes``, else numbered shards
  plus ``model.safetensors.index.json``), the tokenizer files found in
  ``tokenizer_dir`` and ``artifex_dpo_export.json`` (``info`` and the weight files: the step the weights
  are from; written last, it marks a complete export). Everything goes to a temporary sibling
  folder that replaces ``out_dir`` at the end (see `_replace_dir`), so a crash leaves no
  half-written export. ``out_dir`` may be local or ``gs://``.

  Multi-host: every process must call this. Shard k is written by process k mod P (tensors are
  assembled one at a time, only for the shard being written, so no host ever holds the whole
  model); process 0 then writes the index, the configs and the marker and moves the folder.

  Args:
    model: the model to export.
    out_dir: destination folder (replaced if it exists).
    dtype: "float32" or "bfloat16" for the stored weights.
    max_shard_bytes: largest shard size.
    tokenizer_dir: folder to copy tokenizer files from, or None.
    info: written into ``EXPORT_INFO_FILE`` (e.g. the training step the weights are from), with the
      list of weight files; that file is written last: an export holding it is complete.

  Every file gets mode 0644 locally (safetensors writes 0600), so a server running as another user can
  read the folder. :func:`clean_stale_exports` removes what a killed local export leaves behind.

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
  tensors = _export_tensors(model)
  sizes = [int(np.prod(shape)) * np_dtype.itemsize for _, shape, _ in tensors]
  shards = plan_shards(sizes, max_shard_bytes)
  me, procs = jax.process_index(), jax.process_count()
  # The same temporary name on every process (they write into one folder); a leftover of a
  # crashed export of the same step is cleared first.
  step = (info or {}).get("step")
  tag = f"step{step}" if step is not None else "nostep"
  tmp = storage.join(storage.dirname(out), f".{storage.basename(out)}.tmp-{tag}")
  if me == 0:
    storage.remove(tmp, recursive=True)
    storage.makedirs(tmp)  # not tempfile.mkdtemp: its 0700 mode would stick to the export
  _sync("artifex_export_start")
  try:
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for k, (fname, shard) in enumerate(zip(names, shards)):
      owner = k % procs
      # Assembling a tensor spread over hosts is a collective: every process takes part, and
      # only the shard's owner keeps the result.
      data = {}
      for i in shard:
        x = tensors[i][2]()
        if me == owner:
          data[tensors[i][0]] = x.astype(np_dtype)
        del x
      if me == owner:
        _save_shard(data, storage.join(tmp, fname))
      weight_map.update({tensors[i][0]: fname for i in shard})
      del data
    _sync("artifex_export_shards")
    if me == 0:
      if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}
        _write_json(storage.join(tmp, INDEX_FILE), index)
      _write_json(storage.join(tmp, "config.json"), hf_config)
      _write_aux_files(tmp, model.config, tokenizer_dir)
      _write_json(storage.join(tmp, EXPORT_INFO_FILE), dict(info or {}, files=sorted(names)))
      _replace_dir(tmp, out)
  except BaseException:
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
    return []  # a bucket export is replaced object by object, marker last (see _replace_dir)
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
    _write_json(storage.join(tmp, "generation_config.json"), _generation_config(config))
  for name in TOKENIZER_FILES if src is not None else ():
    if storage.isfile(storage.join(src, name)):
      storage.copy(storage.join(src, name), storage.join(tmp, name))
