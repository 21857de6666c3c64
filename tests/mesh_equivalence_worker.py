"""Runs two DPO steps of llama-tiny on a given mesh and saves loss + parameters (run by test_sharding).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_equivalence_worker.py OUT.npz d f t
"""

import sys

import jax
import numpy as np
import optax
from flax import nnx

from artifex_dpo import DPOConfig, sharding
from artifex_dpo import state as state_lib
from artifex_dpo.models import get_preset


def main(out, d, f, t):
  devices = jax.devices()[: d * f * t]
  mesh = sharding.make_mesh({"ici": {"data": d, "fsdp": f, "tensor": t}, "dcn": {"data": 1, "fsdp": 1, "tensor": 1}},
                            devices=devices)
  mcfg = get_preset("llama-tiny", vocab_size=64, num_heads=4, num_kv_heads=2)
  spec = state_lib.build_state_spec(mcfg, optax.sgd(0.5), mesh, init_seed=0, ref_dtype="float32")
  state = state_lib.init_state(spec)
  ref = state_lib.init_reference(spec, state)
  rng = np.random.default_rng(0)
  results = {"init/embed": np.asarray(nnx.merge(spec.graphdef, state)[0].embed.get_value())}
  for step in range(2):
    b = 8
    local = {"pair_mask": np.ones(b, np.int32)}
    for side in ("chosen", "rejected"):
      tokens = rng.integers(0, 64, (b, 16)).astype(np.int32)
      seg = np.ones_like(tokens)
      seg[:, 12 + step:] = 0  # right padding
      resp = np.zeros_like(tokens)
      resp[:, 5:12 + step] = 1
      local.update({f"{side}_tokens": tokens, f"{side}_segment_ids": seg, f"{side}_response_mask": resp})
    batch = state_lib.global_batch(local, mesh, with_pair_mask=False)
    fn = state_lib.jit_train_step(spec, DPOConfig(beta=0.5), batch)
    with mesh:
      state, m = fn(state, ref, batch)
    results[f"loss{step}"] = np.asarray(m["loss"])
    results[f"grad_norm{step}"] = np.asarray(m["grad_norm"])
  # Every array really is sharded as the rules say (checked through .sharding).
  params = nnx.state(nnx.merge(spec.graphdef, state)[0], nnx.Param)
  for path, v in nnx.to_flat_state(params):
    expected = sharding.logical_to_spec(v.get_metadata()["logical_axes"], v.get_value().shape, mesh)
    assert v.get_value().sharding.spec == expected, (path, v.get_value().sharding, expected)
    results["param/" + "/".join(map(str, path))] = np.asarray(v.get_value())
  for path, v in nnx.to_flat_state(ref):
    assert v.get_value().sharding.spec == sharding.logical_to_spec(
        v.get_metadata()["logical_axes"], v.get_value().shape, mesh), path
  np.savez(out, **results)


if __name__ == "__main__":
  main(sys.argv[1], *map(int, sys.argv[2:5]))
