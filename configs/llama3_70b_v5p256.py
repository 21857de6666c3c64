"""Llama-3.1-70B DPO on a v5p-256 slice (128 chips of 95 GiB, topology 4x4x8, 32 hosts): FSDP 32 x tensor 4.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_70b_v5p256.py --topology=v5p:4x4x8

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/llama3_70b_v5p256.py --workdir=gs://BUCKET/runs/llama3-70b-dpo \\
        --config.model.hf_checkpoint=/gcs/BUCKET/models/Llama-3.1-70B-Instruct \\
        --config.data.tokenizer=/gcs/BUCKET/models/Llama-3.1-70B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

``model.hf_checkpoint`` is a local folder (config.json + *.safetensors): on GKE a bucket mounted
with ``launch/gke.py --gcsfuse=BUCKET`` (at /gcs/BUCKET). ``data.tokenizer`` may be left out: the
checkpoint folder's tokenizer is used.

Why tensor 4: the 8 KV heads, 64 query heads, the 28672-wide MLP and the 128256 vocabulary all
divide by 4, and the tensor axis keeps its all-reduces on the fast ICI within 4 neighbouring chips;
FSDP over the other 32 keeps each chip's share of the weights small. Memory per chip: fp32 master
weights + Adam moments + gradients ~ 70.6e9 x 16 B / 128 = 8.8 GB, bf16 reference 1.1 GB. The AOT
compile, with the splash-attention kernel (``model.attention_impl=auto`` on TPU), puts the step at
45.6 GB of the chip's 95 GiB with microbatches of 64 pairs (two pairs per data x fsdp shard); with
the XLA attention (``--config.model.attention_impl=xla``) 32-pair microbatches already take 49.0 GB.
"""

from artifex_dpo.config import default_config

SLICE = "v5p-256"         # the slice this config is sized for (launch/gke.py --tpu=v5p-256)
NUM_CHIPS = 128


def get_config():
  c = default_config()
  c.model.preset = "llama3-70b"             # shapes of meta-llama/Llama-3.1-70B; weights from model.hf_checkpoint
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"           # fp32 master weights: bf16 would round lr-5e-7 updates away
  c.model.ref_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.max_length = 4096
  c.data.max_prompt_length = 2048
  c.data.truncation_mode = "keep_end"
  c.data.pad_multiple = 1024                # at most 4 batch shapes -> 4 compilations (cached in the workdir)
  c.data.eval_split = 0.02
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.optim.learning_rate = 5e-7              # the low end of the usual DPO range; 70B models want small steps
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 500
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 2              # microbatches of 64 pairs: 2 per data x fsdp shard (AOT, splash: 45.6 GB)
  c.train.eval_batch_size = 32              # as a microbatch
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.save_every = 50
  c.checkpoint.max_to_keep = 2              # 70B fp32 params + Adam = ~850 GB per checkpoint
  c.checkpoint.async_save = True
  c.mesh.ici.data = 1
  c.mesh.ici.fsdp = -1                      # fills the slice: 128 / 4 = 32
  c.mesh.ici.tensor = 4
  c.mesh.dcn.data = -1
  c.export.hf = True
  c.export.dtype = "bfloat16"
  return c
