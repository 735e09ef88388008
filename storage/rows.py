"""Stride-friendly row order: a document's rows are stored level-major within fixed blocks.

Within each block of ``block_rows`` rows (a whole number of chunks), rows are sorted by their level -- the largest
power of two, up to ``max_level``, that divides (position in chunk + 1) -- highest level first, then token order.
The strided sample for a power-of-two k <= max_level that divides the chunk (o_k, o_2k, ... of every chunk) is then
a contiguous prefix of each block: reading it touches 1/k of the stored bytes. Any other selection maps token rows to
stored rows through the same permutation.
"""

from __future__ import annotations

import numpy as np


def levels(n_rows: int, chunk_size: int, max_level: int) -> np.ndarray:
    position = np.arange(n_rows) % chunk_size + 1
    level = np.ones(n_rows, dtype=np.int64)
    step = 2
    while step <= max_level:
        level[position % step == 0] = step
        step *= 2
    return level


def block_order(n_rows: int, chunk_size: int, max_level: int) -> np.ndarray:
    """Stored position -> token row, for one block of ``n_rows`` rows."""
    return np.lexsort((np.arange(n_rows), -levels(n_rows, chunk_size, max_level)))


def prefix_length(n_rows: int, chunk_size: int, k: int) -> int:
    """How many stored rows of a block of ``n_rows`` hold the rows with (position + 1) % k == 0."""
    return int(((np.arange(n_rows) % chunk_size + 1) % k == 0).sum())


def prefix_readable(k: int, chunk_size: int, max_level: int) -> bool:
    return k >= 1 and k <= max_level and k & (k - 1) == 0 and chunk_size % k == 0


class RowOrder:
    """The permutation of a whole document: blocks of ``block_rows`` rows, the last one possibly shorter."""

    def __init__(self, n_rows: int, chunk_size: int, block_rows: int, max_level: int):
        self.n_rows, self.chunk_size, self.block_rows, self.max_level = n_rows, chunk_size, block_rows, max_level

    def blocks(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.block_rows, self.n_rows)) for start in range(0, self.n_rows, self.block_rows)]

    def stored_to_token(self) -> np.ndarray:
        return np.concatenate([start + block_order(stop - start, self.chunk_size, self.max_level)
                               for start, stop in self.blocks()] or [np.zeros(0, dtype=np.int64)])

    def token_to_stored(self) -> np.ndarray:
        return np.argsort(self.stored_to_token())
