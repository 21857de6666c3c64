"""The tensor layout table and byte-range reads (column slices read about the slice's bytes)."""

import itertools

import numpy as np
import pytest
from safetensors.numpy import save_file

from artifex_dpo import storage
from artifex_dpo.models.hf_layout import LAYOUTS
from artifex_dpo.models.hf_read import CheckpointReader, RangedSafetensors, byte_runs

D, N, DH = 6, 4, 3
RNG = np.random.default_rng(0)

# HF tensor -> ours, written out by hand from the HF modules (torch Linear weight is [out, in]),
# independently of the table under test.
ORACLE = {
    "identity": (RNG.standard_normal((5, D)), lambda w: w),
    "transpose": (RNG.standard_normal((7, D)), lambda w: w.T),
    "heads_in": (RNG.standard_normal((N * DH, D)), lambda w: w.reshape(N, DH, D).transpose(2, 0, 1)),
    "heads_out": (RNG.standard_normal((D, N * DH)), lambda w: w.reshape(D, N, DH).transpose(1, 2, 0)),
    "heads_bias": (RNG.standard_normal((N * DH,)), lambda w: w.reshape(N, DH)),
}


def _blocks(shape):
  """A few unit-step blocks of every axis combination (whole, prefix, middle, last element)."""
  per_axis = [[slice(None), slice(0, max(1, n // 2)), slice(1, n - 1 if n > 2 else n), slice(n - 1, n)] for n in shape]
  return list(itertools.product(*per_axis))


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_layout_table_matches_the_hf_modules(kind):
  hf, to_ours = ORACLE[kind]
  ours = to_ours(hf)
  layout = LAYOUTS[kind]
  assert layout.hf_shape(ours.shape) == hf.shape
  np.testing.assert_array_equal(layout.to_hf(ours), hf)
  assert layout.to_hf(ours).flags.c_contiguous
  for index in _blocks(ours.shape):
    requested = []
    block = layout.read_block(lambda i: requested.append(i) or hf[i], ours.shape, index)
    np.testing.assert_array_equal(block, ours[index], err_msg=f"{kind} {index}")
    (hf_index,) = requested  # one request, no larger than the block's enclosing heads
    assert hf[hf_index].size <= block.size * (DH if kind.startswith("heads") else 1)


def test_byte_runs_widen_small_gaps_and_split_large_ones():
  shape, item = (4, 8, 16), 4
  index = (slice(1, 3), slice(2, 5), slice(4, 8))
  # Gap 0: one run per (i, j) of the 4 selected elements.
  region, k, runs = byte_runs(shape, item, index, merge_gap=1)
  assert k == 2 and region == index and len(runs) == 6 and {b - a for a, b in runs} == {16}
  # Skipping 12 elements (48 B) along the last axis is cheaper than a request: whole rows of axis 2.
  region, k, runs = byte_runs(shape, item, index, merge_gap=100)
  assert k == 1 and region[2] == slice(0, 16) and len(runs) == 2 and {b - a for a, b in runs} == {3 * 64}
  region, k, runs = byte_runs(shape, item, index, merge_gap=10**9)  # everything inner widened
  assert k == 0 and runs == [(1 * 8 * 64, 3 * 8 * 64)]


@pytest.fixture()
def counted(monkeypatch):
  """Every byte-range request: (start, end)."""
  calls = []
  real = storage.read_range
  monkeypatch.setattr(storage, "read_range", lambda p, a, b: calls.append((a, b)) or real(p, a, b))
  return calls


def test_column_slice_reads_about_the_slice(tmp_path, counted):
  """A tensor sharded along its last axis: only the slice's bytes, one request per row."""
  w = RNG.standard_normal((32, 1024)).astype(np.float32)  # rows of 4 KiB
  save_file({"w": w, "b": w[0]}, str(tmp_path / "model.safetensors"))
  narrow = RangedSafetensors(str(tmp_path / "model.safetensors"), merge_gap=1024).get_slice("w")
  counted.clear()
  got = narrow[(slice(8, 24), slice(256, 512))]
  np.testing.assert_array_equal(got, w[8:24, 256:512])
  assert sum(b - a for a, b in counted) == 16 * 256 * 4 and len(counted) == 16  # exactly the slice
  # With the default gap (4 MiB), skipping 3 KiB per row is cheaper read than requested: one GET.
  wide = RangedSafetensors(str(tmp_path / "model.safetensors")).get_slice("w")
  counted.clear()
  np.testing.assert_array_equal(wide[(slice(8, 24), slice(256, 512))], w[8:24, 256:512])
  assert counted == [(counted[0][0], counted[0][0] + 16 * 4096)]
  counted.clear()
  np.testing.assert_array_equal(wide[(slice(0, 0), slice(None))], w[0:0])  # empty: no request
  assert counted == []


def test_column_sharded_parameter_reads_its_share(tmp_path, counted):
  """A q_proj block split along D (HF columns) through the checkpoint reader: about the block's bytes."""
  from artifex_dpo.models import get_preset
  from artifex_dpo.models.hf_layout import param_specs
  from artifex_dpo.models.hf_read import make_block_reader

  config = get_preset("llama-tiny", vocab_size=64, num_heads=4, num_kv_heads=2)
  spec = param_specs(config)[("layers", "q_proj")]
  d, n, dh = config.hidden_size, config.num_heads, config.head_dim
  ours = RNG.standard_normal((config.num_layers, d, n, dh)).astype(np.float32)
  tensors = {spec.hf_name.format(i=i): spec.layout.to_hf(ours[i]) for i in range(config.num_layers)}
  save_file(tensors, str(tmp_path / "model.safetensors"))
  reader = CheckpointReader(tmp_path, ranged=True, merge_gap=64)
  index = (slice(0, 1), slice(d // 2, d), slice(None), slice(None))  # layer 0, the second half of D
  assert reader.shape(spec.hf_name.format(i=0)) == (n * dh, d)  # the header is read once, here
  counted.clear()
  block = make_block_reader(reader, spec, ours.shape, np.float32)(index)
  np.testing.assert_array_equal(block, ours[index])
  assert sum(b - a for a, b in counted) == block.nbytes  # half of every HF row, nothing more
  assert len(counted) == n * dh  # one request per HF row


def test_real_model_column_slices_read_whole_rows():
  """What the default gap does on Llama-3-8B's down_proj [4096, 14336] bf16 split 4 ways by columns."""
  region, k, runs = byte_runs((4096, 14336), 2, (slice(0, 1024), slice(3584, 7168)))
  assert k == 0 and len(runs) == 1 and runs[0][1] - runs[0][0] == 1024 * 14336 * 2  # 28 MiB for 7 MiB
  region, k, runs = byte_runs((4096, 14336), 2, (slice(0, 1024), slice(3584, 7168)), merge_gap=16 * 1024)
  assert len(runs) == 1024 and sum(b - a for a, b in runs) == 1024 * 3584 * 2
