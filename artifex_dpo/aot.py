"""Compile the real train step for a TPU slice on any machine: does a preset fit, and how fast can it go?

    python -m artifex_dpo.aot --config=configs/llama3_8b_v5p32.py --topology=v5p:2x2x4 [--num_slices=N]

Needs ``libtpu`` (``pip install '.[tpu]'``), no TPU. Builds the configured mesh over the
topology's devices, the abstract sharded state (policy, optimizer, reference) and the train step
exactly as the training run does, compiles it with XLA's TPU compiler, and prints one JSON line:
``topology``, ``devices``, ``per_device_bytes`` (arguments + temporaries + outputs - aliased),
``hbm_bytes`` of that chip, ``fits``, ``flops_per_device`` (XLA's cost analysis),
``model_flops_per_step`` (ours, analytic), ``roofline_step_s`` (a lower bound on the step time
from the chip's peak FLOP/s and HBM bandwidth), ``attention`` (``model.attention_impl`` resolved for
a TPU: ``auto`` compiles the Pallas splash kernel) and ``kernel_calls`` (Mosaic kernels in the
compiled step). Exit code 2 on a bad config.
"""

from __future__ import annotations

import json
import os
import sys
import time

# libtpu looks for TPU hosts at start-up; on a machine without TPUs these quiet it down.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Compiling needs no exclusive TPU access: don't fail on another process's libtpu lock.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags
from ml_collections import config_flags

from artifex_dpo import tpu_chips

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5p:2x2x4 (v5p-32) or v5e:4x4 (v5e-16).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN).")

def chip_of(topology: str) -> str:
  name = tpu_chips.canonical_name(topology.split(":")[0])
  if name not in tpu_chips.CHIPS:
    raise ValueError(f"--topology {topology!r}: unknown TPU generation; known: {', '.join(tpu_chips.CHIPS)}")
  return name


def abstract_unpaired_batch(mesh, global_batch: int, length: int, *, with_kl: bool):
  """KTO's train batch as ShapeDtypeStructs sharded like the service's (``state.global_batch``).

  Args:
    mesh: The mesh over the topology's devices.
    global_batch: ``train.global_batch_size`` (examples).
    length: The padded row length (``data.max_length``).
    with_kl: ``kto``: each example's KL row (its prompt + another example's completion) rides along;
      ``apo_zero_unpaired`` has none.

  Returns:
    ``(UnpairedBatch, rows)``: the batch (no ``example_mask``: training batches have no filler) and the
    sequences per example the policy runs (2 with KL rows, else 1).
  """
  import jax
  import jax.numpy as jnp

  from artifex_dpo import sharding
  from artifex_dpo.types import GeneratedSequenceBatch, UnpairedBatch

  def arr(shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh, len(shape)))

  def rows():
    shape = (global_batch, length)
    return GeneratedSequenceBatch(sequences=arr(shape), response_mask=arr(shape), segment_ids=arr(shape))

  batch = UnpairedBatch(completions=rows(), labels=arr((global_batch,)), kl=rows() if with_kl else None)
  return batch, 2 if with_kl else 1


def compile_for_topology(c, topology: str, num_slices: int = 1) -> dict:
  """Compiles the configured train step for ``topology`` and returns the report (see module doc)."""
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.replace(":", "-"))
  import jax
  from jax.experimental import topologies

  from artifex_dpo import config as config_lib
  from artifex_dpo import sharding
  from artifex_dpo import state as state_lib
  from artifex_dpo.models import forward_flops_per_token
  from artifex_dpo.setup import build_model_config, build_optimizer

  chip = tpu_chips.CHIPS[chip_of(topology)]
  hbm, peak, bandwidth = chip.hbm_bytes, chip.peak_flops, chip.hbm_bandwidth
  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices)
  devices = list(topo.devices)
  try:
    mesh = sharding.make_mesh(c.mesh, devices=devices)
  except sharding.MeshError as e:
    raise config_lib.ConfigError("mesh", str(e)) from None
  mcfg = build_model_config(c, platform="tpu")  # model.attention_impl=auto: the splash kernel
  dpo_cfg = config_lib.dpo_config(c)
  tx, _ = build_optimizer(c)
  keep_ref = dpo_cfg.needs_reference and not c.dpo.precompute_ref_logps
  lora = config_lib.lora_config(c)
  spec = state_lib.build_state_spec(mcfg, tx, mesh, init_seed=c.model.init_seed,
                                    ref_dtype=c.model.ref_dtype if keep_ref else None, lora=lora,
                                    reference_is_base=not c.model.ref_hf_checkpoint)
  length = c.data.max_length
  layout = batch_layout(c, mesh)
  rows = 2  # sequences per batch entry through the policy: chosen + rejected
  if dpo_cfg.unpaired:  # KTO: labelled completions (+ their KL rows), padded
    if layout["layout"] != "padded":
      raise config_lib.ConfigError("data.pack_batches", "the AOT compile of unpaired (KTO) batches is padded only: "
                                                        "set data.pack_batches=False")
    batch, rows = abstract_unpaired_batch(mesh, c.train.global_batch_size, length,
                                          with_kl="kto" in dpo_cfg.loss_types)
  elif layout["layout"] == "padded":
    batch = state_lib.abstract_batch(mesh, c.train.global_batch_size, length)
  else:
    batch = abstract_packed_batch(mesh, layout["rows_per_step"], layout["row_length"], layout["pairs_per_row"],
                                  share_prompt=bool(c.data.share_prompt),
                                  with_reference=dpo_cfg.needs_reference and not keep_ref)
  step = state_lib.jit_train_step(spec, dpo_cfg, batch, grad_accum_steps=c.train.grad_accum_steps)
  with_sharding = lambda tree, sh: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
  state = with_sharding(spec.abstract_state, spec.shardings)
  # None also for LoRA's base reference (the policy's own frozen weights, adapters off).
  ref = with_sharding(spec.abstract_ref, spec.ref_shardings) if spec.abstract_ref is not None else None
  t0 = time.time()
  compiled = step.lower(state, ref, batch).compile()
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes)
  # Pallas kernels (splash attention) compiled into the step: Mosaic custom calls in the TPU program.
  kernel_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops_per_device = float(cost.get("flops", 0.0))
  bytes_per_device = float(cost.get("bytes accessed", 0.0))
  # The pairs' (examples') tokens at data.max_length (every layout holds them; data.packing: its rows' tokens).
  tokens = layout["rows_per_step"] * layout["row_length"] if c.data.packing else rows * c.train.global_batch_size * length
  policy = 2.0 if lora is not None else 3.0  # LoRA: no gradient of the frozen base weights
  model_flops = tokens * forward_flops_per_token(mcfg, length) * (policy + (1.0 if keep_ref else 0.0))
  roofline = max(model_flops / (peak * len(devices)), flops_per_device / peak, bytes_per_device / bandwidth)
  return {
      "topology": topology,
      "attention": mcfg.attention_impl,
      "kernel_calls": kernel_calls,
      "num_slices": num_slices,
      "devices": len(devices),
      "mesh": dict(mesh.shape),
      "per_device_bytes": int(per_device),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "hbm_bytes": hbm,
      "fits": bool(per_device <= hbm),
      "flops_per_device": flops_per_device,
      "model_flops_per_step": model_flops,
      "tokens_per_step": tokens,
      "roofline_step_s": roofline,
      "compile_s": round(compile_s, 1),
      **layout,
  }


