"""A small, deterministic, learnable preference set: the tiny default's data.

Each prompt asks for a word; the chosen answer is spelled with letters a-m, the rejected answer
with letters n-z. A model that learns the preference generalises to unseen prompts and words,
so held-out reward accuracy measures real learning.
"""

from __future__ import annotations

import json
import os

import numpy as np

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
  """Writes the records as JSON Lines, atomically (every process may call it; same bytes)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for r in synthetic_records(num_pairs, seed):
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
  return path
