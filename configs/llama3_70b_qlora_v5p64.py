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

The settings shared with the other TPU presets come from ``artifex_dpo.tpu_presets.tpu_lora_config``;
``get_config`` sets what is particular to this model and slice.
"""

from artifex_dpo.tpu_presets import tpu_lora_config

SLICE = "v5p-64"          # the slice this config is sized for (launch/gke.py --tpu=v5p-64)
NUM_CHIPS = 32


def get_config():
  c = tpu_lora_config("llama3-70b", base_dtype="nf4")  # shapes of meta-llama/Llama-3.1-70B
  c.train.global_batch_size = 64            # pairs per update
  c.train.grad_accum_steps = 8              # microbatches of 8 pairs: one per data x fsdp shard
  c.mesh.ici.fsdp = -1                      # fills the slice: 32 / 4 = 8
  c.mesh.ici.tensor = 4
  return c
