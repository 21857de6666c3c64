"""One layer's attention (forward + backward) compiled for one TPU chip: XLA path vs splash kernel.

    python benchmarks/attention_aot.py [--topology=v5p:2x2x1] [--length=8192] [--rows=1]

Compiles, with libtpu on this machine (no TPU), ``grad`` of ``sum(attention(q, k, v) * cot)`` at
Llama-3-8B's head shapes (32 query heads, 8 KV heads, head size 128, bf16) over packed rows, for:
the XLA attention (``model.attention_block`` query blocks), the splash kernel with segment ids, and
the splash kernel on shared-prompt rows (``prefix_ids``: two kernel passes merged by log-sum-exp).
Prints one JSON line per variant: temporaries (bytes) from XLA's memory analysis, and the Mosaic
kernel calls in the program. The kernels' FLOPs are not in XLA's cost analysis (custom calls):
the attention FLOPs of a pass follow from the mask (the causal half), twice that for shared prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.pop("JAX_PLATFORMS", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--rows", type=int, default=1)
  p.add_argument("--block", type=int, default=128, help="model.attention_block of the XLA path")
  a = p.parse_args()
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", a.topology.replace(":", "-"))

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from artifex_dpo.models.attention import attention_bias
  from artifex_dpo.models.llama import causal_attention, make_attention_mask
  from artifex_dpo.models.splash import splash_attention

  topo = topologies.get_topology_desc(platform="tpu", topology_name=a.topology)
  mesh = Mesh(np.asarray(topo.devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  b, t, n, kv, h = a.rows, a.length, 32, 8, 128
  rep = NamedSharding(mesh, P())
  arr = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  q, cot = arr((b, t, n, h), jnp.bfloat16), arr((b, t, n, h), jnp.bfloat16)
  k = v = arr((b, t, kv, h), jnp.bfloat16)
  ids = arr((b, t), jnp.int32)

  def xla(q, k, v, seg, prefix, pos):
    bias = attention_bias(make_attention_mask(seg, None, prefix_ids=prefix, positions=pos))
    return causal_attention(q, k, v, bias, a.block)

  def splash(q, k, v, seg, prefix, pos):
    del pos
    return splash_attention(q, k, v, seg, prefix_ids=prefix, mesh=mesh)

  variants = [("xla", xla, False), ("xla shared prompts", xla, True), ("splash", splash, False),
              ("splash shared prompts", splash, True)]
  for name, fn, shared in variants:
    def loss(q, k, v, cot, seg, prefix, pos, fn=fn, shared=shared):
      out = fn(q, k, v, seg, prefix if shared else None, pos if shared else None)
      return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v, cot, ids, ids, ids).compile()
    mem = compiled.memory_analysis()
    print(json.dumps({"variant": name, "topology": a.topology, "rows": b, "length": t,
                      "temp_bytes": int(mem.temp_size_in_bytes),
                      "kernel_calls": compiled.as_text().count('custom_call_target="tpu_custom_call"')}), flush=True)


if __name__ == "__main__":
  main()
