"""The perplexity protocol: score the last ``tail`` tokens of a document given ``context`` tokens before them.

Methods, all on the same samples:

* ``window``: the LLM alone on the last ``window`` tokens;
* ``full``: all context + tail tokens at once (only where they fit the LLM's positions);
* ``streaming``: StreamingLLM -- 4 attention-sink tokens (the sample's first) + the most recent tokens;
* ``pi`` / ``ntk``: full attention with RoPE position interpolation (linear) or dynamic NTK scaling, through
  transformers' ``rope_parameters``, stretched to the sample length;
* ``ext:K``: extensible embeddings at a fixed k; ``ext:adaptive``: the smallest k that fits the window;
* ``foreign:ext:K`` / ``foreign:ext:adaptive``: the content control -- the same layout, raw tokens and k as
  ``ext:K`` / ``ext:adaptive``, but the compressed rows are those of a span of the same length of another document
  (``donor_span``). ``ext:K - foreign:ext:K`` is what the content of the compressed rows is worth; where nothing is
  compressed (a context that fits the window) the two are the same.
* ``foreign:full``: the content control of full attention itself -- the sample's last ``window`` tokens (what
  ``window`` reads) and its tail as they are, every token before them taken from the donor span. ``full -
  foreign:full`` is what the raw text before the window is worth as content -- the yardstick of what its rows
  carry; ``window - foreign:full`` is what any text there gives (on books it costs: another book's text misleads).
* ``recall:K`` / ``foreign:recall:K``: the reconstruction diagnostic -- the tail's whole chunks scored right after
  their own rows at k (nothing else before them), or after the rows of the donor span's last chunks. ``recall:K -
  foreign:recall:K`` says whether the LLM can decode rows at all: how much of a chunk its rows give back.

Far tokens: the tail tokens that only the text before the window can tell (``text.evidence_only``: in the context
before the last ``window`` tokens ahead of the tail, but not in those tokens, not earlier in the tail, and not among
the 1000 most frequent tokens of the documents) -- mostly names and rare words. Per token, full attention gains most
over the window there (2.5x its mean gain at 8W on the held-out books, though those tokens hold only ~10% of it), and
that is where compressed rows' content shows first; the report scores every method on them too.

Samples are spans of ``context + tail`` tokens at offsets drawn from a generator seeded by (seed, document, context),
so every method and every run sees the same text; a foreign method's donor span is drawn from a generator seeded by
(seed, document, offset, context), so every run reads the same donor.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ContextTooLongError, UserError
from .layout import smallest_k
from .runtime import ExtensibleLM, Score
from .text import COMMON_TOKENS, MAX_SHARED, SHINGLE, common_tokens, evidence_only, shared_shingles, shingles

SINKS = 4
BASE_METHODS = ("window", "full", "streaming", "pi", "ntk")


@dataclass
class Sample:
    document: str
    offset: int
    ids: torch.Tensor  # context + tail tokens


FOREIGN = "foreign:"
FOREIGN_FULL = FOREIGN + "full"
DONOR_DRAWS = 20


def parse_methods(text: str, base: tuple[str, ...] = BASE_METHODS, named_ext: tuple[str, ...] = ("adaptive",),
                  foreign: bool = False) -> list[str]:
    """Comma-separated methods: one of ``base``, ``ext:K`` (an integer K >= 1), or ``ext:<name>`` for ``named_ext``;
    with ``foreign`` (eval-ppl), also ``recall:K``, ``foreign:full`` and ``foreign:`` before any ext or recall
    method."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    named = [f"ext:{name}" for name in named_ext]
    choices = [*base, "ext:K", *named] + ([f"{FOREIGN}ext:K", *(FOREIGN + m for m in named), "recall:K",
                                           f"{FOREIGN}recall:K", FOREIGN_FULL] if foreign else [])
    for method in methods:
        ext = method.removeprefix(FOREIGN) if foreign else method
        if ext in named or (ext == method and method in base) or (foreign and method == FOREIGN_FULL):
            continue
        prefix = next((p for p in ("ext:", "recall:") if ext.startswith(p) and (p == "ext:" or foreign)), None)
        if prefix:
            try:
                k = int(ext[len(prefix) :])
            except ValueError:
                raise UserError(f"bad method {method!r}: use {prefix}K with an integer K >= 1"
                                + (f", or {', '.join(named)}" if prefix == "ext:" else "")) from None
            if k < 1:
                raise UserError(f"bad method {method!r}: K must be >= 1")
            continue
        raise UserError(f"unknown method {method!r}; choose from {', '.join(choices)}")
    if not methods:
        raise UserError("no methods given")
    return methods


