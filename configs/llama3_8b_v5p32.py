"""Llama-3.1-8B DPO on a v5p-32 slice (16 chips of 95 GiB, topology 2x2x4, 4 hosts), FSDP over all chips.

Check that the step fits before paying for the slice (compiles on CPU with libtpu):

    python -m artifex_dpo.aot --config=configs/llama3_8b_v5p32.py --topology=v5p:2x2x4

Run (every host runs the same command; launch/gke.py renders it for GKE):

    python -m artifex_dpo.main --config=configs/llama3_8b_v5p32.py --workdir=gs://BUCKET/runs/llama3-8b-dpo \\
        --config.model.hf_checkpoint=/gcs/BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.tokenizer=/gcs/BUCKET/models/Llama-3.1-8B-Instruct \\
        --config.data.train_files='gs://BUCKET/data/prefs/train-*.parquet'

``model.hf_checkpoint`` is a local folder (config.json + *.safetensors): on GKE a bucket mounted
with ``launch/gke.py --gcsfuse=BUCKET`` (at /gcs/BUCKET). ``data.tokenizer`` may be left out: the
checkpoint folder's tokenizer is used. Every key is documented in artifex_dpo/config.py (DOCS).

Memory per chip (FSDP over 16): fp32 master weights + Adam moments + gradients ~ 8.0e9 x 16 B / 16
= 8 GB, bf16 reference 1 GB. With the splash-attention kernel (``model.attention_impl=auto`` on TPU)
the AOT compile puts the whole 128-pair batch in one step, without gradient accumulation, at 58.0 GB
of the chip's 95 GiB (8 pairs = 16 sequences x 4096 tokens per chip). The XLA attention
(``--config.model.attention_impl=xla``) needs 55.5 GB already for 32-pair microbatches
(``train.grad_accum_steps=4``).
"""

from artifex_dpo.config import default_config

SLICE = "v5p-32"          # the slice this config is sized for (launch/gke.py --tpu=v5p-32)
NUM_CHIPS = 16


def get_config():
  c = default_config()
  c.model.preset = "llama3-8b"              # shapes of meta-llama/Llama-3.1-8B; weights from model.hf_checkpoint
  c.model.dtype = "bfloat16"                # compute in bf16 (the MXU's native type)
  c.model.param_dtype = "float32"           # fp32 master weights: at lr 5e-7 a bf16 weight (8-bit mantissa)
                                            # would round most updates away; memory allows it here
  c.model.ref_dtype = "bfloat16"            # the frozen reference only runs forward: bf16 halves it
  c.model.remat = "full"                    # recompute each layer in the backward pass: 4k-token sequences
  c.data.max_length = 4096                  # prompt + response, per side
  c.data.max_prompt_length = 2048
  c.data.truncation_mode = "keep_end"       # keep the end of long (multi-turn) prompts
  c.data.pad_multiple = 1024                # at most 4 batch shapes -> 4 compilations (cached in the workdir)
  c.data.eval_split = 0.02                  # held out when no data.eval_files are given
  c.dpo.beta = 0.1
  c.dpo.loss_type = "sigmoid"
  c.optim.learning_rate = 5e-7              # the usual DPO rate for 7-8B models (Zephyr, Tulu 3)
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 50                 # 10% of the run
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 500                       # ~1 epoch of 64k pairs; raise it for larger sets
  c.train.global_batch_size = 128           # pairs per update
  c.train.grad_accum_steps = 1              # the whole batch at once: 8 pairs per chip (AOT, splash: 58.0 GB)
  c.train.eval_batch_size = 32              # as a microbatch; a multiple of the batch axes (data x fsdp = 16)
  c.train.log_every = 10
  c.train.eval_every = 100
  c.checkpoint.save_every = 50              # ~20 min of v5p-32 time at most lost to a hard failure
  c.checkpoint.max_to_keep = 2              # 8B fp32 params + Adam = 96 GB per checkpoint
  c.checkpoint.async_save = True
  c.mesh.ici.data = 1
  c.mesh.ici.fsdp = -1                      # all 16 chips: 8B fits easily with FSDP alone
  c.mesh.ici.tensor = 1
  c.mesh.dcn.data = -1                      # extra slices (multi-slice) replicate over DCN
  c.export.hf = True                        # workdir/export: HF folder for serving / eval
  c.export.dtype = "bfloat16"
  return c
