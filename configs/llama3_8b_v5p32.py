"""Llama-3.1-8B DPO on a v5p-32 slice (16 chips of 95 GiB, topology 2x2x4, 4 hosts), FSDP over all chips.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_8b_v5p32.py --topology=v5p:2x2x4

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/llama3_8b_v5p32.py --workdir=gs://BUCKET/runs/llama3-8b-dpo \\
        --config.model.hf_checkpoint=gs://BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.tokenizer=gs://BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

``model.hf_checkpoint`` is a folder (config.json + *.safetensors), local or ``gs://`` (read by byte
range: each host reads only the slices it holds; no gcsfuse mount needed). ``data.tokenizer`` may be left out: the
checkpoint folder's tokenizer is used. Every key is documented in artifex_dpo/config.py (DOCS).

Memory per chip (FSDP over 16): fp32 master weights + Adam moments + gradients ~ 8.0e9 x 16 B / 16
= 8 GB, bf16 reference 1 GB. With the splash-attention kernel (``model.attention_impl=auto`` on TPU)
the AOT compile puts the whole 128-pair batch in one step, without gradient accumulation, at 58.0 GB
of the chip's 95 GiB (8 pairs = 16 sequences x 4096 tokens per chip). The XLA attention
(``--config.model.attention_impl=xla``) needs 55.5 GB already for 32-pair microbatches
(``train.grad_accum_steps=4``).

The settings shared with the other TPU presets come from ``artifex_dpo.tpu_presets.tpu_dpo_config``;
``get_config`` sets what is particular to this model and slice.
"""

from artifex_dpo.tpu_presets import tpu_dpo_config

SLICE = "v5p-32"          # the slice this config is sized for (launch/gke.py --tpu=v5p-32)
NUM_CHIPS = 16


def get_config():
  c = tpu_dpo_config("llama3-8b")          # shapes of meta-llama/Llama-3.1-8B; weights from model.hf_checkpoint
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 1              # the whole batch at once: 8 pairs per chip (AOT, splash: 58.0 GB)
  c.train.eval_batch_size = 32              # as a microbatch; a multiple of the batch axes (data x fsdp = 16)
  c.checkpoint.max_to_keep = 2              # 8B fp32 params + Adam = 96 GB per checkpoint
  c.mesh.ici.fsdp = -1                      # all 16 chips: 8B fits easily with FSDP alone
  c.mesh.ici.tensor = 1
  return c
