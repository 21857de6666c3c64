"""Qwen2-7B DPO on a v5e-64 slice (64 chips of 16 GiB, topology 8x8, 16 hosts): FSDP 16 x tensor 4.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/qwen2_7b_v5e64.py --topology=v5e:8x8

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/qwen2_7b_v5e64.py --workdir=gs://BUCKET/runs/qwen2-7b-dpo \\
        --config.model.hf_checkpoint=/gcs/BUCKET/models/Qwen2-7B-Instruct \\
        --config.data.tokenizer=/gcs/BUCKET/models/Qwen2-7B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

``model.hf_checkpoint`` is a local folder (config.json + *.safetensors): on GKE a bucket mounted
with ``launch/gke.py --gcsfuse=BUCKET`` (at /gcs/BUCKET). ``data.tokenizer`` may be left out: the
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
"""

from artifex_dpo.config import default_config

SLICE = "v5e-64"          # the slice this config is sized for (launch/gke.py --tpu=v5e-64)
NUM_CHIPS = 64


def get_config():
  c = default_config()
  c.model.preset = "qwen2-7b"               # shapes of Qwen/Qwen2-7B; weights from model.hf_checkpoint
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"           # fits (1.9 GB/chip with Adam, see above); bf16 loses small updates
  c.model.ref_dtype = "bfloat16"
  c.model.remat = "full"                    # 16 GiB chips: keep only each layer's input
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.data.truncation_mode = "keep_end"
  c.data.pad_multiple = 1024
  c.data.eval_split = 0.02
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.dpo.logits_chunk_size = 256             # positions per chunk of the 152064-wide output projection
  c.optim.learning_rate = 5e-7
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 500
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 4              # microbatches of 32 pairs: 2 per data x fsdp shard (AOT, splash: 9.6 GB)
  c.train.eval_batch_size = 16              # as a microbatch
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.save_every = 50
  c.checkpoint.max_to_keep = 2
  c.checkpoint.async_save = True
  c.mesh.ici.data = 1
  c.mesh.ici.fsdp = -1                      # fills the slice: 64 / 4 = 16
  c.mesh.ici.tensor = 4                     # 4 chips share each pair's activations (see above)
  c.mesh.dcn.data = -1
  c.export.hf = True
  c.export.dtype = "bfloat16"
  return c
