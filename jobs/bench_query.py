"""Benchmark: latency and peak memory of one QA query, offline mode vs plain passage RAG, window-only and full attention.

Same question, same answer length (32 tokens forced), window 1024, each query kind in its own process (the model
loaded, one warm-up query, then the peak-RSS mark reset and ``--repeats`` timed queries; the median is reported):

* ``window``: the last tokens of the 32K document that fit the window, as plain tokens;
* ``rag-32k``: ``Library.answer`` with ``strategy="rag"`` on the stored 32K document: the question encoded, every
  chunk scored against it, the best chunks read as plain tokens;
* ``hybrid-32k`` / ``hybrid-8k``: ``Library.answer`` with ``strategy="hybrid"``: the same passages raw, the rest of
  the document's precomputed outputs read from the store at a coarse k (only those rows are read);
* ``graded-32k``: ``Library.answer`` with the default planner, ``graded``: the most relevant chunks' rows in half the
  window, the nearest refined (raw where they fit);
* ``full-8k``: all 8K tokens as plain tokens (full attention; the model has 8K positions).

Text: the concatenated pydoc topics (on every Python install), cut to the lengths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.report import write_rows

QUESTION = "What does the with statement do?"
KINDS = ("window", "rag-32k", "hybrid-32k", "graded-32k", "hybrid-8k", "full-8k")
LENGTHS = {"window": 32768, "rag-32k": 32768, "hybrid-32k": 32768, "graded-32k": 32768, "hybrid-8k": 8000,
           "full-8k": 8000}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _document_ids(lm, length: int) -> list[int]:
    from pipeline.corpus import pydoc_topics

    ids = lm.tokenizer("\n\n".join(pydoc_topics().values()), add_special_tokens=False)["input_ids"]
    return ids[:length]


def build_store(path: Path, window: int) -> None:
    """The two documents' full-resolution outputs, written by the precompute job's own writer."""
    from extensible.plugins import load_extensible
    from pipeline.corpus import content_hash
    from pipeline.precompute import write_document
    from rag.index import build_index
    from storage.store import Store, runtime_fingerprints

    lm = load_extensible(window=window)
    store = Store.create_or_open(path, **runtime_fingerprints(lm), hidden=lm.hidden_size,
                                 chunk_size=lm.chunk_size)
    for length in sorted(set(LENGTHS.values())):
        text = lm.tokenizer.decode(_document_ids(lm, length))
        ref = {"doc_id": f"pydoc-{length}", "source": f"pydoc topics, first {length} tokens",
               "content_hash": content_hash(text), "text": text, "path": ""}
        store.commit([write_document(lm, store, ref)])
    build_index(store, progress=False)


def worker(kind: str, store_path: str, window: int, new_tokens: int, repeats: int) -> dict:
    import torch

    from extensible.plugins import load_extensible
    from rag.library import Library, Source, prompt_parts
    from rag.plan import STRATEGIES
    from storage.store import Store

    torch.set_num_threads(2)
    lm = load_extensible(window=window)
    store = Store.open(store_path)
    generate = {"min_new_tokens": new_tokens}
    # The plain-token queries get their document's tokens ready-made, as the offline ones get stored rows: tokenizing
    # the text is not part of a query.
    strategy = kind.split("-")[0]  # rag-32k -> rag; window and full-8k name no strategy
    planned = strategy in STRATEGIES
    document_ids = None if planned else _document_ids(lm, LENGTHS[kind])
    library = Library(store, lm=lm) if planned else None

    def query() -> int:
        if planned:  # the document is given, so every planned kind reads the same one; rows are read per query
            source = Source(f"pydoc-{LENGTHS[kind]}", "pydoc", float("nan"))
            answer = library.answer(QUESTION, sources=[source], strategy=strategy,
                                    max_new_tokens=new_tokens, **generate)
            return answer.input_positions
        before, after = prompt_parts(lm.tokenizer, QUESTION)
        ids = document_ids
        if kind == "window":
            ids = ids[len(ids) - (window - len(before) - len(after) - new_tokens) :]
        else:
            lm.window = lm.llm.config.max_position_embeddings
        embeds = lm.compose([torch.tensor(before + ids + after)])
        lm.generate_embeds(embeds, new_tokens, **generate)
        return embeds.shape[1]

    positions = query()  # warm-up
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark: measure the queries only
    loaded = _status_kib("VmRSS")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        query()
        seconds.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")
    return {"kind": kind, "document_tokens": LENGTHS[kind], "input_positions": positions, "new_tokens": new_tokens,
            "seconds": statistics.median(seconds), "all_seconds": seconds, "rss_after_load_mib": loaded / 1024,
            "peak_rss_mib": peak / 1024, "added_mib": (peak - loaded) / 1024}


def report(rows: dict, window: int) -> str:
    lines = [f"| query (window {window}) | document tokens | input positions | median s | peak RSS MiB | added MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        lines.append(f"| {row['kind']} | {row['document_tokens']:,} | {row['input_positions']:,} | {row['seconds']:.2f} "
                     f"| {row['peak_rss_mib']:.0f} | {row['added_mib']:.0f} |")
    hybrid_vs_rag = rows["hybrid-32k"]["seconds"] / rows["rag-32k"]["seconds"]
    graded_vs_rag = rows["graded-32k"]["seconds"] / rows["rag-32k"]["seconds"]
    hybrid_vs_window = rows["hybrid-32k"]["seconds"] / rows["window"]["seconds"]
    full_vs_hybrid = rows["full-8k"]["seconds"] / rows["hybrid-8k"]["seconds"]
    lines += ["", f"hybrid 32K / rag 32K latency: {hybrid_vs_rag:.2f}x (goal <= 1.2x)",
              f"graded 32K (the default planner) / rag 32K latency: {graded_vs_rag:.2f}x (goal <= 1.2x)",
              f"hybrid 32K / window-only latency: {hybrid_vs_window:.2f}x",
              f"full attention 8K / hybrid 8K latency: {full_vs_hybrid:.1f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="out/bench/query.json")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.store, args.window, args.new_tokens, args.repeats)))
        return
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_store(Path(tmp) / "store", args.window)
        for kind in KINDS:
            cmd = [sys.executable, "-m", "jobs.bench_query", "--worker", kind, "--store", str(Path(tmp) / "store"),
                   "--window", str(args.window), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
            rows[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"{kind:>12}: {rows[kind]['seconds']:.2f} s, peak RSS {rows[kind]['peak_rss_mib']:.0f} MiB", flush=True)
    text = report(rows, args.window)
    print(text)
    write_rows(args.out, list(rows.values()), text)


if __name__ == "__main__":
    main()
