"""A small, deterministic, learnable preference set: the tiny default's data.

Each prompt asks for a word; the chosen answer is spelled with letters a-m, the rejected answer
with letters n-z. A model that learns the preference generalises to unseen prompts and words,
so held-out reward accuracy measures real learning.
"""

from __future__ import annotations

import json

import numpy as np

from artifex_dpo import storage

_CHOSEN = "abcdefghijklm"
_REJECTED = "nopqrstuvwxyz"


def _word(rng: np.random.Generator, letters: str) -> str:
  return "".join(rng.choice(list(letters), size=int(rng.integers(3, 7))))


def synthetic_records(num_pairs: int, seed: int = 0) -> list[dict[str, str]]:
  """``num_pairs`` prompt/chosen/rejected records, a function of ``seed`` only."""
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(num_pairs):
    topic = " ".join(_word(rng, _CHOSEN + _REJECTED) for _ in range(int(rng.integers(1, 4))))
    n = int(rng.integers(2, 5))
    records.append({
        "prompt": f"Q: {topic}?\nA:",
        "chosen": " " + " ".join(_word(rng, _CHOSEN) for _ in range(n)),
        "rejected": " " + " ".join(_word(rng, _REJECTED) for _ in range(n)),
    })
  return records


def write_synthetic(path: str, num_pairs: int, seed: int = 0) -> str:
  """Writes the records as JSON Lines, atomically (local path or gs://; every process may call
  it: same bytes). An existing file with those bytes is left alone (keeps its identity, so a
  tokenized cache keyed by it stays valid)."""
  data = "".join(json.dumps(r) + "\n" for r in synthetic_records(num_pairs, seed)).encode("utf-8")
  if storage.isfile(path) and storage.size(path) == len(data) and storage.read_bytes(path) == data:
    return path
  storage.write_bytes(path, data)
  return path
