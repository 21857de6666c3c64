"""Mesh from config, logical-axis rules, and sharded steps equal to the single-device step."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from artifex_dpo import sharding

ROOT = Path(__file__).resolve().parents[1]


def test_mesh_shape_fills_minus_one_and_refuses_mismatch():
  ici = {"data": 1, "fsdp": -1, "tensor": 2}
  dcn = {"data": -1, "fsdp": 1, "tensor": 1}
  assert sharding.mesh_shape(ici, dcn, 16, num_slices=1) == ((1, 8, 2), (1, 1, 1))
  assert sharding.mesh_shape(ici, dcn, 32, num_slices=2) == ((1, 8, 2), (2, 1, 1))
  with pytest.raises(sharding.MeshError, match="mesh.ici"):
    sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, dcn, 8)
  with pytest.raises(sharding.MeshError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, dcn, 8)
  with pytest.raises(sharding.MeshError, match="not divisible"):
    sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 3}, dcn, 8)


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = shape


def test_logical_rules():
  mesh = _FakeMesh(data=2, fsdp=4, tensor=2)
  spec = sharding.logical_to_spec
  assert spec(("layers", "embed", "mlp"), (4, 64, 128), mesh) == P(None, "fsdp", "tensor")
  assert spec(("vocab", "embed"), (512, 64), mesh) == P("tensor", "fsdp")
  assert spec(("layers", "embed", "kv_heads", "head_dim"), (4, 64, 1, 16), mesh) == P(None, "fsdp", None, None)
  assert spec(("embed",), (6,), mesh) == P(None)  # 6 does not divide by fsdp=4: replicated
  assert spec(("batch", None), (16, 8), mesh) == P(("data", "fsdp"), None)
  assert spec(None, (3,), mesh) == P()


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
  out = {}
  tmp = tmp_path_factory.mktemp("mesh")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  for shape in [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]:
    path = tmp / f"{'x'.join(map(str, shape))}.npz"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "mesh_equivalence_worker.py"), str(path),
                           *map(str, shape)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out[shape] = dict(np.load(path))
  return out


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(mesh_results, shape):
  """Same loss (rtol 1e-5) and parameters after two SGD steps (atol 1e-5; SGD, not Adam, whose sign-like first step would magnify summation-order noise) as one device."""
  base, got = mesh_results[(1, 1, 1)], mesh_results[shape]
  assert set(base) == set(got)
  for key in base:
    if key.startswith(("loss", "grad_norm")):
      np.testing.assert_allclose(got[key], base[key], rtol=2e-5, err_msg=key)
    else:
      np.testing.assert_allclose(got[key], base[key], atol=1e-5, err_msg=key)
  # The step really changed the parameters (so equality is not vacuous).
  assert np.abs(base["param/embed"] - base["init/embed"]).max() > 1e-3
