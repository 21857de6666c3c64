"""The settings the TPU preset configs in ``configs/`` share, so that each preset states only its own.

A preset file stays a plain ml_collections config file (``get_config()``) with the commands that run
it in its docstring; it starts from :func:`tpu_dpo_config` (full training) or :func:`tpu_lora_config`
(LoRA / QLoRA) and sets what is particular to its model and slice: batch sizes, gradient
accumulation, mesh, and anything the slice's memory asks for. Like :mod:`artifex_dpo.config`, this
module imports no JAX.
"""

from __future__ import annotations

import ml_collections

from artifex_dpo.config import default_config


def tpu_dpo_config(preset: str) -> ml_collections.ConfigDict:
  """``default_config()`` with the choices every TPU preset makes for full-weight DPO at 4096 tokens.

  Args:
    preset: The model shape preset (``model.preset``); the weights come from ``model.hf_checkpoint``.

  Returns:
    The config: bf16 compute, fp32 master weights, bf16 reference, full remat; 4096-token pairs;
    sigmoid DPO at beta 0.1 with lr 5e-7 on a cosine schedule; 500 steps, logged every 10, evaluated
    every 100, checkpointed every 50 (asynchronously); a data axis of 1 within the slice and extra
    slices replicating over DCN; an HF export in bf16 at the end. The batch sizes, the gradient
    accumulation and the ``fsdp`` / ``tensor`` axes are left to the preset.
  """
  c = default_config()
  c.model.preset = preset
  c.model.dtype = "bfloat16"                # compute in bf16 (the MXU's native type)
  c.model.param_dtype = "float32"           # fp32 master weights: at lr 5e-7 a bf16 weight (8-bit mantissa)
                                            # would round most updates away
  c.model.ref_dtype = "bfloat16"            # the frozen reference only runs forward: bf16 halves it
  c.model.remat = "full"                    # recompute each layer in the backward pass: long sequences
  c.data.max_length = 4096                  # prompt + response, per side
  c.data.max_prompt_length = 2048
  c.data.truncation_mode = "keep_end"       # keep the end of long (multi-turn) prompts
  c.data.pad_multiple = 1024                # at most 4 batch shapes -> 4 compilations (cached in the workdir)
  c.data.eval_split = 0.02                  # held out when no data.eval_files are given
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.optim.learning_rate = 5e-7              # the usual DPO rate (Zephyr, Tulu 3); large models want small steps
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50                 # 10% of the run
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 500                       # ~1 epoch of 64k pairs at 128 pairs per update; raise it for larger sets
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.save_every = 50              # little slice time lost to a hard failure
  c.checkpoint.async_save = True
  c.mesh.ici.data = 1
  c.mesh.dcn.data = -1                      # extra slices (multi-slice) replicate over DCN
  c.export.hf = True                        # workdir/export: for serving / eval
  c.export.dtype = "bfloat16"
  return c


def tpu_lora_config(preset: str, base_dtype: str) -> ml_collections.ConfigDict:
  """:func:`tpu_dpo_config` for LoRA: rank-16 adapters on every projection, exported for PEFT.

  The frozen base is also the reference (adapters off: no second copy); ``model.ref_dtype`` is used
  only with ``model.ref_hf_checkpoint``. ``model.param_dtype`` (fp32) is the adapters' master weights.

  Args:
    preset: The model shape preset (``model.preset``).
    base_dtype: How the frozen base is stored (``lora.base_dtype``): ``bfloat16``, or ``nf4`` for QLoRA.

  Returns:
    The config, with the adapters' learning rate (5e-6: ~10x the full-weight DPO rate), eval
    microbatches of 8 pairs, three checkpoints kept (adapters + Adam are small) and the adapters
    exported in PEFT's format (``workdir/export``, loadable with peft on the base).
  """
  c = tpu_dpo_config(preset)
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.base_dtype = base_dtype
  c.optim.learning_rate = 5e-6              # adapters take ~10x the full-weight DPO rate
  c.train.eval_batch_size = 8
  c.checkpoint.max_to_keep = 3
  c.export.format = "peft"
  return c
