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

The settings shared with the other TPU presets come from ``artifex_dpo.tpu_presets.tpu_lora_config``;
``get_config`` sets what is particular to this model and slice.
"""

from artifex_dpo.tpu_presets import tpu_lora_config

SLICE = "v5e-8"           # the slice this config is sized for (launch/gke.py --tpu=v5e-8)
NUM_CHIPS = 8


def get_config():
  c = tpu_lora_config("llama3-8b", base_dtype="bfloat16")  # shapes of meta-llama/Llama-3.1-8B
  c.train.global_batch_size = 32            # pairs per update
  c.train.grad_accum_steps = 32             # microbatches of one pair, shared by the 8 chips
  c.mesh.ici.fsdp = 1
  c.mesh.ici.tensor = 8
  return c
