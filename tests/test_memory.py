"""No [T, V]-sized float32 array in the compiled train step (issue 18), and host-memory helpers.

The step is compiled (never run) for a model whose vocabulary is large next to everything else
(hidden 16, vocabulary 32768, rows of 512 tokens), so one row's float32 logits ``[T, V]`` are the
largest array a step could hold: the optimized HLO's instruction shapes and the step's temporaries
must stay below that. A positive control compiles the same step with one chunk spanning the whole
batch and checks that the detector then finds the ``[B, T, V]`` logits.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from artifex_dpo import memory, sharding
from artifex_dpo import state as state_lib
from artifex_dpo.dpo_config import DPOConfig
from artifex_dpo.models import get_preset

VOCAB, LENGTH, PAIRS = 32768, 512, 2
ROW_LOGITS = LENGTH * VOCAB  # elements of one row's [T, V] logits

_SHAPE = re.compile(r"\bf32\[([0-9,]*)\]")


def _largest_f32(hlo_text: str) -> int:
  """Elements of the largest float32 shape anywhere in the HLO (fusion internals included)."""
  sizes = [math.prod(int(d) for d in m.group(1).split(",") if d) for m in _SHAPE.finditer(hlo_text)]
  return max(sizes)


def _compile_step(chunk_size: int):
  mesh = sharding.make_mesh({"ici": {"data": 1, "fsdp": -1, "tensor": 1}, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}},
                            devices=jax.devices()[:1])
  mcfg = get_preset("llama-tiny", vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, intermediate_size=32, dtype="float32", param_dtype="float32", attention_block=256)
  spec = state_lib.build_state_spec(mcfg, optax.adam(1e-3), mesh, ref_dtype="float32")
  batch = state_lib.abstract_batch(mesh, PAIRS, LENGTH)
  step = state_lib.jit_train_step(spec, DPOConfig(logits_chunk_size=chunk_size), batch)
  with_sharding = lambda tree, sh: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                                tree, sh)
  return step.lower(with_sharding(spec.abstract_state, spec.shardings),
                    with_sharding(spec.abstract_ref, spec.ref_shardings), batch).compile()


def test_compiled_train_step_holds_no_row_of_float32_logits():
  compiled = _compile_step(chunk_size=128)  # 4 rows x 32 positions per chunk
  largest = _largest_f32(compiled.as_text())
  assert largest < ROW_LOGITS, f"a float32 array of {largest} elements >= [T, V] = {ROW_LOGITS}"
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < ROW_LOGITS * 4, (temp, ROW_LOGITS * 4)

  # Positive control: one chunk over the whole batch materialises [B, T, V] and is caught.
  whole = _compile_step(chunk_size=2 * PAIRS * LENGTH)
  assert _largest_f32(whole.as_text()) >= 2 * PAIRS * ROW_LOGITS
  assert whole.memory_analysis().temp_size_in_bytes >= ROW_LOGITS * 4


def test_chunk_size_counts_tokens_per_device():
  """Each device's chunk holds about logits_chunk_size tokens, whatever its rows."""
  from artifex_dpo.losses import chunk_positions

  assert chunk_positions(rows=4, seq_len=4032, chunk_size=512) == 128
  assert chunk_positions(rows=1, seq_len=4032, chunk_size=512) == 512
  assert chunk_positions(rows=1024, seq_len=64, chunk_size=512) == 1  # at least one position
  assert chunk_positions(rows=1, seq_len=100, chunk_size=512) == 100  # at most the row
  mesh = sharding.make_mesh({"ici": {"data": 1, "fsdp": -1, "tensor": 1}, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}},
                            devices=jax.devices()[:1])
  assert state_lib.per_device_chunks(DPOConfig(logits_chunk_size=300), mesh).logits_chunk_size == 300


def test_release_freed_heap_and_peak_rss():
  before = memory.peak_rss_bytes()
  block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
  assert memory.peak_rss_bytes() >= before and memory.peak_rss_bytes() >= block.nbytes
  del block
  assert memory.release_freed_heap() in (True, False)
  f = jax.jit(lambda x: x * 2)
  compiled = memory.compile_now(f, jnp.arange(3.0))
  np.testing.assert_array_equal(np.asarray(compiled(jnp.arange(3.0))), [0.0, 2.0, 4.0])


if __name__ == "__main__":
  pytest.main([__file__, "-q"])


def test_blocked_attention_holds_one_block_of_scores_at_a_time():
  """The query blocks of causal_attention run one after another, forward and backward.

  8 blocks of 128 queries: all their score matrices together are 4.5x the largest one; XLA:CPU
  used to schedule them all at once (and to keep the forward's scores for the backward).
  """
  from artifex_dpo.models import llama
  from artifex_dpo.models.attention import attention_bias

  b, t, n, k, h, block = 2, 1024, 2, 1, 8, 128

  def loss(q, kk, v, seg):
    bias = attention_bias(llama.make_attention_mask(seg, None))
    return jnp.sum(llama.causal_attention(q, kk, v, bias, block) ** 2)

  q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
  kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)
  scores_block = b * n * block * t * 4  # the largest block's float32 scores
  bias = b * t * t * 4
  for fn in (loss, jax.grad(loss, (0, 1, 2))):
    temp = jax.jit(fn).lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes
    assert temp < bias + 2 * scores_block, (fn, temp, bias, scores_block)
