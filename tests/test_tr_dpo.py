"""TR-DPO (sync_ref_model): the reference becomes alpha * policy + (1 - alpha) * reference every k updates,
in the library and in the service, where it is checkpointed and a resumed run stays bitwise identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from artifex_dpo import DPOConfig, DPOTrainer
from artifex_dpo.models import LlamaModel, get_preset
from artifex_dpo.types import GeneratedSequenceBatch, PreferenceBatch

from service_runs import error_line, run_main


def _params(model) -> dict:
  return jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _mix(ref, pol, a):
  return jax.tree.map(lambda r, p: (np.float32(1 - a) * r + np.float32(a) * p).astype(r.dtype), ref, pol)


def _close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_library_reference_is_mixed_every_k_updates():
  cfg = get_preset("llama-tiny", vocab_size=64)
  model, ref = LlamaModel(cfg, rngs=nnx.Rngs(0)), LlamaModel(cfg, rngs=nnx.Rngs(1))
  trainer = DPOTrainer(model, ref, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param),
                       DPOConfig(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6))
  rng = np.random.default_rng(0)
  side = lambda: GeneratedSequenceBatch.from_sequences(rng.integers(1, 64, (4, 12)),
                                                       prompt_mask=np.arange(12)[None].repeat(4, 0) < 5)
  batch = PreferenceBatch(chosen=side(), rejected=side())
  expected_ref = _params(ref)
  for step in range(1, 6):
    trainer.train_step(batch)
    if step % 2 == 0:
      expected_ref = _mix(expected_ref, _params(model), 0.6)
    _close(_params(ref), expected_ref, rtol=1e-6, atol=1e-7)
  assert not np.allclose(_params(ref)["embed"], _params(LlamaModel(cfg, rngs=nnx.Rngs(1)))["embed"])
  # The loss reads the mixed reference: a fresh trainer holding the same weights agrees.
  twin = DPOTrainer(model, ref, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param), DPOConfig())
  np.testing.assert_allclose(float(trainer.compute_loss(batch)[0]), float(twin.compute_loss(batch)[0]), rtol=1e-6)


def test_library_refuses_a_reference_of_another_shape():
  model = LlamaModel(get_preset("llama-tiny", vocab_size=64), rngs=nnx.Rngs(0))
  other = LlamaModel(get_preset("llama-tiny", vocab_size=72), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sync_ref_model"):
    DPOTrainer(model, other, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param), DPOConfig(sync_ref_model=True))


ARGS = ["--config.train.steps=4", "--config.checkpoint.save_every=2", "--config.checkpoint.async_save=False",
        "--config.data.synthetic_pairs=128", "--config.train.global_batch_size=8", "--config.train.eval_every=0",
        "--config.train.log_every=1", "--config.export.hf=False", "--config.optim.learning_rate=1e-2",
        "--config.dpo.sync_ref_model=True", "--config.dpo.ref_model_sync_steps=2",
        "--config.dpo.ref_model_mixup_alpha=0.6", "--config.model.init_seed=3"]


def _saved(workdir, step) -> dict:
  return ocp.PyTreeCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")


def test_service_checkpoints_the_mixed_reference_and_resumes_bitwise(tmp_path):
  a = tmp_path / "a"
  proc = run_main(a, *ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  s2, s4 = _saved(a, 2), _saved(a, 4)
  policy = lambda s: s["train"]["0"]  # the state of (policy, optimizer)
  # The reference starts as the policy's initial weights (model.init_seed); the vocabulary is the byte tokenizer's.
  init = _params(LlamaModel(get_preset("llama-tiny", vocab_size=259), rngs=nnx.Rngs(3)))
  strip = lambda tree: jax.tree.map(np.asarray, tree)
  p2, p4 = strip(policy(s2)), strip(policy(s4))
  p2 = {k: p2[k] for k in init}
  p4 = {k: p4[k] for k in init}
  _close(strip(s2["reference"]), _mix(init, p2, 0.6), rtol=2e-6, atol=1e-7)
  _close(strip(s4["reference"]), _mix(strip(s2["reference"]), p4, 0.6), rtol=2e-6, atol=1e-7)
  # Resume from step 2 in a copy: steps 3-4 again give the same policy and reference, bit for bit.
  b = tmp_path / "b"
  shutil.copytree(a, b)
  shutil.rmtree(b / "checkpoints" / "4")
  proc = run_main(b, *ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stderr
  jax.tree.map(np.testing.assert_array_equal, strip(_saved(b, 4)), strip(s4))


def test_service_refuses_tr_dpo_with_precomputed_reference(tmp_path):
  proc = run_main(tmp_path, "--config.dpo.sync_ref_model=True", "--config.dpo.precompute_ref_logps=True")
  assert proc.returncode == 2
  line = error_line(proc)
  assert "dpo.sync_ref_model" in line and "precompute_ref_logps" in line