def document_names(sources: list[str]) -> list[str]:
    """Unique readable names for ``data.iter_documents``' ids ("path", or "path:row" for a record): a file's stem,
    or as much of its path as tells it from other files with that name; a record adds ":row"."""
    def split(source: str) -> tuple[str, str]:
        path, _, row = source.rpartition(":")
        is_record = row.isdigit() and Path(path).suffix in (".jsonl", ".parquet")
        return (path, ":" + row) if is_record else (source, "")

    files = list(dict.fromkeys(split(source)[0] for source in sources))
    depth = dict.fromkeys(files, 0)  # 0: the stem; d >= 1: the last d parts of the path

    def name(path: str) -> str:
        return Path(path).stem if depth[path] == 0 else "/".join(Path(path).parts[-depth[path] :])

    while True:
        counts = Counter(map(name, files))
        clashing = [f for f in files if counts[name(f)] > 1 and depth[f] < len(Path(f).parts)]
        if not clashing:
            break
        for path in clashing:
            depth[path] += 1
    return [name(path) + row for path, row in map(split, sources)]


def draw_samples(documents: dict[str, torch.Tensor], context: int, tail: int, per_document: int,
                 seed: int = 0) -> list[Sample]:
    span = context + tail
    samples = []
    for index, (name, ids) in enumerate(sorted(documents.items())):
        if len(ids) < span:
            continue
        rng = np.random.default_rng([seed, index, context])
        offsets = sorted(rng.choice(len(ids) - span + 1, size=min(per_document, len(ids) - span + 1), replace=False))
        samples += [Sample(name, int(o), ids[o : o + span]) for o in offsets]
    if not samples:
        longest = max(len(ids) for ids in documents.values())
        raise UserError(f"no document has {span} tokens (context {context} + tail {tail}); the longest has {longest}")
    return samples


def donor_span(documents: dict[str, torch.Tensor], sample: Sample, context: int, seed: int = 0) -> torch.Tensor:
    """The span whose compressed rows a foreign method reads instead of the sample's own: as long as the sample, from
    another document, drawn by (seed, the sample's document, its offset, context)."""
    names = sorted(documents)  # the order draw_samples numbers documents in
    span = len(sample.ids)
    donors = [name for name in names if name != sample.document and len(documents[name]) >= span]
    if not donors:
        longest = max((len(documents[name]) for name in names if name != sample.document), default=0)
        raise UserError(f"foreign methods need a {span}-token donor span (context {context} + tail "
                        f"{span - context}) from a document other than {sample.document!r}; the longest other has "
                        f"{longest} tokens: add longer documents to --data or lower --context")
    rng = np.random.default_rng([seed, names.index(sample.document), sample.offset, context])
    own = shingles(sample.ids.tolist())
    for _ in range(DONOR_DRAWS):  # another document may quote the sample (an anthology, a second edition)
        ids = documents[donors[rng.integers(len(donors))]]
        start = int(rng.integers(len(ids) - span + 1))
        taken = ids[start : start + span]
        if shared_shingles(own, shingles(taken.tolist())) < MAX_SHARED:
            return taken
    raise UserError(f"no donor span for {sample.document!r} at offset {sample.offset} in {DONOR_DRAWS} draws shares "
                    f"under {MAX_SHARED:.0%} of its token {SHINGLE}-grams: add other documents to --data")


