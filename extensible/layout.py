"""Which part of a context is compressed: one rule, shared by streaming (online) and offline mode.

A document is cut into chunks of ``chunk_size`` tokens aligned at its first token. With the first ``n`` tokens as
context, the LLM reads ``[extensible embeddings of chunks 0..c-1] + [tokens c*chunk_size .. n-1]``, and that input
must fit the window: ``c * ceil(chunk_size / k) + (n - c * chunk_size) <= window``.

Policies for choosing ``c`` as ``n`` grows:

* ``sliding`` (default): compress only the oldest raw chunk, one at a time, when the window overflows; keeps the
  most raw tokens. Measured better than ``session`` on held-out books with stage 3 of the
  SmolLM2 training (runs/smollm2-lora32-k64/README.md): the LLM reads recent text best as tokens.
* ``session`` (the paper's online mode): a session keeps adding raw tokens until |Ex| + tokens reaches the window;
  then every complete chunk of the session becomes extensible embeddings and a new session starts. Streaming
  re-reads the window once per session instead of once per chunk, at the price of fewer raw tokens after a switch.

In both, a trailing partial chunk stays raw (it is compressed when it is complete), so precomputed per-chunk outputs
serve offline mode unchanged.

Because ``c`` is a function of ``n`` alone, offline mode can jump to the state that streaming reaches, which is why
the two give the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from .downscale import check_k, num_kept
from .errors import ContextTooLongError, UserError

POLICIES = ("session", "sliding")


@dataclass(frozen=True)
class Layout:
    window: int
    chunk_size: int
    k: int
    policy: str = "sliding"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UserError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.chunk_size < 1 or self.window <= self.chunk_size:
            raise UserError(
                f"the window ({self.window}) must be larger than the chunk size ({self.chunk_size}); "
                "raise --window or lower --chunk"
            )
        check_k(self.k, self.chunk_size)

    @property
    def slots_per_chunk(self) -> int:
        return num_kept(self.chunk_size, self.k)

    def limit(self, c: int) -> int:
        """The longest context (in tokens) that fits the window with ``c`` chunks compressed."""
        return c * self.chunk_size + self.window - c * self.slots_per_chunk

    def _next(self, c: int) -> int | None:
        """Compressed chunks after the session with ``c`` overflows, or None when nothing more can be compressed."""
        n = self.limit(c) + 1
        new_c = n // self.chunk_size if self.policy == "session" else c + 1
        if new_c <= c or new_c * self.chunk_size > n or n > self.limit(new_c):
            return None
        return new_c

    def capacity(self) -> int:
        """The longest context this layout can hold."""
        c = 0
        while (new_c := self._next(c)) is not None:
            c = new_c
        return self.limit(c)

    def compressed_chunks(self, n: int) -> int:
        """How many leading chunks are extensible embeddings when the first ``n`` tokens are the context."""
        c = 0
        while n > self.limit(c):
            new_c = self._next(c)
            if new_c is None:
                raise ContextTooLongError(self.too_long_message(n))
            c = new_c
        return c

    def too_long_message(self, n: int) -> str:
        msg = (
            f"a context of {n} tokens does not fit: window {self.window} with {self.chunk_size}-token chunks "
            f"at k={self.k} holds at most {self.capacity()} tokens"
        )
        k = smallest_k(n, self.window, self.chunk_size, self.policy)
        return msg + (f"; use k >= {k} or a shorter context" if k else "; use a shorter context or a larger window")


def smallest_k(n: int, window: int, chunk_size: int, policy: str = "sliding") -> int | None:
    """The paper's adaptive rule: the smallest k whose compressed context of ``n`` tokens fits the window."""
    for k in range(1, chunk_size + 1):
        if Layout(window, chunk_size, k, policy).capacity() >= n:
            return k
    return None
