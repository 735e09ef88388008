"""Benchmarks of the precompute job (make bench): throughput against a bare HF forward, bytes per token,
1 vs 2 Ray workers, and the prefix read of a strided sample against reading the whole array.

Everything in one run, side by side; the corpus is the pydoc topics (on every Python install).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


def bare_forward_tokens_per_s(store_path: Path, threads: int) -> float:
    """The embedder's N layers as a plain HF model on the same stored documents' tokens, same chunking."""
    from extensible.plugins import load_extensible
    from storage.store import Store

    torch.set_num_threads(threads)
    lm = load_extensible()
    store = Store.open(store_path)
    texts = [store.text(row) for row in store.manifest().to_pylist()]
    body, size = lm.embedder.body, lm.chunk_size
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
            complete = len(ids) // size
            for i in range(0, complete, lm.encode_batch):
                body(input_ids=ids[i * size : min(i + lm.encode_batch, complete) * size].view(-1, size))
            if len(ids) % size:
                body(input_ids=ids[complete * size :][None])
            tokens += len(ids)
    return tokens / (time.perf_counter() - start)


def first_tokens(store_path: Path) -> int:
    """Tokens of the document committed first (the manifest keeps commit order)."""
    from storage.store import Store

    return int(Store.open(store_path).manifest().column("n_tokens")[0].as_py())


def prefix_read(store_path: Path, k: int) -> dict:
    """Latency of reading a document's strided sample at k: the prefix path vs a full read + stride in memory."""
    from storage.store import Store

    store = Store.open(store_path)
    document = max(store.documents(), key=len)
    chunks = len(document) // document.row["chunk_size"]
    timings = {}
    for name, read in (("prefix", lambda: document.strided(k, chunks)),
                       ("full_then_stride", lambda: document.read())):
        start = time.perf_counter()
        for _ in range(5):
            read()
        timings[name] = (time.perf_counter() - start) / 5
    return {"k": k, "tokens": len(document), "prefix_s": timings["prefix"], "full_read_s": timings["full_then_stride"],
            "speedup": timings["full_then_stride"] / timings["prefix"]}


def main() -> None:
    from pipeline.precompute import precompute

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--corpus", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"runs": []}
    for workers in (1, 2):
        store = out / f"store-{workers}w"
        shutil.rmtree(store, ignore_errors=True)
        summary = precompute(args.corpus, str(store), workers=workers, threads=max(1, 2 // workers), progress=False)
        # Steady state: the documents after the first, over the time after the first result (start-up excluded).
        steady = (summary.tokens - first_tokens(store)) / (summary.seconds - summary.first_document_seconds)
        results["runs"].append({"workers": workers, "threads_each": max(1, 2 // workers), "tokens": summary.tokens,
                                "seconds": summary.seconds, "tokens_per_s": summary.tokens_per_s,
                                "startup_s": summary.first_document_seconds, "steady_tokens_per_s": steady,
                                "bytes": summary.bytes_written})
        print(f"precompute, {workers} worker(s): {summary.tokens_per_s:,.0f} tokens/s end to end "
              f"({summary.tokens:,} tokens in {summary.seconds:.1f} s, {summary.first_document_seconds:.1f} s to the "
              f"first document), {steady:,.0f} tokens/s after it", flush=True)
    bare = bare_forward_tokens_per_s(out / "store-1w", threads=2)
    results["bare_forward_tokens_per_s"] = bare
    one = results["runs"][0]
    print(f"bare HF forward of the same layers: {bare:,.0f} tokens/s -> precompute/bare = "
          f"{one['tokens_per_s'] / bare:.2f} end to end, {one['steady_tokens_per_s'] / bare:.2f} after start-up "
          "(goal >= 0.8)")
    from storage.store import Store

    info = Store.open(out / "store-1w").info()
    results["bytes_per_token"] = info["bytes_per_token"]
    print(f"stored bytes per token: {info['bytes_per_token']:.0f} (float16 before compression: {2 * info['hidden']}; "
          f"ratio {info['bytes_per_token'] / (2 * info['hidden']):.2f})")
    results["prefix_reads"] = [prefix_read(out / "store-1w", k) for k in (8, 32)]
    for row in results["prefix_reads"]:
        print(f"strided sample at k={row['k']} of a {row['tokens']}-token document: prefix read {row['prefix_s'] * 1e3:.1f} ms "
              f"vs full read {row['full_read_s'] * 1e3:.1f} ms ({row['speedup']:.1f}x)")
    (out / "precompute.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