class Protocol:
    """Scores samples with each method; holds the RoPE-scaled copies of the LLM that pi/ntk need."""

    def __init__(self, lm: ExtensibleLM):
        self.lm = lm
        self._scaled: dict[tuple[str, float], torch.nn.Module] = {}

    @property
    def positions(self) -> int:
        return self.lm.llm.config.max_position_embeddings

    def k_for(self, method: str, n_tokens: int) -> int | None:
        method = method.removeprefix(FOREIGN)  # a foreign method reads at its ext method's k
        if method == "ext:adaptive":
            return smallest_k(n_tokens - 1, self.lm.window, self.lm.chunk_size, self.lm.policy)
        kind, _, k = method.partition(":")
        return int(k) if kind in ("ext", "recall") else None

    def applicable(self, method: str, n_tokens: int) -> str | None:
        """None if the method can score a sample of ``n_tokens``; else why not."""
        if method in ("full", FOREIGN_FULL) and n_tokens > self.positions:
            return f"{n_tokens} tokens exceed the LLM's {self.positions} positions"
        if method.removeprefix(FOREIGN).startswith("recall:"):
            return None
        if method.removeprefix(FOREIGN).startswith("ext:"):
            k = self.k_for(method, n_tokens)
            if k is None or k > self.lm.chunk_size:
                return f"no k fits {n_tokens} tokens in window {self.lm.window}"
            try:
                self.lm.layout(k).compressed_chunks(n_tokens - 1)
            except ContextTooLongError:
                return f"k={k} cannot hold {n_tokens} tokens in window {self.lm.window}"
        return None

    def score(self, method: str, ids: torch.Tensor, tail: int, donor: torch.Tensor | None = None) -> Score:
        """``donor``: for a foreign method, the span (as long as ``ids``) whose compressed rows it reads."""
        lm = self.lm
        if method.startswith(FOREIGN) and (donor is None or len(donor) != len(ids)):
            raise UserError(f"{method} needs a donor span of {len(ids)} tokens")
        if method.removeprefix(FOREIGN).startswith("recall:"):
            return self._recall_score(ids, tail, self.k_for(method, len(ids)), donor)
        if method == FOREIGN_FULL:  # the donor's text wherever window's context does not reach
            near = max(0, len(ids) - 1 - lm.window)
            return self._full_score(lm.llm, torch.cat([donor[:near], ids[near:-1]]), ids, tail)
        if method.startswith(FOREIGN):
            # score() reads compressed rows from ``full`` wherever it covers a chunk, and a donor as long as the
            # sample covers every chunk the layout compresses: the embedder never sees the sample's own chunks.
            return lm.score(ids, tail, self.k_for(method, len(ids)), full=lm.encode(donor))
        if method == "window":
            return lm.score_window(ids, tail)
        if method == "streaming":
            keep = lm.window - SINKS
            context = torch.cat([ids[:SINKS], ids[max(SINKS, len(ids) - 1 - keep) : len(ids) - 1]])
            return self._full_score(lm.llm, context, ids, tail)
        if method == "full":
            return self._full_score(lm.llm, ids[:-1], ids, tail)
        if method in ("pi", "ntk"):
            factor = max(1.0, len(ids) / self.positions)
            return self._full_score(self._rope_scaled(method, factor), ids[:-1], ids, tail)
        return lm.score(ids, tail, self.k_for(method, len(ids)))

    @torch.no_grad()
    def _recall_score(self, ids: torch.Tensor, tail: int, k: int, donor: torch.Tensor | None) -> Score:
        """The tail's whole chunks, each token scored after the rows (at k) of those chunks -- or of the donor's
        last chunks -- and the tail's tokens before it: reconstruction from rows."""
        lm, size = self.lm, self.lm.chunk_size
        chunks = tail // size
        target = ids[len(ids) - tail : len(ids) - tail + chunks * size]
        source = target if donor is None else donor[len(donor) - tail : len(donor) - tail + chunks * size]
        rows = lm.extensible_embeddings(source, chunks, k)
        logprobs = lm._logprobs(lm.inputs_embeds(rows, target[:-1]), keep=len(target))
        return Score(-logprobs.gather(1, target[:, None].to(logprobs.device))[:, 0].cpu())

    @torch.no_grad()
    def _full_score(self, llm, context: torch.Tensor, ids: torch.Tensor, tail: int) -> Score:
        """The LLM on ``context`` (which ends right before the last token); scores the last ``tail`` tokens."""
        logits = llm(context[None].to(llm.device), use_cache=False, logits_to_keep=tail).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return Score(-logprobs.gather(1, ids[-tail:, None].to(logprobs.device))[:, 0].cpu())

    def _rope_scaled(self, method: str, factor: float):
        key = (method, round(factor, 3))
        if key not in self._scaled:
            from .models import load_llm

            rope = dict(self.lm.llm.config.rope_parameters)
            rope.update(rope_type="linear" if method == "pi" else "dynamic", factor=factor)
            # One scaled copy at a time: RoPE is fixed when the model is built, so each factor needs its own.
            llm = self.lm.llm
            self._scaled = {key: load_llm(llm.name_or_path, dtype=llm.dtype, device=llm.device, progress=False,
                                          rope_parameters=rope)[0]}
        return self._scaled[key]


