"""The CPU default: trains llama-tiny on the built-in synthetic preference set in a few minutes.

    python -m artifex_dpo.main --config=configs/tiny.py --workdir=/tmp/artifex-tiny

Held-out eval/rewards/accuracies reaches >= 0.9. Every key is documented in
artifex_dpo/config.py (DOCS) and in the README; override any with --config.a.b=value.
"""

from artifex_dpo.config import default_config


def get_config():
  c = default_config()
  c.model.preset = "llama-tiny"            # hidden 64, 2 layers: fits any CPU
  c.data.tokenizer = "byte"                 # built-in byte tokenizer (259 ids)
  c.data.synthetic_pairs = 1024             # no train_files: the built-in learnable set
  c.data.eval_split = 0.125                 # 128 held-out pairs
  c.data.max_length = 64
  c.data.max_prompt_length = 32
  c.data.pad_multiple = 16
  c.dpo.beta = 0.1
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 10
  c.optim.weight_decay = 0.0
  c.train.steps = 150
  c.train.global_batch_size = 16
  c.train.eval_batch_size = 32
  c.train.log_every = 10
  c.train.eval_every = 50
  c.checkpoint.save_every = 50
  c.export.hf = True
  return c
