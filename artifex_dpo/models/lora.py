"""LoRA and QLoRA for the scanned :class:`~artifex_dpo.models.LlamaModel`.

The policy is a frozen base plus trainable low-rank factors on the layer projections
(``y = x W + (alpha / r) * (x A) B``); the reference is the same base with the adapters off, so a
LoRA run holds one copy of the base weights and nothing else for its reference.

* Base weights are :class:`FrozenParam` variables (not ``nnx.Param``): the trainer differentiates
  and the optimizer updates ``nnx.Param`` only, so only the adapters (``nnx.LoRAParam``, a Param)
  have gradients and optimizer state, and checkpoints hold only the adapters (see
  :func:`checkpointed`). The base can be stored in float32 / bfloat16, or quantized (QLoRA):
  ``int8`` with per-output-channel scales, or ``nf4`` (QLoRA's 4-bit NormalFloat, two codes per
  byte, one absmax scale per block of 64 inputs). Layers are dequantized one at a time inside
  the layer scan, so only one layer's weights exist in the compute dtype at once.
* Zero-initialised factor: ``B`` (the up-projection) starts at zero and ``A`` at PEFT's default
  (uniform in ``+-1/sqrt(fan_in)``, i.e. kaiming-uniform with ``a = sqrt(5)``), so the step-0
  policy equals the base bitwise (``x W + s * (x A) 0 == x W``), and the first gradient moves
  ``B`` only (``dL/dA = s * x^T g B^T = 0``). Marin saw LoRA-DPO diverge on TPU when the other
  factor (``A``) was the zero one or both were random: a random ``B`` makes the step-0 policy
  differ from the reference, so the DPO margin starts away from zero. This choice is PEFT's,
  whose exported adapters we load back exactly.
* Adapters carry logical axes (``A``: the weight's input axes + ``lora_rank``; ``B``:
  ``lora_rank`` + the output axes) and shard like the rest; ``lora_rank`` is replicated.

Why not qwix (0.1.8): its LoRA provider intercepts ``dot_general`` / ``einsum`` inside a module
call and finds the weight by matching the right-hand operand against the calling module's own
``nnx.Param`` attributes, creating the adapters lazily on the first call. Our layers run as a
pure function under ``jax.lax.scan`` over stacked ``[L, ...]`` weights: the operand is a scan
slice cast to the compute dtype, not a module attribute, so no adapter is found (and creating
one inside the scan trace is not allowed); lazy creation also does not fit our abstract
(``nnx.eval_shape``) state description, from which the sharded state and the AOT compile are built.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from artifex_dpo.models.config import ModelConfig
from artifex_dpo.models.llama import LlamaModel, decoder_layer, layer_param_shapes, remat_policy, to_jnp_dtype

# DPOTrainer(model=lora_model, reference_model=BASE): the reference is the base, adapters off.
BASE = "base"
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = r"layers/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
# Each projection's einsum in decoder_layer (x spec, weight spec) and its HF module name.
EINSUMS = {
    "q_proj": "btd,dnh->btnh", "k_proj": "btd,dkh->btkh", "v_proj": "btd,dkh->btkh",
    "o_proj": "btnh,nhd->btd", "gate_proj": "btd,df->btf", "up_proj": "btd,df->btf",
    "down_proj": "btf,fd->btd",
}
HF_MODULES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
# NF4 code book (QLoRA, Dettmers et al. 2023, as in bitsandbytes).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
NF4_BLOCK = 64


class FrozenParam(nnx.Variable):
  """A base weight: never differentiated, no optimizer state, not checkpointed."""


class DropoutState(nnx.Variable):
  """Adapter dropout's key data and count of training forwards (checkpointed: resume is bitwise)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter settings (the ``lora.*`` config keys).

  Attributes:
    rank: rank r of the factors (> 0).
    alpha: the update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``).
    targets: regex searched in each layer weight's path (``layers/q_proj``, ...); matching
      projections get adapters.
    dropout: dropout rate on the adapter input (PEFT's ``lora_dropout``), in training steps only.
    base_dtype: storage of the frozen base: float32 | bfloat16 | int8 | nf4.
  """

  rank: int = 16
  alpha: float = 16.0
  targets: str = DEFAULT_TARGETS
  dropout: float = 0.0
  base_dtype: str = "bfloat16"

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first bad field (``LoraConfig.<field>``)."""
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
    if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
      raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
    try:
      pattern = re.compile(self.targets)
    except (re.error, TypeError) as e:
      raise ValueError(f"LoraConfig.targets is not a valid regex ({e})") from None
    if not any(pattern.search(f"layers/{n}") for n in PROJECTIONS):
      raise ValueError(f"LoraConfig.targets {self.targets!r} matches none of "
                       f"{', '.join('layers/' + n for n in PROJECTIONS)}")
    if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"LoraConfig.base_dtype must be one of {BASE_DTYPES}, got {self.base_dtype!r}")

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank

  @property
  def quantized(self) -> bool:
    return self.base_dtype in ("int8", "nf4")

  def target_names(self) -> tuple[str, ...]:
    """The projections that get adapters, in decoder order."""
    pattern = re.compile(self.targets)
    return tuple(n for n in PROJECTIONS if pattern.search(f"layers/{n}"))


