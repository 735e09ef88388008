"""Query-time sampling: which chunks of the chosen documents the LLM reads, and at which k, within a slot budget.

Every chunk is a unit that costs ``ceil(length / k)`` slots at factor k; k = 1 reads the chunk as its plain tokens.
Strategies:

* ``rag``: the most relevant chunks as plain tokens while they fit, nothing compressed.
* ``hybrid``: exactly the chunks ``rag`` reads, raw; then the slots they leave hold the other chunks
  compressed at ``max_k``, the most relevant first. The raw passages are never given up for compressed context, so
  the LLM always reads at least what plain passage RAG reads.
* ``rag:K`` (K >= 2; a control of reading): exactly the chunks ``rag`` chooses at this budget, every one read
  compressed at k = K (``max_k`` does not apply) -- the passages' content reaches the LLM only through their rows.
* ``graded`` (the default): the most relevant chunks start at ``max_k`` in at most half the budget (all of a
  document that fits there); then, in order of relevance, each chunk is refined as far as the whole budget allows
  (raw if it fits, else the finest k that fits) before the next one is touched. The half kept free is what lets the
  nearest passages be read raw when a document overflows the window at ``max_k``.
* ``adaptive`` (the paper's rule): one k for everything, the smallest that fits the budget.

Relevance is the retrieval score; among equals (chunks without a hit) the later chunk first. When even ``max_k`` does
not fit (for ``graded``: not in half the budget), ``graded`` and ``adaptive`` leave out the least relevant chunks.
Chosen chunks are read in document order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extensible.downscale import num_kept
from extensible.errors import ContextTooLongError, UserError

STRATEGIES = ("rag", "hybrid", "graded", "adaptive")  # and rag:K
# graded: the best planner measured with the shipped plug-in (W = 1024, answer NLL against rag, held out, mean of the
# 4 sets -0.305, hybrid -0.113): -0.991 [-1.196, -0.808] on 200 questions of 7 SQuAD articles + FairytaleQA val, -0.326
# [-0.521, -0.133] on 100 of L-Eval natural_question, +0.028 [-0.026, +0.088] on 100 of multidoc_qa, +0.067 [-0.134,
# +0.271] on 100 of scientific_qa (hybrid: -0.263, -0.124, -0.025, -0.039: better on free-text answers; reports
# runs/qa-eval/graded-half_*.md). Its gain is the rows' learned prompt, not their content (graded - foreign:graded
# +0.008, +0.043, -0.001, -0.002). Before it kept half the budget free, graded read a document that overflows the
# window at max_k all compressed (+1.020 on natural_question) and hybrid was the default; with stage 3's plug-in, rag.
DEFAULT_STRATEGY = "graded"


@dataclass
class Unit:
    document: int  # position of the document in the plan
    chunk: int
    length: int  # tokens in the chunk (a last partial chunk is shorter)
    relevance: float = float("-inf")  # retrieval score; chunks without a hit rank by recency only


@dataclass
class Plan:
    ks: list[dict[int, int]] = field(default_factory=list)  # per document: chunk -> k, chunks in order
    # (a k larger than a short last chunk reads that chunk as one embedding)

    def slots(self, units: list[Unit]) -> int:
        return sum(num_kept(u.length, self.ks[u.document][u.chunk]) for u in units if u.chunk in self.ks[u.document])

    def k_range(self, document: int) -> tuple[int, int] | None:
        ks = self.ks[document].values()
        return (min(ks), max(ks)) if ks else None

    def raw_chunks(self, document: int) -> list[int]:
        return [chunk for chunk, k in self.ks[document].items() if k == 1]


def _cost(units: list[Unit], k: int) -> int:
    return sum(num_kept(u.length, k) for u in units)


def _by_relevance(units: list[Unit]) -> list[Unit]:
    """Most relevant first; among equals the later chunk (more recent) first."""
    return sorted(units, key=lambda u: (u.relevance, u.document, u.chunk), reverse=True)


def _fill(units: list[Unit], budget: int, k: int) -> tuple[dict[tuple[int, int], int], int]:
    """The most relevant units that fit ``budget`` at factor ``k`` (a unit too large is skipped, not the rest)."""
    chosen, used = {}, 0
    for unit in _by_relevance(units):
        cost = num_kept(unit.length, k)
        if used + cost <= budget:
            chosen[(unit.document, unit.chunk)] = k
            used += cost
    return chosen, used


def _hybrid(units: list[Unit], budget: int, max_k: int, compress: bool) -> dict[tuple[int, int], int]:
    chosen, used = _fill(units, budget, 1)
    if compress:
        rest = [u for u in units if (u.document, u.chunk) not in chosen]
        chosen.update(_fill(rest, budget - used, max_k)[0])
    return chosen


def _graded(units: list[Unit], budget: int, max_k: int, min_k: int) -> dict[tuple[int, int], int]:
    # the chunks at max_k take at most half the budget (all of a document that fits there), so that the most relevant
    # can always be refined: a document that overflows the window at max_k is not read all compressed
    chosen, used = _fill(units, budget // 2, max_k)
    if not chosen:  # a budget too small for even one chunk in its half
        chosen, used = _fill(units, budget, max_k)
    levels = [k for k in range(min_k, max_k)]  # finest first
    for unit in _by_relevance([u for u in units if (u.document, u.chunk) in chosen]):
        key, now = (unit.document, unit.chunk), num_kept(unit.length, max_k)
        finer = next((k for k in levels if used + num_kept(unit.length, k) - now <= budget), None)
        if finer is not None:
            chosen[key], used = finer, used + num_kept(unit.length, finer) - now
    return chosen


def parse_strategy(strategy: str) -> tuple[str, int | None]:
    """(name, K): K is the k of ``rag:K`` (rag's chunks, all read at k = K), None for the other strategies."""
    name, _, k = strategy.partition(":")
    if name == "rag" and k:
        if not k.isdigit() or int(k) < 2:
            raise UserError(f"bad strategy {strategy!r}: rag:K needs an integer K >= 2 (rag:1 is rag)")
        return name, int(k)
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} or rag:K")
    return strategy, None


def plan(units: list[Unit], documents: int, budget: int, strategy: str = DEFAULT_STRATEGY, max_k: int = 64,
         min_k: int = 1) -> Plan:
    strategy, read_k = parse_strategy(strategy)
    if max_k < min_k or min_k < 1:
        raise UserError(f"need 1 <= min_k <= max_k, got {min_k} and {max_k}")
    if budget < 1:
        raise ContextTooLongError(f"the question and the answer fill the window ({budget} slots left); "
                                  "raise --window or shorten the question")
    if strategy in ("hybrid", "rag"):
        chosen = _hybrid(units, budget, max_k, compress=strategy == "hybrid")
        if read_k:  # rag:K -- the same chunks, compressed: what the LLM reads of the passages from their rows
            chosen = dict.fromkeys(chosen, read_k)
    elif strategy == "graded":
        chosen = _graded(units, budget, max_k, min_k)
    else:
        kept = units if _cost(units, max_k) <= budget else [u for u in units if (u.document, u.chunk) in
                                                              _fill(units, budget, max_k)[0]]
        k = next(k for k in range(min_k, max_k + 1) if _cost(kept, k) <= budget or k == max_k)
        chosen = {(u.document, u.chunk): k for u in kept}
    if units and not chosen:
        raise ContextTooLongError(f"no chunk fits: {budget} slots left in the window; raise --window or shorten "
                                  "the question")
    result = Plan([{} for _ in range(documents)])
    for (document, chunk), k in sorted(chosen.items()):
        result.ks[document][chunk] = k
    return result
