"""make bench-library: what the library itself costs as it grows -- a query's overhead (retrieval, manifest, stored
reads and planning: everything but the LLM's forward), a commit per document, and verify per document -- in one
synthetic store grown to 100, 1,000 and 100,000 small documents.

The rows are random and the LLM is a small random Llama with SmolLM2's tokenizer (hidden 64, chunks of 16 tokens):
this measures the library, not the model. Each size is its own store (built once, ~25 minutes for 100,000
documents on one core, and reused by later runs unless ``--fresh``). Commits are timed on manifest rows alone, grown
to each size ``--commit-every`` rows at a time as precompute commits: the time per document is amortised over the
whole growth (compactions included), which is what a job of N documents pays. Verify and the queries are timed on
the stores, the queries interleaved between them, so every size is measured under the same load. Each line compares
the largest size with the smaller one the issue names; the goal is <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from extensible import ExtensibleEmbedder, ExtensibleLM, load_llm
from extensible.embedder import EmbedderConfig
from pipeline.corpus import content_hash
from rag.index import build_index, index_is_current
from rag.library import Library
from storage.store import Store, runtime_fingerprints

WORDS = ("river stone lamp window garden letter morning silver harbour candle orchard bridge winter meadow "
         "lantern copper island thunder velvet compass").split()


def tiny_runtime(folder: Path, chunk_size: int) -> ExtensibleLM:
    """A small random Llama saved with SmolLM2's tokenizer, and an untrained embedder of its first layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tokenizer = load_llm(progress=False)
    if not (folder / "config.json").exists():
        config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=True)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    llm, tokenizer = load_llm(str(folder), progress=False)
    embedder = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=1, chunk_size=chunk_size))
    return ExtensibleLM(llm, tokenizer, embedder, window=512)


def add_documents(store: Store, lm: ExtensibleLM, count: int, tokens: int, commit_every: int,
                  rng: np.random.Generator) -> None:
    """Writes ``count`` documents (random words, random rows) and commits them."""
    fingerprints = runtime_fingerprints(lm)
    pending = []
    for i in tqdm(range(count), desc=f"{store.path.name}: documents", unit="doc", mininterval=10):
        text = " ".join(rng.choice(WORDS, tokens))
        encoding = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"][:tokens]
        text = text[: encoding["offset_mapping"][len(ids) - 1][1]]
        digest = content_hash(text)
        writer = store.writer(digest, len(ids))
        writer.append(rng.standard_normal((len(ids), store.hidden)).astype(np.float16))
        starts = [first for first, _ in encoding["offset_mapping"][: len(ids)]]
        row = {"doc_id": f"doc{i}", "source": f"synthetic/doc{i}.txt", "content_hash": digest, "n_tokens": len(ids),
               "chunk_size": store.chunk_size, "chunk_char_offsets": starts[:: store.chunk_size] + [len(text)],
               "dtype": "float16", "shape": [len(ids), store.hidden], "array": writer.name,
               "text_path": store.write_text(digest, text), "checksum": writer.close(), **fingerprints}
        store.write_record(row)
        pending.append(row)
        if len(pending) == commit_every or i == count - 1:
            store.commit(pending)
            pending = []


def commit_seconds(folder: Path, lm: ExtensibleLM, count: int, commit_every: int) -> float:
    """Seconds per document of committing ``count`` manifest rows to a new store, ``commit_every`` at a time."""
    shutil.rmtree(folder, ignore_errors=True)
    store = Store.create_or_open(folder, hidden=lm.hidden_size, chunk_size=lm.chunk_size, **runtime_fingerprints(lm))
    row = {"source": "synthetic", "n_tokens": 64, "chunk_size": lm.chunk_size, "chunk_char_offsets": [0, 90, 180, 270, 360],
           "dtype": "float16", "shape": [64, lm.hidden_size], "checksum": "0" * 64, **runtime_fingerprints(lm)}
    committing = 0.0
    for start in range(0, count, commit_every):
        rows = [{**row, "doc_id": f"doc{i}", "content_hash": content_hash(str(i)), "array": f"docs/{i}",
                 "text_path": f"texts/{i}.txt"} for i in range(start, min(count, start + commit_every))]
        began = time.perf_counter()
        store.commit(rows)
        committing += time.perf_counter() - began
    shutil.rmtree(folder)
    return committing / count


