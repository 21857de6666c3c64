"""Llama-3.1-8B DPO at 16,384 tokens per sequence on a v5p-32 slice (16 chips of 95 GiB, 2x2x4), FSDP over all chips.

Long-context DPO (multi-turn chats, long documents): llama3_8b_v5p32.py with 4x longer sequences.
It is sized for the Pallas splash-attention kernel (``model.attention_impl=auto``: splash on TPU),
which keeps no ``[T, T]`` scores in HBM in either pass, where the XLA attention's per-query-block scores
grow with T (the README's AOT table).

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_8b_v5p32_16k.py --topology=v5p:2x2x4

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/llama3_8b_v5p32_16k.py --workdir=gs://BUCKET/runs/llama3-8b-dpo-16k \\
        --config.model.hf_checkpoint=gs://BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.tokenizer=gs://BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs-long/train-*.parquet'

Memory per chip: fp32 master weights + Adam moments + gradients 8 GB, bf16 reference 1 GB, and the
activations of two pairs (4 x 16,384 tokens) per chip with full remat: 61.7 GB of the chip's 95 GiB
(AOT, microbatches of 32 pairs; 39.2 GB with 16).

The settings shared with the other TPU presets come from ``artifex_dpo.tpu_presets.tpu_dpo_config``;
``get_config`` sets what is particular to this model and slice.
"""

from artifex_dpo.tpu_presets import tpu_dpo_config

SLICE = "v5p-32"          # the slice this config is sized for (launch/gke.py --tpu=v5p-32)
NUM_CHIPS = 16


def get_config():
  c = tpu_dpo_config("llama3-8b")          # shapes of meta-llama/Llama-3.1-8B; weights from model.hf_checkpoint
  c.model.attention_impl = "auto"           # the splash kernel on TPU (the memory above assumes it)
  c.data.max_length = 16384                 # prompt + response, per side (4x the 4k preset)
  c.data.max_prompt_length = 12288          # long multi-turn prompts; responses keep >= 4096 tokens
  c.data.pad_multiple = 4096                # at most 4 batch shapes -> 4 compilations (cached in the workdir)
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 4              # microbatches of 32 pairs: 2 pairs (4 x 16,384 tokens) per chip
  c.train.eval_batch_size = 16              # as a microbatch; a multiple of the batch axes (data x fsdp = 16)
  c.checkpoint.max_to_keep = 2              # 8B fp32 params + Adam = 96 GB per checkpoint
  c.mesh.ici.fsdp = -1                      # all 16 chips: 8B fits easily with FSDP alone
  c.mesh.ici.tensor = 1
  return c
