"""Throughput, MFU and memory of the real training step on a config (a benchmark, never a test).

    python benchmarks/step_throughput.py --config=configs/tiny.py --workdir=/tmp/bench [--steps=12]
    python benchmarks/step_throughput.py --workload=WL --workdir=/tmp/bench [--config.data.packing=True ...]

``--workload=WL`` runs the standard comparison workload (``../shared/bench/make_workload.py WL``):
its Llama in HF format, its tokenizer and prefs.jsonl, batch 8 pairs, max length 256, beta 0.1,
float32 (the same settings as ``peer_trl.py``). Prints one JSON line: ``tokens_per_s`` (non-padding
tokens, chosen and rejected sides), ``step_s`` (median), ``mfu`` (model FLOPs: policy forward +
backward, reference forward unless precomputed, attention included; over a float32 matmul peak
measured in the same run on CPU, the published bf16 peak on TPU/GPU), ``matmul_peak_flops`` and the
compiled step's memory (``jax.jit(...).lower(...).compile().memory_analysis()``).

Every batch shape is compiled in a warm-up pass over the same steps first, so compile time is
excluded; the timed pass replays those steps.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/artifex-bench", "Scratch folder (reference cache, compile cache).")
_WORKLOAD = flags.DEFINE_string("workload", None, "Standard workload folder (make_workload.py output).")
_STEPS = flags.DEFINE_integer("steps", 12, "Timed steps.")
_LABEL = flags.DEFINE_string("label", "", "A name for this run in the output.")


def apply_workload(c, wl: str) -> None:
  """The standard workload's settings (model.json), as peer_trl.py uses them."""
  m = json.load(open(os.path.join(wl, "model.json")))
  c.model.hf_checkpoint = os.path.join(wl, "hf_model")
  c.model.preset = "llama-tiny"
  c.data.tokenizer = os.path.join(wl, "hf_model")
  c.data.train_files = os.path.join(wl, "prefs.jsonl")
  c.data.max_length = m["max_length"]
  c.data.max_prompt_length = m["max_length"] // 2
  c.data.eval_split = 0.0
  c.train.global_batch_size = m["batch_pairs"]
  c.train.eval_batch_size = m["batch_pairs"]
  c.dpo.beta = m["beta"]
  c.model.dtype = c.model.param_dtype = c.model.ref_dtype = "float32"
  c.optim.learning_rate = 1e-5


def main(argv):
  del argv
  import jax

  from artifex_dpo import config as config_lib
  from artifex_dpo import metrics as metrics_lib
  from artifex_dpo import state as state_lib
  from artifex_dpo.setup import build

  logging.set_verbosity(logging.WARNING)
  c = _CONFIG.value
  if _WORKLOAD.value:
    apply_workload(c, _WORKLOAD.value)
  config_lib.validate(c)
  peak = metrics_lib.measure_matmul_peak(size=2048) if jax.default_backend() == "cpu" else metrics_lib.device_peak_flops()[0]
  setup = build(c, _WORKDIR.value)
  steps = _STEPS.value
  compiled, memory = {}, {}

  def run_steps(state, timed: bool):
    times, tokens, flops = [], 0.0, 0.0
    for _, local in setup.loader(c, start_step=0, num_steps=steps):
      batch = state_lib.global_batch(local, setup.mesh, with_pair_mask=False, reference_table=setup.train_ref)
      key = tuple(x.shape for x in jax.tree.leaves(batch))
      if key not in compiled:
        fn = state_lib.jit_train_step(setup.spec, setup.dpo_config, batch, grad_accum_steps=c.train.grad_accum_steps)
        compiled[key] = fn.lower(state, setup.ref_state, batch).compile()
        m = compiled[key].memory_analysis()
        total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        if total > memory.get("total_bytes", 0):
          memory.update(total_bytes=int(total), temp_bytes=int(m.temp_size_in_bytes),
                        argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes))
      t = time.perf_counter()
      state, metrics = compiled[key](state, setup.ref_state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
      n_tok, _, n_flops = setup.step_flops(local, c)
      tokens += n_tok
      flops += n_flops
    return state, times, tokens, flops

  state, _, _, _ = run_steps(setup.state, timed=False)  # compiles every shape
  state, times, tokens, flops = run_steps(state, timed=True)
  total = sum(times)
  print(json.dumps({
      "label": _LABEL.value,
      "tokens_per_s": round(tokens / total, 1),
      "step_s": round(statistics.median(times), 4),
      "mfu": round(flops / total / (peak * jax.device_count()), 4),
      "matmul_peak_flops": round(peak),
      "steps_timed": len(times),
      "packing": bool(c.data.packing),
      "precompute_ref_logps": bool(c.dpo.precompute_ref_logps),
      "reference_in_memory": setup.ref_state is not None,
      "lora_rank": int(c.lora.rank),
      "lora_base_dtype": c.lora.base_dtype if c.lora.rank else None,
      "memory": memory,
      "devices": jax.device_count(),
      "backend": jax.default_backend(),
  }), flush=True)


if __name__ == "__main__":
  from artifex_dpo import hugepages

  hugepages.reexec_if_wanted()  # as the service does (artifex_dpo/main.py)
  app.run(main)
