"""make precompute CORPUS=... STORE=... -> this Ray job. Also: ray job submit --working-dir . -- python -m jobs.precompute"""

from __future__ import annotations

import argparse
import json
import sys

from extensible.errors import UserError
from pipeline.corpus import MAX_BYTES


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None, help="folder, file or glob (.txt/.md/.jsonl/.parquet); "
                        "default: the pydoc topics of this Python")
    parser.add_argument("--store", default="out/store", help="the store folder (created if absent)")
    parser.add_argument("--model", default=None, help="HF causal LM (default: the embedded SmolLM2)")
    parser.add_argument("--plugin", default=None, help="plug-in folder (default: the shipped one for the model)")
    parser.add_argument("--chunk", type=positive, default=None, help="chunk length (default: the plug-in's)")
    parser.add_argument("--workers", type=positive, default=1, help="embedder actors (one per GPU on a cluster)")
    parser.add_argument("--threads", type=positive, default=None, help="torch threads per CPU actor")
    parser.add_argument("--gpus-per-worker", type=float, default=None, help="num_gpus of each embedder actor "
                        "(bf16 on CUDA, batch sized to the GPU); default 1 when this machine has CUDA, else 0")
    parser.add_argument("--commit-every", type=positive, default=64, help="commit the manifest every N documents "
                        "(and every 5 s): a killed job loses at most that much work")
    parser.add_argument("--text-column", default="text", help="text field of .jsonl/Parquet records (L-Eval: input)")
    parser.add_argument("--max-bytes", type=positive, default=MAX_BYTES, help="larger corpus files are skipped and "
                        f"reported as too large (default {MAX_BYTES:,})")
    parser.add_argument("--wait", action="store_true", help="wait for another job writing the store to finish, "
                        "instead of refusing at once")
    parser.add_argument("--index", default="minilm", help="passage index to (re)build after: minilm (default), "
                        "embedder-mean, or none")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON too")


def run(args) -> int:
    from pipeline.precompute import precompute

    summary = precompute(args.corpus or None, args.store, model=args.model, plugin=args.plugin, chunk_size=args.chunk,
                         workers=args.workers, threads=args.threads, commit_every=args.commit_every,
                         text_column=args.text_column, max_bytes=args.max_bytes, wait=args.wait,
                         gpus_per_worker=args.gpus_per_worker)
    import ray

    if ray.is_initialized():  # Ray's notices of dead workers print asynchronously: let none land inside the summary
        ray.shutdown()
    print("\n".join(summary.lines()))
    if args.index != "none":
        from rag.index import build_index, index_is_current
        from storage.store import Store

        store = Store.open(args.store)
        try:
            current = index_is_current(store, args.index)
        except UserError:  # a damaged meta.json: the index is rebuilt
            current = False
        if len(store) and not current:
            print(f"passage index: {build_index(store, args.index)}")
    if args.json:
        print(json.dumps({**vars(summary), "tokens_per_s": summary.tokens_per_s}))
    return 1 if summary.problems.get("failed") else 0  # 0 only when every document that could be stored was


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as err:
        print(f"precompute: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
