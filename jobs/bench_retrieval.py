"""Benchmark: passage retrieval with all-MiniLM-L6-v2 vs mean-pooled embedder outputs, on L-Eval documents.

The first ``--docs`` documents of each file are precomputed into one store (the real Ray job), both indexes are built,
and every question whose reference answer occurs verbatim in its document asks: is a chunk holding the answer among
the top k retrieved chunks (recall@k), and is the best passage in the right document (document@1)?
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from jobs.report import write_rows
from pipeline.precompute import precompute
from rag.index import build_index
from rag.library import Library
from rag.qa_eval import evaluate_retrieval, read_leval
from storage.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", nargs="+", default=["../shared/data/leval/natural_question.jsonl",
                                                      "../shared/data/leval/legal_contract_qa.jsonl"])
    parser.add_argument("--docs", type=int, default=6, help="documents per file")
    parser.add_argument("--out", default="out/bench/retrieval.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        records = {Path(f).stem: read_leval(f)[: args.docs] for f in args.data}
        corpus.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for rs in records.values() for r in rs))
        precompute(str(corpus), str(Path(tmp) / "store"), text_column="input")
        store = Store.open(Path(tmp) / "store")
        by_text = {store.text(row): row["doc_id"] for row in store.manifest().to_pylist()}
        library = Library(store)
        for encoder in ("minilm", "embedder-mean"):
            build_index(store, encoder)
            library.encoder_name, library._index, library._encoder = encoder, None, None
            for task, rs in records.items():
                questions = [(by_text[r["input"]], q, a) for r in rs if r["input"] in by_text
                             for q, a in zip(r["instructions"], r["outputs"])]
                results.append({"encoder": encoder, "task": task, **evaluate_retrieval(library, questions)})
                print(json.dumps(results[-1]), flush=True)
    lines = ["| task | encoder | questions | recall@1 | recall@5 | document@1 |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['encoder']} | {r['questions']} | {r['recall@1']:.2f} | {r['recall@5']:.2f} "
              f"| {r['document@1']:.2f} |" for r in results]
    print("\n".join(lines))
    write_rows(args.out, results, "\n".join(lines))


if __name__ == "__main__":
    main()
