"""Query-time sampling: which chunks of the chosen documents the LLM reads, and at which k, within a slot budget.

Every chunk is a unit that costs ``ceil(length / k)`` slots at factor k. Two strategies:

* ``adaptive`` (the paper's rule): one k for everything, the smallest that fits the budget.
* ``graded``: every chunk starts at ``max_k``; then, round after round, the chunks in order of relevance (the
  retrieval score, then recency) each halve their k while the whole still fits, so the passages that matter are read
  finely and the rest coarsely.

When even ``max_k`` does not fit, the least relevant chunks are left out (the earliest first among equals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extensible.downscale import num_kept
from extensible.errors import ContextTooLongError, UserError

STRATEGIES = ("adaptive", "graded")


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


def _cost(units: list[Unit], k: int) -> int:
    return sum(num_kept(u.length, k) for u in units)


def _by_relevance(units: list[Unit]) -> list[Unit]:
    """Most relevant first; among equals the later chunk (more recent) first."""
    return sorted(units, key=lambda u: (u.relevance, u.document, u.chunk), reverse=True)


def _fit_at_max(units: list[Unit], budget: int, max_k: int) -> list[Unit]:
    """The most relevant units that fit the budget at ``max_k``."""
    kept, used = [], 0
    for unit in _by_relevance(units):
        cost = num_kept(unit.length, max_k)
        if used + cost <= budget:
            kept.append(unit)
            used += cost
    if not kept:
        raise ContextTooLongError(f"no chunk fits: {budget} slots left in the window; raise --window or shorten the question")
    return kept


def plan(units: list[Unit], documents: int, budget: int, strategy: str = "adaptive", max_k: int = 32,
         min_k: int = 1) -> Plan:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if max_k < min_k or min_k < 1:
        raise UserError(f"need 1 <= min_k <= max_k, got {min_k} and {max_k}")
    if budget < 1:
        raise ContextTooLongError(f"the question and the answer fill the window ({budget} slots left); "
                                  "raise --window or shorten the question")
    result = Plan([{} for _ in range(documents)])
    kept = units if _cost(units, max_k) <= budget else _fit_at_max(units, budget, max_k)
    if strategy == "adaptive":
        k = next(k for k in range(min_k, max_k + 1) if _cost(kept, k) <= budget or k == max_k)
        chosen = {(u.document, u.chunk): k for u in kept}
    else:
        chosen = {(u.document, u.chunk): max_k for u in kept}
        used = _cost(kept, max_k)
        order = _by_relevance(kept)
        changed = True
        while changed:  # one level finer per round, most relevant first
            changed = False
            for unit in order:
                key = (unit.document, unit.chunk)
                finer = max(min_k, chosen[key] // 2)
                extra = num_kept(unit.length, finer) - num_kept(unit.length, chosen[key])
                if finer < chosen[key] and used + extra <= budget:
                    chosen[key], used, changed = finer, used + extra, True
    for (document, chunk), k in sorted(chosen.items()):
        result.ks[document][chunk] = k
    return result
