"""Per-token log-probs of the training path, number by number, against transformers.

The trainer never builds logits for the log-probs: it runs ``hidden_states`` then the chunked
output projection + log-softmax. Here that path (several chunks) is compared with
``log_softmax`` of a transformers ``LlamaForCausalLM``'s logits on the same weights: entry t must
be ``log p(x_t | x_<t)``, read from the logits at position t-1; reading them one position off (or
scoring the wrong token) fails. The sequence sums the loss uses are checked the same way.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from artifex_dpo import DPOConfig
from artifex_dpo.models import load_hf_checkpoint
from artifex_dpo.trainer import dpo_loss, token_log_probs
from artifex_dpo.types import GeneratedSequenceBatch, PreferenceBatch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, T = 61, 11


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  hf_model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(torch.randn_like(p) * 0.2)  # peaked distributions: neighbouring positions differ clearly
  path = tmp_path_factory.mktemp("hf")
  hf_model.save_pretrained(path)
  return hf_model, load_hf_checkpoint(path)


def _inputs():
  tokens = np.random.default_rng(1).integers(0, VOCAB, (3, T)).astype(np.int32)
  mask = np.ones((3, T), np.int32)
  mask[1, 8:] = 0  # right padding
  mask[2, :3] = 0  # left padding
  return tokens, mask


def _hf_token_logps(hf_model, tokens, mask):
  """float64 [B, T]: entry t = log p(token t | tokens before it) for real t after the first real token."""
  positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  with torch.no_grad():
    logits = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                      position_ids=torch.tensor(positions, dtype=torch.long)).logits.double()
  logp = torch.log_softmax(logits, -1).numpy()
  out = np.zeros(tokens.shape)
  for b in range(tokens.shape[0]):
    real = np.flatnonzero(mask[b])
    for t in real[1:]:
      out[b, t] = logp[b, t - 1, tokens[b, t]]
  return out


def test_per_token_log_probs_match_transformers(models):
  hf_model, ours = models
  tokens, mask = _inputs()
  want = _hf_token_logps(hf_model, tokens, mask)
  got, _ = token_log_probs(ours, jnp.asarray(tokens), jnp.asarray(mask), None, chunk_size=4)  # 3 chunks
  got = np.asarray(got)
  scored = np.zeros_like(mask, bool)
  for b in range(3):
    scored[b, np.flatnonzero(mask[b])[1:]] = True
  np.testing.assert_allclose(got[scored], want[scored], atol=2e-4)
  # The check has teeth: log-probs one position off differ by far more than the tolerance.
  assert np.abs(got[:, 2:] - want[:, 1:-1])[scored[:, 2:] & scored[:, 1:-1]].max() > 0.1


def test_sequence_log_probs_of_the_loss_match_transformers(models):
  hf_model, ours = models
  tokens, mask = _inputs()
  want = _hf_token_logps(hf_model, tokens, mask)
  # Responses: the last 4 real tokens of every row; the prompt is the rest.
  response = np.zeros_like(mask)
  for b in range(3):
    response[b, np.flatnonzero(mask[b])[-4:]] = 1
  side = lambda rows: GeneratedSequenceBatch.from_sequences(tokens[rows], response_mask=response[rows],
                                                           attention_mask=mask[rows])
  batch = PreferenceBatch(chosen=side([0, 1, 2]), rejected=side([2, 0, 1]))
  _, metrics = dpo_loss(ours, None, batch, DPOConfig(loss_type="sft").loss_settings(), chunk_size=4)
  sums = (want * response).sum(1)
  np.testing.assert_allclose(float(metrics["logps/chosen"]), sums.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["logps/rejected"]), sums[[2, 0, 1]].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), -sums.sum() / response.sum(), rtol=1e-5)
