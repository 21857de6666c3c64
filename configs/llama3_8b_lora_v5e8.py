"""Llama-3.1-8B LoRA DPO on one v5e-8 host (8 chips of 16 GiB, topology 2x4): tensor parallelism 8.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_8b_lora_v5e8.py --topology=v5e:2x4

Run (one host):

    python -m artifex_dpo.main --config=configs/llama3_8b_lora_v5e8.py --workdir=gs://BUCKET/runs/llama3-8b-lora \\
        --config.model.hf_checkpoint=/gcs/BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.tokenizer=/gcs/BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

LoRA: the base is frozen in bf16 (16 GB, 2 GB per chip) and is also the reference (adapters off:
no second copy); only the rank-16 adapters on every projection (42M parameters) have gradients and
Adam moments (0.7 GB in all, fp32). The 4096-token activations are the constraint, as for full
training: tensor parallelism over all 8 chips (32 query / 8 KV heads, the 14336-wide MLP and the
128256 vocabulary all divide by 8) lets the 8 chips share each pair, one pair per microbatch. The
per-device bytes measured by the AOT command are in the README (LoRA section), next to full training
of the same model on the same slice.
"""

from artifex_dpo.config import default_config

SLICE = "v5e-8"           # the slice this config is sized for (launch/gke.py --tpu=v5e-8)
NUM_CHIPS = 8


def get_config():
  c = default_config()
  c.model.preset = "llama3-8b"              # shapes of meta-llama/Llama-3.1-8B; weights from model.hf_checkpoint
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"           # the adapters' master weights
  c.model.ref_dtype = "bfloat16"            # used only with model.ref_hf_checkpoint (else the reference is the base)
  c.model.remat = "full"
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.base_dtype = "bfloat16"
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.data.truncation_mode = "keep_end"
  c.data.pad_multiple = 1024
  c.data.eval_split = 0.02
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.optim.learning_rate = 5e-6              # adapters take ~10x the full-weight DPO rate
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 500
  c.train.global_batch_size = 32            # pairs per update
  c.train.grad_accum_steps = 32             # microbatches of one pair, shared by the 8 chips
  c.train.eval_batch_size = 8
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.save_every = 50              # adapters + Adam: ~0.5 GB per checkpoint
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  c.mesh.ici.data = 1
  c.mesh.ici.fsdp = 1
  c.mesh.ici.tensor = 8
  c.mesh.dcn.data = -1
  c.export.hf = True
  c.export.format = "peft"                  # the adapters (workdir/export), loadable with peft on the base
  c.export.dtype = "bfloat16"
  return c