def far_tokens(ids: torch.Tensor, tail: int, window: int, common: set[int]) -> torch.Tensor:
    """A mask over the last ``tail`` tokens of ``ids``: those only the text before the window can tell."""
    start = len(ids) - tail
    before = max(0, start - window)
    ids = ids.tolist()
    return torch.tensor(evidence_only(ids[start:], ids[:before], ids[before:start], common), dtype=torch.bool)


def bootstrap_interval(differences, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of the mean of per-sample differences (an array); given a list of arrays (one
    per file), of the average over files of each file's mean, resampling within each file."""
    groups = [differences] if isinstance(differences, np.ndarray) else [np.asarray(g) for g in differences]
    rng = np.random.default_rng(seed)
    means = np.mean([g[rng.integers(0, len(g), (rounds, len(g)))].mean(axis=1) for g in groups], axis=0)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate(protocol: Protocol, documents: dict[str, torch.Tensor], contexts: list[int], methods: list[str],
             tail: int = 512, per_document: int = 2, seed: int = 0, progress: bool = True,
             common: int = COMMON_TOKENS) -> tuple[list[dict], dict, dict]:
    """Rows ``{method, context, k, ppl, tokens, seconds, far_tokens, far_nll}``, per-sample mean NLLs keyed by
    (method, context), and the same over each sample's far tokens (NaN for a sample without any; the ``common`` most
    frequent tokens of the documents are never far)."""
    from tqdm.auto import tqdm

    if tail >= protocol.lm.window:
        raise UserError(f"--tail ({tail}) must be smaller than --window ({protocol.lm.window})")
    recall = [m for m in methods if m.removeprefix(FOREIGN).startswith("recall:")]
    if recall and tail < protocol.lm.chunk_size:
        raise UserError(f"{recall[0]} reconstructs the tail's whole chunks: --tail ({tail}) must be at least the "
                        f"chunk size ({protocol.lm.chunk_size})")
    for method in recall:  # a chunk keeps at least one row; the tail's chunks as rows, then as tokens, fit the window
        chunks, size, k = tail // protocol.lm.chunk_size, protocol.lm.chunk_size, protocol.k_for(method, 0)
        if k > size:
            raise UserError(f"{method}: K must be at most the chunk size ({size})")
        if chunks * (size + -(-size // k)) - 1 > protocol.lm.window:
            raise UserError(f"{method}: {chunks} chunks read as rows and then as tokens do not fit --window "
                            f"{protocol.lm.window}; lower --tail or raise K")
    foreign = [m for m in methods if m.startswith(FOREIGN)]
    if foreign and len(documents) < 2:
        raise UserError(f"{foreign[0]} reads another document's compressed rows: give --data two or more documents")
    # Every sample and donor span first: bad data fails before any scoring.
    samples = {context: draw_samples(documents, context, tail, per_document, seed) for context in contexts}
    donors = {context: [donor_span(documents, sample, context, seed) for sample in samples[context]]
              for context in contexts if any(protocol.applicable(m, context + tail) is None for m in foreign)}
    frequent = common_tokens(documents.values(), common)
    far_masks = {context: [far_tokens(sample.ids, tail, protocol.lm.window, frequent) for sample in samples[context]]
                 for context in contexts}
    rows, per_sample, per_sample_far = [], {}, {}
    jobs = [(context, method) for context in contexts for method in methods]
    bar = tqdm(total=len(jobs), desc="eval-ppl", disable=not progress)
    for context in contexts:
        for method in methods:
            bar.set_postfix_str(f"{method} at {context}")
            reason = protocol.applicable(method, context + tail)
            if reason:
                bar.write(f"skip {method} at context {context}: {reason}")
                bar.update()
                continue
            nll, far, far_nlls, tokens, seconds = [], [], [], 0, 0.0
            for i, sample in enumerate(samples[context]):
                start = time.perf_counter()
                donor = donors[context][i] if method.startswith(FOREIGN) else None
                score = protocol.score(method, sample.ids, tail, donor)
                seconds += time.perf_counter() - start
                nll.append(score.nll / score.tokens)
                tokens += score.tokens
                # far tokens are a measure of the methods that score the whole tail (not recall's whole chunks)
                mask = far_masks[context][i] if score.tokens == tail else torch.zeros(score.tokens, dtype=torch.bool)
                far_nlls.append(score.token_nll[mask])
                far.append(float(far_nlls[-1].mean()) if mask.any() else math.nan)
            per_sample[(method, context)] = np.array(nll)
            per_sample_far[(method, context)] = np.array(far)
            pooled = torch.cat(far_nlls)
            rows.append({"method": method, "context": context, "k": protocol.k_for(method, context + tail),
                         "ppl": math.exp(float(np.mean(nll))), "tokens": tokens, "seconds": round(seconds, 2),
                         "samples": len(samples[context]), "far_tokens": len(pooled),
                         "far_nll": float(pooled.mean()) if len(pooled) else None})
            bar.update()  # after the job, so the bar reaches its end when the last one is done
    bar.close()
    return rows, per_sample, per_sample_far


def markdown_report(rows: list[dict], per_sample: dict, baseline: str = "window",
                    per_sample_far: dict | None = None) -> str:
    """PPL table (methods x contexts), each method's paired-bootstrap interval against the baseline, and the content
    of the compressed rows: ``ext:K - foreign:ext:K`` in NLL -- over all tail tokens and, given ``per_sample_far``,
    over the far tokens."""
    contexts = sorted({row["context"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cell = {(row["method"], row["context"]): row for row in rows}
    lines = ["| method | " + " | ".join(f"L={c}" for c in contexts) + " |", "|---|" + "---:|" * len(contexts)]
    for method in methods:
        values = []
        for c in contexts:
            row = cell.get((method, c))
            adaptive = method.endswith("ext:adaptive")
            values.append("-" if row is None else f"{row['ppl']:.2f}" + (f" (k={row['k']})" if adaptive else ""))
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    against = []
    for (method, context), nll in per_sample.items():
        base = per_sample.get((baseline, context))
        if method == baseline or base is None:
            continue
        differences = np.exp(nll) - np.exp(base)
        low, high = bootstrap_interval(differences)
        against.append(f"| {method} | {context} | {differences.mean():+.3f} | [{low:+.3f}, {high:+.3f}] |")
    if against:  # no table when the baseline was not run
        lines += ["", f"PPL difference against `{baseline}` (negative = better), mean over samples of exp(mean NLL), "
                  "with a 95% paired-bootstrap interval:", "", "| method | context | ppl - baseline | 95% interval |",
                  "|---|---:|---:|---|", *against]
    lines += _content_rows(per_sample)
    if per_sample_far:
        lines += _far_rows(rows, per_sample_far)
    return "\n".join(lines) + "\n"


def _content_rows(per_sample: dict) -> list[str]:
    """``ext:K - foreign:ext:K`` (and ``full - foreign:full``) per context in mean NLL, with the share of full
    attention's gain over the window that the content recovers and, where ``foreign:full`` ran, the share of full
    attention's own content; no lines when no foreign method was run."""
    pairs = [(method[len(FOREIGN) :], context) for method, context in per_sample if method.startswith(FOREIGN)]
    pairs = [(ext, context) for ext, context in pairs if (ext, context) in per_sample]
    if not pairs:
        return []
    lines = ["", "`ext:K` minus `foreign:ext:K` (the same layout, raw tokens and k; another document's compressed "
             "rows): the content the compressed rows carry, as the mean per-sample NLL difference in nats/token with "
             "a 95% paired-bootstrap interval (negative = the document's own rows help). `full - foreign:full` is the "
             "same for the raw text before the window: its content read raw. Shares: (foreign - "
             "own) / (window - full), the part of full attention's gain over the window that the content recovers, "
             "and / (foreign:full - full), the part of the raw text's content:",
             "", "| difference | context | NLL difference | 95% interval | share of window - full "
             "| share of foreign:full - full |", "|---|---:|---:|---|---:|---:|"]
    for ext, context in pairs:
        own, foreign = per_sample[(ext, context)], per_sample[(FOREIGN + ext, context)]
        differences = own - foreign
        low, high = bootstrap_interval(differences)
        window, full = per_sample.get(("window", context)), per_sample.get(("full", context))
        shares = ["-", "-"]
        if not ext.startswith("recall:"):  # recall scores the tail's chunks alone: no share of the tail's gains
            shares[0] = _share(-differences.mean(), window, full)
        if ext.startswith("ext:") and (FOREIGN_FULL, context) in per_sample:
            shares[1] = _share(-differences.mean(), per_sample[(FOREIGN_FULL, context)], full)
        lines.append(f"| {ext} - {FOREIGN}{ext} | {context} | {differences.mean():+.4f} | [{low:+.4f}, {high:+.4f}] "
                     f"| {shares[0]} | {shares[1]} |")
    return lines


def _share(gain: float, worse: np.ndarray | None, better: np.ndarray | None) -> str:
    """``gain`` as a share of ``worse - better`` in mean NLL; "-" when either is missing or they are level."""
    if worse is None or better is None or worse.mean() == better.mean():
        return "-"
    return f"{gain / (worse.mean() - better.mean()):.0%}"


def _far_rows(rows: list[dict], per_sample_far: dict) -> list[str]:
    """Each method's mean NLL on the far tokens, and the content there: ``ext:K - foreign:ext:K`` (and ``full -
    foreign:full``) over the samples that have far tokens, with its share of ``window - full`` on the same samples."""
    scored = [row for row in rows if row.get("far_tokens")]
    if not scored:
        return []
    lines = ["", "On the far tokens (those only the text before the window can tell: names, rare words), the mean NLL "
             "of all of them pooled, in nats/token:", "",
             "| method | context | far tokens | far NLL |", "|---|---:|---:|---:|"]
    lines += [f"| {row['method']} | {row['context']} | {row['far_tokens']} | {row['far_nll']:.3f} |" for row in scored]
    pairs = [(method[len(FOREIGN) :], context) for method, context in per_sample_far if method.startswith(FOREIGN)]
    pairs = [(ext, c) for ext, c in pairs if (ext.startswith("ext:") or ext == "full") and (ext, c) in per_sample_far]
    if pairs:
        lines += ["", "The content on the far tokens: per-sample mean NLL over them, samples without far tokens left "
                  "out; share: (foreign - ext) / (window - full) on the same samples:", "",
                  "| difference | context | samples | NLL difference | 95% interval | share of window - full |",
                  "|---|---:|---:|---:|---|---:|"]
    for ext, context in pairs:
        own, foreign = per_sample_far[(ext, context)], per_sample_far[(FOREIGN + ext, context)]
        keep = ~np.isnan(own)
        if not keep.any():
            continue
        differences = own[keep] - foreign[keep]
        low, high = bootstrap_interval(differences)
        window, full = (per_sample_far.get((method, context)) for method in ("window", "full"))
        share = _share(-differences.mean(), *(None if nll is None else nll[keep] for nll in (window, full)))
        lines.append(f"| {ext} - {FOREIGN}{ext} | {context} | {int(keep.sum())} | {differences.mean():+.4f} | "
                     f"[{low:+.4f}, {high:+.4f}] | {share} |")
    return lines


def plot(rows: list[dict], path, title: str = "", baseline: str = "window") -> None:
    """PPL vs context length, one line per method; beside it, each method relative to the baseline on the same
    samples (samples differ between context lengths, so the ratio is what compares across them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(row["method"] for row in rows))
    base = {row["context"]: row["ppl"] for row in rows if row["method"] == baseline}
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(12 if base else 7, 4.5), squeeze=False)
    for method in methods:
        points = sorted((row["context"], row["ppl"]) for row in rows if row["method"] == method)
        axes[0, 0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        if base:
            relative = [(c, ppl / base[c]) for c, ppl in points if c in base]
            axes[0, 1].plot([p[0] for p in relative], [p[1] for p in relative], marker="o", label=method)
    axes[0, 0].set_ylabel("perplexity of the tail")
    axes[0, 0].set_title(title)
    if base:
        axes[0, 1].axhline(1.0, color="grey", linewidth=0.8)
        axes[0, 1].set_ylabel(f"perplexity / {baseline} perplexity (same samples)")
        axes[0, 1].set_title(f"relative to {baseline} (below 1 = better)")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens before the tail)")
        ax.grid(alpha=0.3)
    axes[0, -1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def tail_perplexity(lm: ExtensibleLM, ids: torch.Tensor, k: int, tail: int = 512, context: int | None = None) -> list[dict]:
    """``extemb ppl``: rows for window-only and ext:k on one document's tail."""
    context = fitting_context(lm, len(ids), k, tail, context)
    sample = ids[len(ids) - context - tail :]
    protocol = Protocol(lm)
    rows = []
    for method in ("window", f"ext:{k}"):
        start = time.perf_counter()
        score = protocol.score(method, sample, tail)
        rows.append({"method": method, "context": context, "k": protocol.k_for(method, len(sample)),
                     "ppl": score.ppl, "tokens": score.tokens, "seconds": round(time.perf_counter() - start, 3)})
    return rows
