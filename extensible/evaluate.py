"""Perplexity of a document's tail: window-only context against extensible embeddings."""

from __future__ import annotations

import time

import torch

from .errors import UserError
from .runtime import ExtensibleLM, Score


def fitting_context(lm: ExtensibleLM, n_tokens: int, k: int, tail: int, context: int | None = None) -> int:
    """Context length before the tail: ``context`` if given, else as much of the document as fits at this k."""
    available = n_tokens - tail
    if available < 1:
        raise UserError(f"the text has {n_tokens} tokens; it needs more than the {tail}-token tail")
    if context is None:
        return min(available, lm.layout(k).capacity() - tail + 1)
    if context > available:
        raise UserError(f"--context {context} is longer than the {available} tokens before the tail")
    lm.layout(k).compressed_chunks(context + tail - 1)  # raises with the k that would fit
    return context


def timed(fn, *args, **kwargs) -> tuple[Score, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def tail_perplexity(lm: ExtensibleLM, ids: torch.Tensor, k: int, tail: int = 512, context: int | None = None) -> list[dict]:
    """Rows ``{method, context, k, ppl, tokens, seconds}`` for window-only and for ext:k on the same tail."""
    context = fitting_context(lm, len(ids), k, tail, context)
    sample = ids[len(ids) - context - tail :]
    rows = []
    for method, fn, args in (("window", lm.score_window, (sample, tail)), (f"ext:{k}", lm.score, (sample, tail, k))):
        score, seconds = timed(fn, *args)
        rows.append({"method": method, "context": context, "k": None if method == "window" else k,
                     "ppl": score.ppl, "tokens": score.tokens, "seconds": round(seconds, 3)})
    return rows
