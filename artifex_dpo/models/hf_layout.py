"""The one table of how our parameters are stored as Hugging Face tensors, and the HF file names.

HF stores linear weights in the torch ``[out, in]`` layout; ours are ``[in, out]`` with the head
axes split out (``q_proj [D, N, Dh]``, ``o_proj [N, Dh, D]``). Every such difference is one
:class:`Layout`: a permutation of our axes followed by merging consecutive permuted axes into one
HF axis. From that single declaration come the HF shape (:meth:`Layout.hf_shape`), the conversion
to HF (:meth:`Layout.to_hf`, used by export) and the mapping of a block of ours onto the HF tensor
(:meth:`Layout.read_block`, used by reading: only the HF rows/columns the block covers are read).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from artifex_dpo.models.config import ModelConfig
from artifex_dpo.models.llama import layer_param_shapes

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


def norm_index(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  """``index`` padded to ``len(shape)`` unit-step slices with explicit bounds.

  Raises:
    ValueError: a strided slice.
  """
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for sl, dim in zip(index, shape):
    start, stop, step = sl.indices(dim)
    if step != 1:
      raise ValueError(f"strided index {sl} is not supported")
    out.append(slice(start, max(start, stop)))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one kind of (per-layer) array of ours is stored as an HF tensor.

  ``hf = ours.transpose(perm).reshape(...)`` where the permuted axes are merged, in order, into
  HF axes of ``groups[j]`` axes each (the first of a group is the outer one).

  Attributes:
    name: the kind's name.
    perm: our axes in HF order; None: the identity, for any rank.
    groups: how many consecutive permuted axes make each HF axis; None: one each.
  """

  name: str
  perm: tuple[int, ...] | None = None
  groups: tuple[int, ...] | None = None

  def _axes(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    perm = tuple(range(ndim)) if self.perm is None else self.perm
    groups = (1,) * ndim if self.groups is None else self.groups
    if len(perm) != ndim or sum(groups) != ndim:
      raise ValueError(f"layout {self.name!r} is for {len(perm)}-d arrays, got {ndim}-d")
    return perm, groups

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for one (per-layer) array of ours with ``shape``."""
    perm, groups = self._axes(len(shape))
    permuted = [shape[a] for a in perm]
    out, i = [], 0
    for g in groups:
      out.append(math.prod(permuted[i:i + g]))
      i += g
    return tuple(out)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    """One (per-layer) array of ours in the HF layout (contiguous)."""
    perm, _ = self._axes(x.ndim)
    return np.ascontiguousarray(x.transpose(perm).reshape(self.hf_shape(x.shape)))

  def hf_index(self, shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[slice, ...]:
    """The HF slice that holds ``ours[index]``: for a merged HF axis, the outer axis' range times
    the inner axes' whole extent (a block that splits ``head_dim`` reads its enclosing heads)."""
    perm, groups = self._axes(len(shape))
    idx = norm_index(index, shape)
    out, i = [], 0
    for g in groups:
      outer = idx[perm[i]]
      inner = math.prod(shape[a] for a in perm[i + 1:i + g])
      out.append(slice(outer.start * inner, outer.stop * inner))
      i += g
    return tuple(out)

  def read_block(
      self,
      read: Callable[[tuple[slice, ...]], np.ndarray],
      shape: tuple[int, ...],
      index: tuple[slice, ...],
  ) -> np.ndarray:
    """Reads the block ``ours[index]`` of one (per-layer) array from its HF tensor.

    Args:
      read: ``read(hf_index) -> np.ndarray``, a slice reader of the HF tensor.
      shape: our (per-layer) array shape.
      index: tuple of unit-step slices into ``shape``.

    Returns:
      The block, in our layout. Only :meth:`hf_index` of the HF tensor is requested.
    """
    perm, groups = self._axes(len(shape))
    idx = norm_index(index, shape)
    blk = read(self.hf_index(shape, idx))
    split, take, i = [], [], 0
    for g in groups:  # un-merge each HF axis, then keep the inner axes' requested part
      split += [idx[perm[i]].stop - idx[perm[i]].start, *(shape[a] for a in perm[i + 1:i + g])]
      take += [slice(None), *(idx[a] for a in perm[i + 1:i + g])]
      i += g
    blk = blk.reshape(split)[tuple(take)]
    return blk.transpose(np.argsort(perm))


# The table: every layout kind, declared once.
LAYOUTS = {
    "identity": Layout("identity"),  # norms, the embedding: same layout
    "transpose": Layout("transpose", (1, 0)),  # [in, out] <-> torch [out, in]
    "heads_in": Layout("heads_in", (1, 2, 0), (2, 1)),  # [D, N, Dh] <-> [N*Dh, D]
    "heads_out": Layout("heads_out", (2, 0, 1), (1, 2)),  # [N, Dh, D] <-> [D, N*Dh]
    "heads_bias": Layout("heads_bias", (0, 1), (2,)),  # [N, Dh] <-> [N*Dh]
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """How one of our parameters maps to HF tensors.

  Attributes:
    hf_name: HF tensor name, with ``{i}`` for the layer index when ``stacked``.
    layout: the :class:`Layout` of each HF tensor.
    stacked: whether our array has a leading layer axis (one HF tensor per layer).
  """

  hf_name: str
  layout: Layout
  stacked: bool

  @property
  def kind(self) -> str:
    return self.layout.name


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
      ("embed",): TensorSpec("model.embed_tokens.weight", LAYOUTS["identity"], False),
      ("final_norm",): TensorSpec("model.norm.weight", LAYOUTS["identity"], False),
  }
  if not config.tie_word_embeddings:
    specs[("lm_head",)] = TensorSpec("lm_head.weight", LAYOUTS["transpose"], False)
  for name in layer_param_shapes(config):
    hf_name, kind = _LAYER_SPECS[name]
    specs[("layers", name)] = TensorSpec(hf_name, LAYOUTS[kind], True)
  return specs
