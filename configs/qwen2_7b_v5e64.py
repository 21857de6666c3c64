"""Qwen2-7B DPO on a v5e-64 slice (64 chips of 16 GiB, topology 8x8, 16 hosts): FSDP 16 x tensor 4.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/qwen2_7b_v5e64.py --topology=v5e:8x8

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/qwen2_7b_v5e64.py --workdir=gs://BUCKET/runs/qwen2-7b-dpo \\
        --config.model.hf_checkpoint=gs://BUCKET/models/Qwen2-7B-Instruct \\
        --config.data.tokenizer=gs://BUCKET/models/Qwen2-7B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

``model.hf_checkpoint`` is a folder (config.json + *.safetensors), local or ``gs://`` (read by byte
range: each host reads only the slices it holds; no gcsfuse mount needed). ``data.tokenizer`` may be left out: the
checkpoint folder's tokenizer is used.

16 GiB per chip is the constraint. The weights are not the problem: over 64 chips the policy's fp32
weights + Adam moments + gradients take 7.6e9 x 16 B / 64 = 1.9 GB per chip and the bf16
reference 0.24 GB. bf16 parameters would save under 1 GB per chip and round lr-5e-7 updates away
(a bf16 weight of 0.02 moves in steps of 1.2e-4), so they stay fp32. The activations are the problem: with
FSDP over all 64 chips, one pair (2 x 4096 tokens) per chip needs 60 GB of temporaries (AOT
compile, full remat). Tensor parallelism 4 (28 query / 4 KV heads, the 18944-wide MLP and the
152064 vocabulary all divide by 4) lets 4 chips share each pair. With the XLA attention
(``--config.model.attention_impl=xla``) microbatches of 16 pairs, one per data x fsdp shard, take
14.25 GiB of the 15.75 GiB XLA can use (AOT), without much room. The splash-attention kernel
(``model.attention_impl=auto`` on TPU) keeps no attention scores in HBM: 16-pair microbatches take
6.8 GB, and the preset uses 32-pair microbatches (two pairs per data x fsdp shard): 9.6 GB
(8.95 GiB; AOT). Check with the AOT command after any change to max_length, batch or mesh.

The settings shared with the other TPU presets come from ``artifex_dpo.tpu_presets.tpu_dpo_config``;
``get_config`` sets what is particular to this model and slice.
"""

from artifex_dpo.tpu_presets import tpu_dpo_config

SLICE = "v5e-64"          # the slice this config is sized for (launch/gke.py --tpu=v5e-64)
NUM_CHIPS = 64


def get_config():
  c = tpu_dpo_config("qwen2-7b")           # shapes of Qwen/Qwen2-7B; weights from model.hf_checkpoint
  c.dpo.logits_chunk_size = 512             # tokens per device per chunk of the 152064-wide output projection
                                            # (2 rows x 256 positions)
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 4              # microbatches of 32 pairs: 2 per data x fsdp shard (AOT, splash: 9.6 GB)
  c.train.eval_batch_size = 16              # as a microbatch
  c.checkpoint.max_to_keep = 2
  c.mesh.ici.fsdp = -1                      # fills the slice: 64 / 4 = 16
  c.mesh.ici.tensor = 4                     # 4 chips share each pair's activations (see above)
  return c