# ----------------------------------------------------------------------------- pure functions


def _split_spec(name: str) -> tuple[str, str, str, str]:
  """``(x spec, weight spec, output spec, contracted letters)`` of a projection's einsum."""
  lhs, out = EINSUMS[name].split("->")
  x_spec, w_spec = lhs.split(",")
  return x_spec, w_spec, out, "".join(c for c in w_spec if c in x_spec)


def contract_axes(name: str) -> tuple[int, ...]:
  """The per-layer weight axes a projection contracts (its inputs)."""
  _, w_spec, _, contracted = _split_spec(name)
  return tuple(i for i, c in enumerate(w_spec) if c in contracted)


def adapter_shapes(config: ModelConfig, name: str, rank: int) -> tuple[tuple, tuple, tuple, tuple]:
  """``(A shape, A axes, B shape, B axes)`` of one projection's stacked ``[L, ...]`` factors."""
  shape, axes = layer_param_shapes(config)[name]
  cin = contract_axes(name)
  a_shape = (config.num_layers, *(shape[i] for i in cin), rank)
  a_axes = ("layers", *(axes[i] for i in cin), "lora_rank")
  b_shape = (config.num_layers, rank, *(s for i, s in enumerate(shape) if i not in cin))
  b_axes = ("layers", "lora_rank", *(ax for i, ax in enumerate(axes) if i not in cin))
  return a_shape, a_axes, b_shape, b_axes