def query_seconds(libraries: list[Library], questions: int, rng: np.random.Generator) -> list[float]:
    """Per library, the median seconds of ``Library.prepare`` (search, manifest, reads, plan, composed input: all
    but the LLM's forward) over the same questions of random words, asked in turn of each library after a warm-up.
    The strategy is rag:4, so that every chunk read comes from Zarr (two 64-token documents would fit raw)."""
    asks = [" ".join(rng.choice(WORDS, 8)) + "?" for _ in range(questions + 3)]
    seconds = [[] for _ in libraries]
    for question in asks:
        for library, times in zip(libraries, seconds):
            began = time.perf_counter()
            library.prepare(question, documents=2, strategy="rag:4", answer_tokens=32)
            times.append(time.perf_counter() - began)
    return [statistics.median(times[3:]) for times in seconds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, nargs=3, default=[100, 1000, 100_000],
                        help="the three sizes: small (ask), middle (commit, verify), large")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per document")
    parser.add_argument("--commit-every", type=int, default=64)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--fresh", action="store_true", help="rebuild the synthetic stores even if they exist")
    parser.add_argument("--out", default="out/bench/library")
    args = parser.parse_args(argv)
    small, middle, large = args.documents
    if not 0 < small <= middle <= large:
        parser.error("--documents must be three increasing sizes")
    out = Path(args.out)
    lm = tiny_runtime(out / "model", chunk_size=16)
    rng = np.random.default_rng(0)
    commit_s = {size: commit_seconds(out / "commits", lm, size, args.commit_every) for size in (middle, large)}
    stores = {}
    for size in (small, middle, large):
        folder = out / f"store-{size}"
        if not args.fresh and (folder / "zarr.json").exists() and len(Store.open(folder)) == size:
            stores[size] = Store.open(folder)  # built by an earlier run: verify below checks every document
            continue
        shutil.rmtree(folder, ignore_errors=True)
        stores[size] = Store.create_or_open(folder, hidden=lm.hidden_size, chunk_size=lm.chunk_size,
                                            **runtime_fingerprints(lm))
        add_documents(stores[size], lm, size, args.tokens, args.commit_every, rng)
    verify_s = {}
    for size in (middle, large):
        began = time.perf_counter()
        problems = Store.open(stores[size].path).verify()
        verify_s[size] = (time.perf_counter() - began) / size
        if problems:
            raise SystemExit(f"bench-library: the synthetic store does not verify: {problems[0]}")
    libraries = []
    for size in (small, large):
        if not index_is_current(stores[size], "embedder-mean"):
            build_index(stores[size], "embedder-mean", progress=False)
        libraries.append(Library(Store.open(stores[size].path), lm=lm, encoder="embedder-mean"))
    ask_small, ask_large = query_seconds(libraries, args.questions, rng)
    results = {"commit_s_per_doc": commit_s, "verify_s_per_doc": verify_s, "ask_s": {small: ask_small, large: ask_large}}
    print(json.dumps(results), flush=True)
    lines = [f"ask overhead at {large} documents: {ask_large / ask_small:.2f}x of {small} documents "
             f"({ask_large * 1e3:.1f} ms vs {ask_small * 1e3:.1f} ms)",
             f"commit time per document at {large}: {commit_s[large] / commit_s[middle]:.2f}x of {middle} "
             f"({commit_s[large] * 1e3:.2f} ms vs {commit_s[middle] * 1e3:.2f} ms)",
             f"verify seconds per document at {large}: {verify_s[large] / verify_s[middle]:.2f}x of {middle} "
             f"({verify_s[large] * 1e3:.2f} ms vs {verify_s[middle] * 1e3:.2f} ms)"]
    print("\n".join(lines))
    (out / "library.json").write_text(json.dumps({**results, "lines": lines}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
