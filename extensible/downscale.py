"""Down-scaling: keep one of every k output embeddings of a chunk.

Rule for a chunk of length L (any integer k with 1 <= k <= L) -- every method keeps ceil(L / k) embeddings:

* ``strided`` (default, the papers' choice): the last of every k, o_k, o_2k, ...; when k does not divide L, the
  chunk's last output o_L is kept as well, so the trailing L mod k tokens are still summarised.
* ``terminal``: the last ceil(L / k) outputs.
* ``random``: ceil(L / k) positions drawn without replacement, in token order, from a generator seeded by
  (seed, chunk index), so a stored document gives the same sample every time.
* ``mean``: the mean of each group of k consecutive outputs (the last group may be shorter); needs every row.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import UserError

METHODS = ("strided", "terminal", "random", "mean")


def check_k(k: int, chunk_length: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UserError(f"k must be an integer >= 1, got {k!r}")
    if k > chunk_length:
        raise UserError(f"k={k} is larger than a chunk of {chunk_length} tokens; use k <= {chunk_length}")


def num_kept(chunk_length: int, k: int) -> int:
    return -(-chunk_length // k)


def kept_positions(chunk_length: int, k: int, method: str = "strided", seed: int = 0, chunk_index: int = 0) -> np.ndarray:
    """Positions (0-based, ascending) kept from one chunk; for ``mean``, the last position of each group."""
    check_k(k, chunk_length)
    if method in ("strided", "mean"):
        positions = np.arange(k - 1, chunk_length, k)
        if chunk_length % k:
            positions = np.append(positions, chunk_length - 1)
        return positions
    if method == "terminal":
        return np.arange(chunk_length - num_kept(chunk_length, k), chunk_length)
    if method == "random":
        rng = np.random.default_rng([seed, chunk_index])
        return np.sort(rng.choice(chunk_length, size=num_kept(chunk_length, k), replace=False))
    raise UserError(f"unknown down-scaling method {method!r}; choose one of {', '.join(METHODS)}")


def downscale_chunk(outputs: torch.Tensor, k: int, method: str = "strided", seed: int = 0, chunk_index: int = 0) -> torch.Tensor:
    """[L, hidden] full-resolution outputs of one chunk -> [ceil(L/k), hidden]."""
    length = outputs.shape[0]
    if method == "mean":
        check_k(k, length)
        ends = kept_positions(length, k, "mean")
        starts = np.concatenate([[0], ends[:-1] + 1])
        return torch.stack([outputs[s : e + 1].mean(dim=0) for s, e in zip(starts, ends)])
    return outputs[torch.as_tensor(kept_positions(length, k, method, seed, chunk_index))]


def rows_needed(chunk_length: int, k: int, method: str = "strided", seed: int = 0, chunk_index: int = 0) -> np.ndarray:
    """Rows of a chunk's stored outputs that down-scaling reads (all of them for ``mean``)."""
    if method == "mean":
        check_k(k, chunk_length)
        return np.arange(chunk_length)
    return kept_positions(chunk_length, k, method, seed, chunk_index)