def batch_layout(c, mesh) -> dict:
  """The compiled batch shape: ``layout`` (padded | pack_batches | packing, ``+share_prompt``),
  ``rows_per_step``, ``row_length`` and ``pairs_per_row`` (packed rows' slots; padded: 1).

  ``data.pack_batches`` compiles `row_budget_bound` rows: the config's bound, which holds any
  global batch, so the report is an upper bound for every data set (a run packs its own data into
  at most that many rows). ``data.packing`` compiles ``train.global_batch_size`` rows.
  """
  from artifex_dpo import sharding
  from artifex_dpo.data.packing import default_max_pairs_per_row, row_budget_bound

  if not (c.data.packing or c.data.pack_batches):
    return {"layout": "padded", "rows_per_step": 2 * c.train.global_batch_size, "row_length": c.data.max_length,
            "pairs_per_row": 1}
  row_length = c.data.pack_length or 2 * c.data.max_length
  pairs_per_row = c.data.max_pairs_per_row or default_max_pairs_per_row(row_length)
  if c.data.packing:
    rows, name = c.train.global_batch_size, "packing"
  else:  # as the loader (train.py): a multiple of the batch shards x grad_accum_steps, and of the hosts
    hosts = len({getattr(d, "process_index", 0) for d in mesh.devices.flat})
    multiple = max(1, sharding.batch_parallelism(mesh) // hosts) * c.train.grad_accum_steps * hosts
    rows = row_budget_bound(c.train.global_batch_size, c.data.max_length, row_length, pairs_per_row, multiple)
    name = "pack_batches"
  return {"layout": name + ("+share_prompt" if c.data.share_prompt else ""), "rows_per_step": rows,
          "row_length": row_length, "pairs_per_row": pairs_per_row}


def abstract_packed_batch(mesh, rows: int, row_length: int, pairs_per_row: int, *, share_prompt: bool,
                          with_reference: bool):
  """A PackedPreferenceBatch of ShapeDtypeStructs sharded like the loader's packed batches.

  Args:
    mesh: the mesh (rows over its batch axes).
    rows: packed rows per step.
    row_length: tokens per row.
    pairs_per_row: pair slots per row (``pair_mask``'s width).
    share_prompt: the shared-prompt layout (``positions`` and ``prefix_ids`` come with it).
    with_reference: precomputed reference log-probs ride along (``dpo.precompute_ref_logps``).
  """
  import jax
  import jax.numpy as jnp

  from artifex_dpo import sharding
  from artifex_dpo.types import PackedPreferenceBatch

  def arr(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

  tokens = (rows, row_length)
  return PackedPreferenceBatch(
      sequences=arr(tokens), segment_ids=arr(tokens), response_mask=arr(tokens), pair_mask=arr((rows, pairs_per_row)),
      reference_sequence_log_probs=arr((rows, pairs_per_row, 2), jnp.float32) if with_reference else None,
      positions=arr(tokens) if share_prompt else None, prefix_ids=arr(tokens) if share_prompt else None)


def main(argv):
  del argv
  from artifex_dpo import config as config_lib

  c = _CONFIG.value
  try:
    config_lib.validate(c, check_files=False)
    report = compile_for_topology(c, _TOPOLOGY.value, _NUM_SLICES.value)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"artifex_dpo.aot: error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
  app.run(main)
