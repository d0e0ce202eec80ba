"""Training data: uint16 token files, shuffled training windows, held-out evaluation windows.

  batches     [A, B, T+1] windows of a uint16 token stream: A accumulation micro-batches of B rows
  data order  each epoch a fresh permutation of non-overlapping windows with an epoch-dependent
              shift; a pure function of (rng, epoch), so the sample position alone resumes it

NumPy only; the token files come from bitnet_jax.train.corpus.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from bitnet_jax.errors import ConfigError


def load_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a uint16 token file written by bitnet_jax.train.corpus."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"token file {path} does not exist; build the corpus first "
                          "(python -m bitnet_jax.train.corpus --out DIR) and point `data` at DIR.")
    return np.memmap(path, dtype=np.uint16, mode="r")


def batch_at(tokens: np.ndarray, rng: np.ndarray, position: int, n: int, seq_len: int):
    """The n training windows starting at sample `position` of the epoch-shuffled order.

    Args:
      tokens: [N] uint16 stream.
      rng: [2] uint32 run key; epoch e's order is a function of (rng, e) only.
      position: index of the first sample (counts across epochs).
      n: number of windows.

    Returns:
      [n, T+1] int32.
    """
    nwin = (tokens.size - seq_len - 1) // seq_len
    if nwin < 1:
        raise ConfigError(
            f"the token file holds {tokens.size} tokens, too few for seq_len={seq_len}.")
    rows = []
    for p in range(position, position + n):
        epoch, j = divmod(p, nwin)
        shift, perm = _epoch_order(tuple(int(x) for x in rng), epoch, nwin, seq_len)
        start = shift + int(perm[j]) * seq_len
        rows.append(np.asarray(tokens[start: start + seq_len + 1], np.int32))
    return np.stack(rows)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Non-overlapping held-out windows [W, T+1] (the first max_tokens tokens, 0 = all)."""
    n = tokens.size if max_tokens <= 0 else min(tokens.size, max_tokens)
    w = (n - 1) // seq_len
    if w < 1:
        raise ConfigError(f"the held-out split holds {n} tokens, too few for seq_len={seq_len}.")
    idx = np.arange(w)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[: w * seq_len + 1], np.int32)[idx]


@functools.lru_cache(maxsize=4)
def _epoch_order(rng: tuple, epoch: int, nwin: int, seq_len: int):
    gen = np.random.default_rng([*rng, epoch])
    return int(gen.integers(seq_len)), gen.permutation(nwin)
