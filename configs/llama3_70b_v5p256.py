"""Llama-3.1-70B DPO on a v5p-256 slice (128 chips of 95 GiB, topology 4x4x8, 32 hosts): FSDP 32 x tensor 4.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_70b_v5p256.py --topology=v5p:4x4x8

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/llama3_70b_v5p256.py --workdir=gs://BUCKET/runs/llama3-70b-dpo \\
        --config.model.hf_checkpoint=gs://BUCKET/models/Llama-3.1-70B-Instruct \\
        --config.data.tokenizer=gs://BUCKET/models/Llama-3.1-70B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

``model.hf_checkpoint`` is a folder (config.json + *.safetensors), local or ``gs://`` (read by byte
range: each host reads only the slices it holds; no gcsfuse mount needed). ``data.tokenizer`` may be left out: the
checkpoint folder's tokenizer is used.

Why tensor 4: the 8 KV heads, 64 query heads, the 28672-wide MLP and the 128256 vocabulary all
divide by 4, and the tensor axis keeps its all-reduces on the fast ICI within 4 neighbouring chips;
FSDP over the other 32 keeps each chip's share of the weights small. Memory per chip: fp32 master
weights + Adam moments + gradients ~ 70.6e9 x 16 B / 128 = 8.8 GB, bf16 reference 1.1 GB. The AOT
compile, with the splash-attention kernel (``model.attention_impl=auto`` on TPU), puts the step at
45.6 GB of the chip's 95 GiB with microbatches of 64 pairs (two pairs per data x fsdp shard); with
the XLA attention (``--config.model.attention_impl=xla``) 32-pair microbatches already take 49.0 GB.

The settings shared with the other TPU presets come from ``artifex_dpo.tpu_presets.tpu_dpo_config``;
``get_config`` sets what is particular to this model and slice.
"""

from artifex_dpo.tpu_presets import tpu_dpo_config

SLICE = "v5p-256"         # the slice this config is sized for (launch/gke.py --tpu=v5p-256)
NUM_CHIPS = 128


def get_config():
  c = tpu_dpo_config("llama3-70b")         # shapes of meta-llama/Llama-3.1-70B; weights from model.hf_checkpoint
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 2              # microbatches of 64 pairs: 2 per data x fsdp shard (AOT, splash: 45.6 GB)
  c.train.eval_batch_size = 32              # as a microbatch
  c.checkpoint.max_to_keep = 2              # 70B fp32 params + Adam = ~850 GB per checkpoint
  c.mesh.ici.fsdp = -1                      # fills the slice: 128 / 4 = 32
  c.mesh.ici.tensor = 4
  return c
