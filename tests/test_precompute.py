"""dpo.precompute_ref_logps and data.packing in the service: same losses, cache keyed safely."""

import numpy as np
import pytest

from service_runs import read_rows, run_main

ARGS = ["--config.train.steps=6", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.export.hf=False", "--config.checkpoint.save_every=0", "--config.data.synthetic_pairs=192"]


def _losses(workdir):
  _, train, evals = read_rows(workdir)
  return train, evals[-1]


@pytest.mark.parametrize("packing,share", [(False, False), (False, None), (True, False), (True, True)])
def test_precomputed_reference_gives_the_same_losses(tmp_path, packing, share):
  # (False, False): padded batches; (False, None): the default layout (per-batch packed, shared prompts).
  extra = [f"--config.data.packing={packing}"]
  extra += ["--config.data.pack_batches=False"] if (packing, share) == (False, False) else []
  extra += [f"--config.data.share_prompt={share}"] if share is not None else []
  live = run_main(tmp_path / "live", *ARGS, *extra)
  assert live.returncode == 0, live.stderr[-3000:]
  cached = run_main(tmp_path / "pre", *ARGS, *extra, "--config.dpo.precompute_ref_logps=True")
  assert cached.returncode == 0, cached.stderr[-3000:]
  assert "reference log-probs: computed for" in cached.stderr
  (a, a_eval), (b, b_eval) = _losses(tmp_path / "live"), _losses(tmp_path / "pre")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    for k in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "tokens", "pairs"):
      np.testing.assert_allclose(b[s][k], a[s][k], rtol=1e-4, atol=1e-5, err_msg=f"{k}@{s}")
  np.testing.assert_allclose(b_eval["eval/loss"], a_eval["eval/loss"], rtol=1e-4)
  if packing:  # rows hold several pairs: more pairs per step than rows
    assert all(r["pairs"] > 8 for r in a.values())
  # A restart reuses the cache; different reference weights can never reuse it.
  again = run_main(tmp_path / "pre", *ARGS[1:], "--config.train.steps=8", *extra, "--config.dpo.precompute_ref_logps=True")
  assert again.returncode == 0 and "using the cache" in again.stderr


def test_cache_key_depends_on_data_and_weights():
  import jax.numpy as jnp
  from flax import nnx

  from artifex_dpo import reference
  from artifex_dpo.data import PreferenceDataset
  from artifex_dpo.data.formats import TokenizedPair

  ds = PreferenceDataset.from_pairs([TokenizedPair(np.arange(3), np.arange(2), np.arange(4))], pad_id=0)
  ds2 = PreferenceDataset.from_pairs([TokenizedPair(np.arange(3), np.arange(2), np.arange(5))], pad_id=0)
  w = nnx.State({"a": nnx.Param(jnp.ones((3, 4))), "b": nnx.Param(jnp.zeros((2,)))})
  w2 = nnx.State({"a": nnx.Param(jnp.ones((3, 4)).at[2, 3].set(1.001)), "b": nnx.Param(jnp.zeros((2,)))})
  f, f2 = reference.weights_fingerprint(w), reference.weights_fingerprint(w2)
  assert f != f2 and f == reference.weights_fingerprint(w)
  keys = {reference.cache_key(d, fp, 512) for d in (ds, ds2) for fp in (f, f2)}
  assert len(keys) == 4


@pytest.mark.parametrize("share", [False, True])
def test_pack_batches_gives_the_padded_losses(tmp_path, share):
  """Same pairs per step, laid out padding-free (the prompt once with share): the padded batches' losses."""
  padded = run_main(tmp_path / "padded", *ARGS, "--config.data.pack_batches=False")
  assert padded.returncode == 0, padded.stderr[-3000:]
  packed = run_main(tmp_path / "packed", *ARGS, "--config.data.pack_batches=True",
                    f"--config.data.share_prompt={share}")
  assert packed.returncode == 0, packed.stderr[-3000:]
  (a, a_eval), (b, b_eval) = _losses(tmp_path / "padded"), _losses(tmp_path / "packed")
  for s in a:
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "tokens", "pairs"):
      np.testing.assert_allclose(b[s][k], a[s][k], rtol=1e-4, atol=1e-5, err_msg=f"{k}@{s}")
  np.testing.assert_allclose(b_eval["eval/loss"], a_eval["eval/loss"], rtol=1e-4)
