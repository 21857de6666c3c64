"""The sharded training state: policy + optimizer, the frozen reference, and the compiled step.

Everything is described abstractly first (``nnx.eval_shape``: shapes, dtypes, shardings, no
memory), so the same description serves the training run, which materialises the arrays
directly sharded with one ``jax.jit(..., out_shardings=...)`` (no host ever holds the whole
model), and the ahead-of-time compile for a TPU topology, which never materialises anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from artifex_dpo import sharding
from artifex_dpo.dpo_config import DPOConfig
from artifex_dpo.models import LlamaModel, load_hf_params
from artifex_dpo.models import lora as lora_lib
from artifex_dpo.models.config import ModelConfig
from artifex_dpo.trainer import make_loss_fn, make_train_step, mix_reference
from artifex_dpo.types import (GeneratedSequenceBatch, PackedPreferenceBatch, PackedUnpairedBatch, PreferenceBatch,
                               UnpairedBatch)


@dataclasses.dataclass
class StateSpec:
  """Abstract description of the training state on a mesh.

  Attributes:
    graphdef: graph definition of ``(policy, optimizer)``.
    abstract_state: its state, as ShapeDtypeStructs.
    shardings: NamedShardings of ``abstract_state``.
    lora: the adapter settings (None: full training).
    ref_graphdef: graph definition of the reference model (None: no reference in memory;
      ``lora.BASE``: the policy's own base, adapters off).
    abstract_ref: the reference's parameters, abstract (None without reference).
    ref_shardings: their NamedShardings (None without reference).
  """

  mesh: Mesh
  model_config: ModelConfig
  tx: optax.GradientTransformation
  init_seed: int
  graphdef: Any
  abstract_state: Any
  shardings: Any
  lora: lora_lib.LoraConfig | None = None
  ref_graphdef: Any = None
  abstract_ref: Any = None
  ref_shardings: Any = None

  def create(self, params: Any = None) -> tuple[LlamaModel, nnx.Optimizer]:
    """Builds (policy, optimizer) inside a trace; ``params`` replace the random initial (base) weights.

    Only ``nnx.Param``s are optimized: all weights in full training, the adapters with LoRA.
    """
    if self.lora is not None:
      model = lora_lib.LoraLlamaModel(self.model_config, self.lora, rngs=nnx.Rngs(self.init_seed),
                                      base_params=params)
    else:
      model = LlamaModel(self.model_config, rngs=nnx.Rngs(self.init_seed))
      if params is not None:
        nnx.update(model, params)
    return model, nnx.Optimizer(model, self.tx, wrt=nnx.Param)

  @property
  def reference_is_base(self) -> bool:
    return isinstance(self.ref_graphdef, str) and self.ref_graphdef == lora_lib.BASE


def build_state_spec(model_config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, *,
                     init_seed: int = 0, ref_dtype: str | None = None, lora: lora_lib.LoraConfig | None = None,
                     reference_is_base: bool = False) -> StateSpec:
  """Describes the state; ``ref_dtype`` None means no reference model is kept in memory.

  With ``lora`` and ``reference_is_base`` (and a ``ref_dtype``: a reference is needed) the
  reference is the policy's frozen base with the adapters off: no second copy of any weight.
  With the splash attention the model config also carries the mesh, which the kernel
  is ``shard_map``-ed over.
  """
  if model_config.attention_impl != "xla":
    model_config = dataclasses.replace(model_config, attention_mesh=mesh)
  spec = StateSpec(mesh=mesh, model_config=model_config, tx=tx, init_seed=init_seed, graphdef=None,
                   abstract_state=None, shardings=None, lora=lora)
  spec.graphdef, spec.abstract_state = nnx.split(nnx.eval_shape(spec.create))
  spec.shardings = sharding.state_shardings(spec.abstract_state, mesh)
  if ref_dtype is not None and lora is not None and reference_is_base:
    spec.ref_graphdef = lora_lib.BASE
  elif ref_dtype is not None:
    ref_config = dataclasses.replace(model_config, param_dtype=ref_dtype)
    spec.ref_graphdef, spec.abstract_ref = nnx.split(nnx.eval_shape(lambda: LlamaModel(ref_config, rngs=nnx.Rngs(0))))
    spec.ref_shardings = sharding.state_shardings(spec.abstract_ref, mesh)
  return spec


def _abstract_policy(spec: StateSpec) -> LlamaModel:
  """The abstract model whose Params a HF checkpoint fills (the plain base model with LoRA)."""
  if spec.lora is not None:  # read in the base's float dtype: bf16 for bf16 / int8 / nf4 bases (half the bytes)
    config = spec.model_config.replace(param_dtype="float32" if spec.lora.base_dtype == "float32" else "bfloat16")
    return nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(spec.init_seed)))
  return nnx.eval_shape(lambda: spec.create()[0])


def init_state(spec: StateSpec, hf_checkpoint: str | None = None) -> nnx.State:
  """Materialises (policy, optimizer) directly sharded: random init, or the HF checkpoint's weights.

  A checkpoint is read shard by shard (each process reads only the slices of its devices).
  """
  loaded = None
  if hf_checkpoint:
    abstract_model = _abstract_policy(spec)
    param_sh = sharding.state_shardings(nnx.state(abstract_model, nnx.Param), spec.mesh)
    loaded = load_hf_params(hf_checkpoint, abstract_model, param_sh)
  with spec.mesh:
    return jax.jit(lambda p: nnx.state(spec.create(p)), out_shardings=spec.shardings)(loaded)


def init_reference(spec: StateSpec, state: nnx.State, ref_hf_checkpoint: str | None = None) -> nnx.State | None:
  """The frozen reference: an HF checkpoint, or a copy of the policy's current weights in ref dtype."""
  if spec.ref_graphdef is None or spec.reference_is_base:
    return None
  if ref_hf_checkpoint:
    abstract_ref = nnx.merge(spec.ref_graphdef, spec.abstract_ref)
    return load_hf_params(ref_hf_checkpoint, abstract_ref, spec.ref_shardings)
  dtypes = jax.tree.map(lambda a: a.dtype, spec.abstract_ref)

  def copy(s):  # a new buffer: the policy's buffers are donated to every step
    params = nnx.state(nnx.merge(spec.graphdef, s)[0], nnx.Param)
    return jax.tree.map(lambda x, d: x.astype(d), params, dtypes)

  with spec.mesh:
    return jax.jit(copy, out_shardings=spec.ref_shardings)(state)


def abstract_batch(mesh: Mesh, global_batch: int, chosen_len: int, rejected_len: int | None = None,
                   with_pair_mask: bool = False) -> PreferenceBatch:
  """A PreferenceBatch of ShapeDtypeStructs sharded like the real batches (for AOT compiles)."""
  rejected_len = chosen_len if rejected_len is None else rejected_len

  def arr(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

  def side(length):
    shape = (global_batch, length)
    return GeneratedSequenceBatch(sequences=arr(shape), response_mask=arr(shape), segment_ids=arr(shape))

  return PreferenceBatch(chosen=side(chosen_len), rejected=side(rejected_len),
                         pair_mask=arr((global_batch,)) if with_pair_mask else None)


def batch_shardings(batch: PreferenceBatch | PackedPreferenceBatch) -> Any:
  return jax.tree.map(lambda x: x.sharding, batch)


def per_device_chunks(config: DPOConfig, mesh: Mesh) -> DPOConfig:
  """``config`` with ``logits_chunk_size`` counted over the whole batch, not one device's rows.

  The chunked log-softmax sizes its chunks by the rows it sees (the global batch); the rows are
  split over the mesh's batch axes, so each device then holds ``logits_chunk_size`` tokens.
  """
  return dataclasses.replace(config, logits_chunk_size=config.logits_chunk_size * sharding.batch_parallelism(mesh))


def jit_train_step(spec: StateSpec, config: DPOConfig, batch: PreferenceBatch, *,
                   grad_accum_steps: int = 1) -> Callable:
  """The train step as one ``jax.jit`` with explicit shardings and the state donated."""
  config = per_device_chunks(config, spec.mesh)
  step = make_train_step(spec.graphdef, spec.ref_graphdef, config, grad_accum_steps=grad_accum_steps)
  replicated = jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(spec.shardings, spec.ref_shardings, batch_shardings(batch)),
                 out_shardings=(spec.shardings, replicated), donate_argnums=(0,))


def jit_eval_step(spec: StateSpec, config: DPOConfig, batch: PreferenceBatch) -> Callable:
  """``(state, ref_state, batch, normalizers) -> metrics`` as one ``jax.jit`` with explicit shardings.

  ``normalizers`` (:class:`artifex_dpo.losses.Normalizers` of the whole eval set) make the
  metrics the batch's additive shares of the eval set's.
  """
  loss_fn = make_loss_fn(spec.graphdef, spec.ref_graphdef, per_device_chunks(config, spec.mesh))
  replicated = jax.sharding.NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
  return jax.jit(lambda s, r, b, n: loss_fn(s, r, b, n)[1],
                 in_shardings=(spec.shardings, spec.ref_shardings, batch_shardings(batch), replicated),
                 out_shardings=replicated)


def jit_sync_reference(spec: StateSpec, alpha: float) -> Callable:
  """TR-DPO's ``(ref_state, state) -> ref_state``: the policy mixed into the reference, sharded like it
  (each device mixes its own shards; nothing is gathered). The old reference buffers are donated."""

  def sync(ref_state, state):
    params = nnx.state(nnx.merge(spec.graphdef, state)[0], nnx.Param)
    return mix_reference(ref_state, params, alpha)

  return jax.jit(sync, in_shardings=(spec.ref_shardings, spec.shardings), out_shardings=spec.ref_shardings,
                 donate_argnums=(0,))


def _lookup(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """Per-pair rows of a reference table; -1 (filler) gives zeros."""
  return np.where(indices[..., None] >= 0, table[np.maximum(indices, 0)], 0.0).astype(np.float32)


def global_batch(local: dict[str, Any], mesh: Mesh, *, with_pair_mask: bool,
                 reference_table: np.ndarray | None = None) -> PreferenceBatch | PackedPreferenceBatch:
  """Per-process numpy batches -> one global batch sharded over (data, fsdp).

  Packed batches (a ``tokens`` key) become a PackedPreferenceBatch. ``reference_table``
  (``[N, 2]`` precomputed reference sums per dataset pair) is looked up by ``pair_indices``.
  """
  count = jax.process_count()

  def arr(x):
    x = np.asarray(x)
    shape = (x.shape[0] * count, *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, x.ndim), x, shape)

  if "completion_tokens" in local:  # KTO: labelled completions and their KL rows
    # Precomputed reference sums (dpo.precompute_ref_logps) come with the local batch (unpaired_loader).
    rows = lambda p: GeneratedSequenceBatch(sequences=arr(local[f"{p}_tokens"]),
                                            response_mask=arr(local[f"{p}_response_mask"]),
                                            segment_ids=arr(local[f"{p}_segment_ids"]),
                                            reference_sequence_log_probs=arr(local[f"{p}_ref_logps"])
                                            if f"{p}_ref_logps" in local else None)
    return UnpairedBatch(completions=rows("completion"), labels=arr(local["labels"]),
                         kl=rows("kl") if "kl_tokens" in local else None,
                         example_mask=arr(local["example_mask"]) if with_pair_mask else None)
  if "tokens" in local and "labels" in local:  # KTO packed (data.pack_batches): example + KL row per slot
    optional = {k: arr(local[k]) for k in ("positions", "prefix_ids") if k in local}
    rows = PackedPreferenceBatch(sequences=arr(local["tokens"]), segment_ids=arr(local["segment_ids"]),
                                 response_mask=arr(local["response_mask"]), pair_mask=arr(local["pair_mask"]),
                                 reference_sequence_log_probs=arr(local["ref_logps"]) if "ref_logps" in local
                                 else None, **optional)
    return PackedUnpairedBatch(rows=rows, labels=arr(local["labels"]))
  ref = None if reference_table is None else _lookup(reference_table, np.asarray(local["pair_indices"]))
  if "tokens" in local:
    optional = {k: arr(local[k]) for k in ("positions", "prefix_ids") if k in local}
    return PackedPreferenceBatch(sequences=arr(local["tokens"]), segment_ids=arr(local["segment_ids"]),
                                 response_mask=arr(local["response_mask"]), pair_mask=arr(local["pair_mask"]),
                                 reference_sequence_log_probs=None if ref is None else arr(ref), **optional)

  def side(s, j):
    return GeneratedSequenceBatch(sequences=arr(local[f"{s}_tokens"]), response_mask=arr(local[f"{s}_response_mask"]),
                                  segment_ids=arr(local[f"{s}_segment_ids"]),
                                  reference_sequence_log_probs=None if ref is None else arr(ref[:, j]))

  return PreferenceBatch(chosen=side("chosen", 0), rejected=side("rejected", 1),
                         pair_mask=arr(local["pair_mask"]) if with_pair_mask else None)
