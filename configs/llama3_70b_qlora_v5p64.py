"""Llama-3.1-70B QLoRA DPO on a v5p-64 slice (32 chips of 95 GiB, topology 2x4x4, 8 hosts): FSDP 8 x tensor 4.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_70b_qlora_v5p64.py --topology=v5p:2x4x4

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/llama3_70b_qlora_v5p64.py --workdir=gs://BUCKET/runs/llama3-70b-qlora \\
        --config.model.hf_checkpoint=/gcs/BUCKET/models/Llama-3.1-70B-Instruct \\
        --config.data.tokenizer=/gcs/BUCKET/models/Llama-3.1-70B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

QLoRA: the layer projections of the base are stored as NF4 (4 bits per weight plus one float32
scale per 64 inputs: 38.5 GB for the 68.5B projection weights), the embedding, output projection
and norms in bf16 (4.2 GB); the base is also the reference (adapters off). Each layer is dequantized
to bf16 inside the layer scan, one layer at a time. Only the rank-16 adapters (~207M parameters,
fp32 + Adam: 3.3 GB in all) are trained. A quarter of the chips of the full-training preset
(llama3_70b_v5p256); the per-device bytes measured by the AOT command are in the README (LoRA section).
"""

from artifex_dpo.config import default_config

SLICE = "v5p-64"          # the slice this config is sized for (launch/gke.py --tpu=v5p-64)
NUM_CHIPS = 32


def get_config():
  c = default_config()
  c.model.preset = "llama3-70b"             # shapes of meta-llama/Llama-3.1-70B; weights from model.hf_checkpoint
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"           # the adapters' master weights
  c.model.ref_dtype = "bfloat16"            # used only with model.ref_hf_checkpoint (else the reference is the base)
  c.model.remat = "full"
  c.lora.rank = 16
  c.lora.alpha = 32.0
  c.lora.base_dtype = "nf4"
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
  c.train.global_batch_size = 64            # pairs per update
  c.train.grad_accum_steps = 8              # microbatches of 8 pairs: one per data x fsdp shard
  c.train.eval_batch_size = 8
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.save_every = 50
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True
  c.mesh.ici.data = 1
  c.mesh.ici.fsdp = -1                      # fills the slice: 32 / 4 = 8
  c.mesh.ici.tensor = 4
  c.mesh.dcn.data = -1
  c.export.hf = True
  c.export.format = "peft"
  c.export.dtype = "bfloat16"
  return c