def quantize_int8(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 with one float32 scale per output channel (absmax over the ``axes`` inputs)."""
  w = w.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def dequantize_int8(codes: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
  return (codes.astype(jnp.float32) * scale).astype(dtype)


def nf4_block(dim: int) -> int:
  """Block size along a quantized axis: 64, or the largest even divisor of ``dim`` below it."""
  return math.gcd(dim, NF4_BLOCK)


def quantize_nf4(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """NF4 codes (two per uint8, along ``axis``) and float32 absmax scales (one per block along ``axis``).

  Each block of :func:`nf4_block` values along ``axis`` is divided by its absmax and rounded to
  the nearest :data:`NF4_CODE` entry.
  """
  w = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
  dim = w.shape[-1]
  block = nf4_block(dim)
  blocks = w.reshape(*w.shape[:-1], dim // block, block)
  scale = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  scale = jnp.where(scale > 0, scale, 1.0)
  normed = (blocks / scale).reshape(w.shape)
  mid = jnp.asarray((NF4_CODE[1:] + NF4_CODE[:-1]) / 2)
  codes = jnp.searchsorted(mid, normed, side="left").astype(jnp.uint8)
  packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return jnp.moveaxis(packed, -1, axis), jnp.moveaxis(scale[..., 0], -1, axis)


def dequantize_nf4(packed: jax.Array, scale: jax.Array, axis: int, dtype: Any) -> jax.Array:
  packed = jnp.moveaxis(packed, axis, -1)
  scale = jnp.moveaxis(scale, axis, -1)
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
  values = jnp.take(jnp.asarray(NF4_CODE), codes.astype(jnp.int32), axis=0)
  nblocks = scale.shape[-1]
  values = values.reshape(*values.shape[:-1], nblocks, -1) * scale[..., None]
  return jnp.moveaxis(values.reshape(codes.shape), -1, axis).astype(dtype)


def nf4_axis(name: str) -> int:
  """The per-layer axis NF4 blocks run along: the first contracted axis with an even size >= 2."""
  return contract_axes(name)[-1] if name == "o_proj" else contract_axes(name)[0]


# ----------------------------------------------------------------------------- modules


def _float_dtype(lora: LoraConfig) -> Any:
  return jnp.float32 if lora.base_dtype == "float32" else jnp.bfloat16


class LoraDecoderLayers(nnx.Module):
  """Frozen (optionally quantized) stacked layer weights plus stacked LoRA factors."""

  def __init__(self, config: ModelConfig, lora: LoraConfig, base: dict[str, jax.Array], *, rngs: nnx.Rngs):
    self.config, self.lora = config, lora
    self.targets = lora.target_names()
    fdt = _float_dtype(lora)
    for name, (_, axes) in layer_param_shapes(config).items():
      axes = ("layers", *axes)
      value = base[name]
      if lora.quantized and name in PROJECTIONS:
        if lora.base_dtype == "int8":
          codes, scale = quantize_int8(value, tuple(1 + i for i in contract_axes(name)))
          scale_axes = tuple("quant" if (i - 1) in contract_axes(name) else ax for i, ax in enumerate(axes))
        else:
          codes, scale = quantize_nf4(value, 1 + nf4_axis(name))
          scale_axes = axes
        setattr(self, name, FrozenParam(codes, logical_axes=axes))
        setattr(self, f"{name}_scale", FrozenParam(scale, logical_axes=scale_axes))
      else:
        setattr(self, name, FrozenParam(value.astype(fdt), logical_axes=axes))
    adt = to_jnp_dtype(config.param_dtype)
    for name in self.targets:
      a_shape, a_axes, b_shape, b_axes = adapter_shapes(config, name, lora.rank)
      fan_in = math.prod(a_shape[1:-1])
      bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A
      a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound).astype(adt)
      setattr(self, f"{name}_lora_a", nnx.LoRAParam(a, logical_axes=a_axes))
      setattr(self, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros(b_shape, adt), logical_axes=b_axes))

  def dequantized(self, arrays: dict[str, jax.Array], dtype: Any) -> dict[str, jax.Array]:
    """One layer's (or the stacked) base weights in ``dtype`` (``arrays`` from :meth:`stacked`)."""
    out = {}
    for name in layer_param_shapes(self.config):
      v = arrays[name]
      if f"{name}_scale" in arrays:
        scale = arrays[f"{name}_scale"]
        offset = v.ndim - len(layer_param_shapes(self.config)[name][0])  # 1 when stacked
        if self.lora.base_dtype == "int8":
          v = dequantize_int8(v, scale, dtype)
        else:
          v = dequantize_nf4(v, scale, offset + nf4_axis(name), dtype)
      out[name] = v.astype(dtype)
    return out

  def stacked(self) -> dict[str, jax.Array]:
    """The stored stacked base arrays (codes and scales when quantized)."""
    names = list(layer_param_shapes(self.config))
    if self.lora.quantized:
      names += [f"{n}_scale" for n in PROJECTIONS]
    return {n: getattr(self, n)[...] for n in names}

  def adapters(self) -> dict[str, tuple[jax.Array, jax.Array]]:
    return {n: (getattr(self, f"{n}_lora_a")[...], getattr(self, f"{n}_lora_b")[...]) for n in self.targets}

  def __call__(self, x: jax.Array, *, bias: jax.Array, rope: tuple[jax.Array, jax.Array],
               adapters: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
    """The layer scan; each layer is dequantized and (with ``adapters``) gets its low-rank updates.

    ``dropout_key``: drop adapter inputs at ``lora.dropout`` (training forwards only).
    """
    config, scale, rate = self.config, self.lora.scale, self.lora.dropout
    dt = to_jnp_dtype(config.dtype)

    def body(carry, xs):
      base, lora, key = xs
      params = self.dequantized(base, dt)
      lora = {n: (a.astype(dt), b.astype(dt)) for n, (a, b) in lora.items()} if adapters else None
      drop = None if key is None else (rate, key)
      return decoder_layer(carry, params, bias=bias, rope=rope, config=config, lora=lora, lora_scale=scale,
                           lora_dropout=drop), None

    use_ckpt, policy = remat_policy(config.remat)
    if use_ckpt:
      body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    keys = None
    if adapters and dropout_key is not None and rate > 0:
      keys = jax.random.split(dropout_key, config.num_layers)
    xs = (self.stacked(), self.adapters() if adapters else {}, keys)
    x, _ = jax.lax.scan(body, x, xs, unroll=min(config.scan_unroll, config.num_layers))
    return x


class LoraLlamaModel(LlamaModel):
  """A :class:`LlamaModel` whose weights are a frozen base plus LoRA adapters.

  Args:
    config: the model config (``param_dtype`` is the adapters' dtype).
    lora: the adapter settings.
    rngs: initialises the base (when ``base_params`` is None) and the adapters' ``A``.
    base_params: ``nnx.state(LlamaModel(config), nnx.Param)`` of the base weights (e.g. from
      :func:`~artifex_dpo.models.load_hf_params`); None: random (a from-scratch base).
  """

  def __init__(self, config: ModelConfig, lora: LoraConfig, *, rngs: nnx.Rngs, base_params: Any = None):
    super().__init__(config, rngs=rngs)
    if base_params is not None:
      nnx.update(self, base_params)
    self.lora = lora
    fdt = _float_dtype(lora)
    for name in ("embed", "final_norm", "lm_head"):
      var = getattr(self, name)
      if var is not None:
        setattr(self, name, FrozenParam(var[...].astype(fdt), **var.get_metadata()))
    self.layers = LoraDecoderLayers(config, lora, self.layers.stacked(), rngs=rngs)
    if lora.dropout > 0:
      key_data = jax.random.key_data(rngs.params()).astype(jnp.uint32).reshape(-1)
      self.dropout_state = DropoutState(jnp.concatenate([key_data, jnp.zeros((1,), jnp.uint32)]))
    else:
      self.dropout_state = None

  def hidden_states(self, tokens, *, segment_ids=None, positions=None, prefix_ids=None, adapters: bool = True,
                    dropout_key: jax.Array | None = None):
    """As :meth:`LlamaModel.hidden_states`; ``adapters=False`` runs the base alone.

    ``dropout_key`` (training forwards, see :meth:`next_dropout_key`) drops adapter inputs at
    ``lora.dropout``.
    """
    options = {"adapters": adapters}
    if dropout_key is not None and adapters and self.lora.dropout > 0:
      options["dropout_key"] = dropout_key
    return super().hidden_states(tokens, segment_ids=segment_ids, positions=positions, prefix_ids=prefix_ids,
                                 layer_options=options)

  def base_view(self) -> BaseView:
    """The base model (adapters off), sharing this model's weights: the DPO reference."""
    return BaseView(self)

  def next_dropout_key(self) -> jax.Array | None:
    """A fresh adapter-dropout key (advances the counter in :class:`DropoutState`); None without dropout.

    Called once per training step, outside the differentiated function (NNX allows the mutation
    only at the trace level where the model was merged).
    """
    if self.dropout_state is None:
      return None
    state = self.dropout_state[...]
    self.dropout_state.set_value(state.at[-1].add(1))
    return jax.random.fold_in(jax.random.wrap_key_data(state[:-1]), state[-1])

  def training_view(self, dropout_key: jax.Array | None) -> TrainingView:
    """This model with adapter dropout drawn from ``dropout_key``: the policy forward of a training step."""
    return TrainingView(self, dropout_key)


class TrainingView:
  """A :class:`LoraLlamaModel` whose forwards apply adapter dropout (``lora.dropout``)."""

  def __init__(self, model: LoraLlamaModel, dropout_key: jax.Array | None):
    self.model, self.dropout_key = model, dropout_key

  def hidden_states(self, tokens, *, segment_ids=None, positions=None, prefix_ids=None):
    return self.model.hidden_states(tokens, segment_ids=segment_ids, positions=positions, prefix_ids=prefix_ids,
                                    dropout_key=self.dropout_key)

  def unembedding(self) -> jax.Array:
    return self.model.unembedding()


class BaseView:
  """The frozen base of a :class:`LoraLlamaModel` (adapters off), used as the reference model."""

  def __init__(self, model: LoraLlamaModel):
    self.model = model

  def hidden_states(self, tokens, *, segment_ids=None, positions=None, prefix_ids=None):
    return self.model.hidden_states(tokens, segment_ids=segment_ids, positions=positions, prefix_ids=prefix_ids,
                                    adapters=False)

  def unembedding(self) -> jax.Array:
    return self.model.unembedding()

  def __call__(self, tokens, *, segment_ids=None, positions=None, prefix_ids=None) -> jax.Array:
    h = self.hidden_states(tokens, segment_ids=segment_ids, positions=positions, prefix_ids=prefix_ids)
    return jnp.einsum("btd,dv->btv", h, self.unembedding().astype(h.dtype), preferred_element_type=jnp.float32)


def is_lora(model: Any) -> bool:
  return isinstance(model, LoraLlamaModel)


def checkpointed(state: nnx.State) -> nnx.State:
  """The part of a (policy, optimizer) state a checkpoint holds: everything but the frozen base."""
  return state.filter(nnx.Not(FrozenParam))


def frozen(state: nnx.State) -> nnx.State:
  """The frozen base weights of a state (for its fingerprint)."""
  return state.filter(FrozenParam)


def merged_params(model: LoraLlamaModel, dtype: Any = jnp.float32) -> nnx.State:
  """The base with the adapters merged in (``W + s * A B``), as a plain LlamaModel's Param state."""
  layers = model.layers
  base = layers.dequantized(layers.stacked(), jnp.float32)
  for name, (a, b) in layers.adapters().items():
    x_spec, w_spec, _, contracted = _split_spec(name)
    outputs = "".join(c for c in w_spec if c not in contracted)
    delta = jnp.einsum(f"l{contracted}r,lr{outputs}->l{contracted}{outputs}", a.astype(jnp.float32),
                       b.astype(jnp.float32))
    order = "".join(sorted(contracted + outputs, key=w_spec.index))
    delta = jnp.einsum(f"l{contracted}{outputs}->l{order}", delta)
    base[name] = base[name] + layers.lora.scale * delta
  plain = nnx.eval_shape(lambda: LlamaModel(model.config.replace(param_dtype="float32"), rngs=nnx.Rngs(0)))
  values = {("layers", k): v.astype(dtype) for k, v in base.items()}
  values[("embed",)] = model.embed[...].astype(dtype)
  values[("final_norm",)] = model.final_norm[...].astype(dtype)
  if model.lm_head is not None:
    values[("lm_head",)] = model.lm_head[...].astype(dtype)
  flat = [(p, type(v).from_metadata(values[p], v.get_metadata()))
          for p, v in nnx.to_flat_state(nnx.state(plain, nnx.Param))]
  return nnx.from_flat_state(flat)


def merged_model(model: LoraLlamaModel) -> LlamaModel:
  """A plain float32 :class:`LlamaModel` with the adapters merged into the base (for export)."""
  config = model.config.replace(param_dtype="float32")
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, merged_params(model))


# ----------------------------------------------------------------------------- PEFT export


def peft_tensors(model: LoraLlamaModel) -> list[tuple[str, Any]]:
  """``(PEFT tensor name, fetch)`` per layer and adapter: ``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``."""
  from artifex_dpo.models.hf_export import to_host  # noqa: PLC0415 - multi-host gather, shared with export_hf

  out = []
  adapters = model.layers.adapters()
  for i in range(model.config.num_layers):
    for name, (a, b) in adapters.items():
      prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[name]}"
      out.append((f"{prefix}.lora_A.weight", lambda a=a, i=i: to_host(a[i]).reshape(-1, a.shape[-1]).T))
      out.append((f"{prefix}.lora_B.weight", lambda b=b, i=i: to_host(b[i]).reshape(b.shape[1], -1).T))
  return out


def peft_config(model: LoraLlamaModel, base_model_name_or_path: str | None) -> dict[str, Any]:
  """PEFT's ``adapter_config.json`` for the adapters of ``model`` (plain LoRA, no bias, no rsLoRA)."""
  lora = model.lora
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
      "lora_dropout": lora.dropout, "target_modules": sorted(model.layers.targets), "bias": "none",
      "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
      "base_model_name_or_path": base_model_name_or_path,
  }


def export_peft(model: LoraLlamaModel, out_dir: str, *, dtype: str = "float32",
                base_model_name_or_path: str | None = None, info: dict | None = None) -> str:
  """Writes a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`` then
  computes what ``model`` does. ``out_dir`` may be local or ``gs://`` (through ``storage``); it is
  written to a temporary sibling and moved in at the end, with the export marker (``info``: the
  step) written last, as :func:`artifex_dpo.models.hf_export.export_hf` does. With several processes all
  must call it (adapters are gathered); process 0 writes.
  """
  import json  # noqa: PLC0415
  import uuid  # noqa: PLC0415

  from safetensors.numpy import save  # noqa: PLC0415

  from artifex_dpo import storage  # noqa: PLC0415
  from artifex_dpo.models.hf_export import replace_dir  # noqa: PLC0415
  from artifex_dpo.models.hf_layout import EXPORT_INFO_FILE  # noqa: PLC0415

  np_dtype = {"float32": np.float32, "bfloat16": jnp.bfloat16}[dtype]
  data = {name: np.ascontiguousarray(fetch().astype(np_dtype)) for name, fetch in peft_tensors(model)}
  if jax.process_index() != 0:
    return out_dir
  tmp = storage.join(storage.dirname(out_dir), f".{storage.basename(out_dir)}.tmp-{uuid.uuid4().hex[:12]}")
  storage.makedirs(tmp)
  files = {"adapter_model.safetensors": save(data, metadata={"format": "pt"}),
           "adapter_config.json": json.dumps(peft_config(model, base_model_name_or_path), indent=2,
                                             sort_keys=True).encode()}
  for name, payload in files.items():
    storage.write_bytes(storage.join(tmp, name), payload)
  marker = dict(info or {}, files=sorted(files), format="peft")
  storage.write_text(storage.join(tmp, EXPORT_INFO_FILE), json.dumps(marker, indent=2, sort_keys=True) + "\n")
  replace_dir(tmp, out_dir)
  return out_dir
