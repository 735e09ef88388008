"""extemb: one command line for the library. Each subcommand parses, calls the library, prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from extensible.errors import UserError
from jobs.precompute import positive as _positive  # one parser of positive integers for every command
from jobs.report import write_rows


def _k(value: str) -> int | str:
    """A down-scaling factor: a positive integer, or 'auto'."""
    return value if value == "auto" else _positive(value)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF causal LM path or id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--plugin", help="plug-in folder (default: the shipped plug-in for the model, if any)")
    parser.add_argument("--untrained", action="store_true", help="ignore shipped plug-ins: a fresh copy of the layers")
    parser.add_argument("--window", type=_positive, default=1024, help="the LLM's window in tokens (default 1024)")
    parser.add_argument("--chunk", type=_positive, default=None, help="chunk length (default: the plug-in's, 512)")
    parser.add_argument("--layers", type=_positive, default=None, help="layers of a fresh embedder (default 8)")
    parser.add_argument("--method", default=None, help="down-scaling: strided (default), terminal, random, mean")
    parser.add_argument("--policy", default="sliding", help="sliding (default: compress the oldest chunk when the "
                        "window overflows, keeping the most raw tokens) or session (the paper's online mode)")


def _runtime(args):
    from extensible.plugins import load_extensible

    return load_extensible(args.model, args.plugin, window=args.window, chunk_size=args.chunk,
                           untrained=args.untrained, num_layers=args.layers, method=args.method, policy=args.policy)


def _resolve_k(lm, k, n_tokens: int, reserved: int = 0) -> int:
    """``k``, or with "auto" the smallest k at which ``n_tokens`` fit the window less ``reserved`` raw positions."""
    from extensible.layout import smallest_k

    if k != "auto":
        return k
    chosen = smallest_k(n_tokens, lm.window - reserved, lm.chunk_size, lm.policy)
    if chosen is None:
        raise UserError(f"{n_tokens} tokens do not fit window {lm.window} at any k; raise --window")
    return chosen


def cmd_ppl(args) -> None:
    from extensible.evaluate import tail_perplexity
    from extensible.text import read_text, tokenize

    if args.window <= args.tail:
        raise UserError(f"--window ({args.window}) must be larger than --tail ({args.tail}): the target must fit")
    text = read_text(args.file)
    lm = _runtime(args)
    ids = tokenize(lm.tokenizer, text)
    k = _resolve_k(lm, args.k, min(len(ids), args.context + args.tail) if args.context else len(ids))
    rows = tail_perplexity(lm, ids, k, tail=args.tail, context=args.context)
    print(f"{args.file}: {len(ids)} tokens; scoring the last {args.tail} given {rows[0]['context']} tokens of context "
          f"(window {lm.window}, chunk {lm.chunk_size})")
    for row in rows:
        print(f"  {row['method']:<10} ppl {row['ppl']:8.3f}   {row['seconds']:6.1f} s")
    if args.json:
        print(json.dumps(rows))


def cmd_generate(args) -> None:
    from extensible.text import chat_tokens, read_text

    if args.max_new_tokens >= args.window:  # longer answers would be compressed by the model as it writes them
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) must be smaller than --window ({args.window})")
    text = read_text(args.file)
    lm = _runtime(args)
    opening, ids = chat_tokens(lm.tokenizer, text, args.prompt)  # the template's opening stays raw, in front
    k = _resolve_k(lm, args.k, len(ids) + args.max_new_tokens, reserved=len(opening))
    new = lm.generate(ids, k, max_new_tokens=args.max_new_tokens, prefix=opening)
    answer = lm.tokenizer.decode(new, skip_special_tokens=True).strip()
    tokens = len(opening) + len(ids)
    if args.json:
        print(json.dumps({"answer": answer, "k": k, "input_tokens": tokens, "new_tokens": len(new)}))
    else:
        print(f"[{tokens} input tokens, k={k}, window {lm.window}]")
        print(answer)


def cmd_eval_ppl(args) -> None:
    from extensible.data import expand_sources, iter_documents
    from extensible.evaluate import Protocol, document_names, evaluate, markdown_report, parse_methods, plot
    from extensible.text import tokenize

    methods = parse_methods(args.methods, foreign=True)
    if args.window <= args.tail:
        raise UserError(f"--window ({args.window}) must be larger than --tail ({args.tail}): the target must fit")
    lm = _runtime(args)
    sources = list(iter_documents(expand_sources(args.data)))
    names = document_names([source for source, _ in sources])  # unique: a file's records, same-named files
    documents = {name: tokenize(lm.tokenizer, text) for name, (_, text) in zip(names, sources)}
    if not documents:
        raise UserError(f"no readable UTF-8 text in {' '.join(args.data)}")
    rows, per_sample, per_sample_far = evaluate(Protocol(lm), documents, sorted(args.context), methods,
                                                tail=args.tail, per_document=args.samples, seed=args.seed)
    report = markdown_report(rows, per_sample, per_sample_far=per_sample_far)
    print(report)
    if args.json:
        out = write_rows(args.json, rows, report)
        plot(rows, out.with_suffix(".png"), f"tail {args.tail}, window {lm.window}, chunk {lm.chunk_size}")
        print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")


def cmd_precompute(args) -> int:
    from jobs.precompute import run

    return run(args)


def cmd_store(args) -> int:
    from storage.store import Store

    store = Store.open(args.store)
    if args.action == "info":
        print(json.dumps(store.info(), indent=2))
        return 0
    if args.action == "repair":
        for line in store.repair():
            print(line)
        return 0
    from rag.index import check_indexes

    problems = store.verify()
    if not problems:  # the index is checked against a sound manifest
        problems = check_indexes(store)
    for problem in problems:
        print(f"corrupt: {problem}", file=sys.stderr)
    try:
        documents = str(len(store))
    except UserError:  # an unreadable manifest, already named above
        documents = "?"
    print(f"{args.store}: {documents} documents, {len(problems)} problems")
    return 1 if problems else 0


def cmd_index(args) -> None:
    from rag.index import build_index, index_meta
    from storage.store import Store

    store = Store.open(args.store)
    folder = build_index(store, args.encoder)
    meta = index_meta(store, args.encoder)
    print(f"indexed {meta['passages']:,} passages of {meta['documents']} documents into {folder}")


def _print_answer(answer, as_json: bool) -> None:
    if as_json:
        print(json.dumps(answer.to_dict()))
        return
    print(f"Q: {answer.question}\nA: {answer.answer}")
    for source in answer.sources:
        compressed = sorted({k for k in source.chunk_ks.values() if k > 1})
        read = f"chunks {', '.join(map(str, source.raw_chunks))} raw" if source.raw_chunks else "no chunk raw"
        if compressed:
            read += f", {source.chunks_read - len(source.raw_chunks)} compressed at k={'/'.join(map(str, compressed))}"
        print(f"   source: {source.source} (score {source.score:.3f}; {read}; {source.chunks_read}/"
              f"{source.chunks_total} chunks read)")
    print(f"   [{answer.input_positions} input positions, {answer.seconds:.1f} s, {answer.strategy}]")


def cmd_ask(args) -> None:
    from rag.library import Library
    from rag.plan import DEFAULT_STRATEGY  # imported here: torch loads only for the commands that need it

    library = Library(args.store, encoder=args.encoder, model=args.model, plugin=args.plugin, window=args.window)
    for question in args.question:
        answer = library.answer(question, documents=args.documents, strategy=args.strategy or DEFAULT_STRATEGY,
                                max_new_tokens=args.max_new_tokens, max_k=args.max_k)
        _print_answer(answer, args.json)


def cmd_eval_qa(args) -> None:
    from rag.qa_eval import evaluate_qa, parse_qa_methods, plot_qa, qa_markdown

    methods = parse_qa_methods(args.methods)
    lm = _runtime(args)
    journal = Path(args.json).with_suffix(".questions.jsonl") if args.json else None
    if journal and not args.resume:
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text("")
    rows, records = evaluate_qa(lm, args.data, methods, limit=args.limit, max_new_tokens=args.max_new_tokens,
                                generate=not args.no_generate, journal=journal, max_k=args.max_k, store=args.store)
    report = qa_markdown(rows, records)
    print(report)
    if args.json:
        out = write_rows(args.json, rows, report)
        journal.write_text("".join(json.dumps(r) + "\n" for r in records))  # this run's records only
        plot_qa(rows, out.with_suffix(".png"), f"window {lm.window}, chunk {lm.chunk_size}")
        print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')} and the questions beside them")


MAX_K_HELP = ("the planner's coarsest k (default: the coarsest the plug-in was trained at, 8 for the shipped one): "
              "hybrid reads the chunks left beside the raw passages at this k; graded starts the most relevant chunks "
              "at it, in half the budget")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extemb", description="Extensible embeddings for a frozen short-window LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    ppl = sub.add_parser("ppl", help="perplexity of a file's last tokens: window-only vs extensible embeddings")
    ppl.add_argument("file")
    ppl.add_argument("--k", type=_k, default=8, help="down-scaling factor (default 8), or 'auto' (smallest that fits)")
    ppl.add_argument("--tail", type=_positive, default=512, help="tokens scored at the end of the file")
    ppl.add_argument("--context", type=_positive, default=None, help="context tokens before the tail (default: all that fit)")
    ppl.add_argument("--json", action="store_true", help="also print the rows as JSON")
    _model_args(ppl)
    ppl.set_defaults(func=cmd_ppl)

    ev = sub.add_parser("eval-ppl", help="the perplexity protocol: methods x context lengths on held-out documents")
    ev.add_argument("--data", nargs="+", required=True, help="files, folders or globs of documents")
    ev.add_argument("--context", type=_positive, nargs="+", required=True, help="context lengths L before the tail")
    ev.add_argument("--tail", type=_positive, default=512)
    ev.add_argument("--samples", type=_positive, default=2, help="samples per document and context length")
    ev.add_argument("--methods", default="window,full,ext:adaptive",
                    help="comma-separated: window, full, streaming, pi, ntk, ext:K, ext:adaptive, foreign:ext:K, "
                    "foreign:ext:adaptive (the content control: ext's layout, raw tokens and k, with the compressed "
                    "rows of a same-length span of another --data document), recall:K and foreign:recall:K (the "
                    "tail's whole chunks scored after their own rows at k, or another document's: reconstruction), "
                    "foreign:full (full attention with the donor's text before the window: the raw text's content)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", help="write the rows here (and a .md table and a .png plot beside it)")
    _model_args(ev)
    ev.set_defaults(func=cmd_eval_ppl)

    pre = sub.add_parser("precompute", help="embed a corpus into a store (the Ray job of make precompute)")
    from jobs.precompute import add_arguments

    add_arguments(pre)
    pre.set_defaults(func=cmd_precompute)

    st = sub.add_parser("store", help="inspect, check or repair a store")
    st.add_argument("action", choices=["info", "verify", "repair"], help="info; verify (recompute every checksum, "
                    "exit 1 naming any problem); repair (rebuild the manifest from the documents' records)")
    st.add_argument("store")
    st.set_defaults(func=cmd_store)

    gen = sub.add_parser("generate", help="answer a prompt about a long file")
    gen.add_argument("file")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--k", type=_k, default="auto", help="down-scaling factor, or 'auto' (default)")
    gen.add_argument("--max-new-tokens", type=_positive, default=64, help="at most this many (fewer than --window)")
    gen.add_argument("--json", action="store_true")
    _model_args(gen)
    gen.set_defaults(func=cmd_generate)

    idx = sub.add_parser("index", help="build the passage index (faiss) beside a store")
    idx.add_argument("store")
    idx.add_argument("--encoder", default="minilm", help="minilm (default) or embedder-mean")
    idx.set_defaults(func=cmd_index)

    ask = sub.add_parser("ask", help="answer questions from a stored library")
    ask.add_argument("question", nargs="+")
    ask.add_argument("--store", required=True)
    ask.add_argument("--documents", type=_positive, default=2, help="documents read per question (default 2)")
    ask.add_argument("--strategy", default=None, help="graded (default, the library's: the most relevant chunks "
                     "compressed in half the window, the nearest refined, raw where they fit; the best measured on "
                     "span and factoid QA), hybrid (rag's passages raw, the rest compressed; better for long "
                     "free-text answers), rag (the nearest passages raw, nothing compressed), adaptive, or rag:K "
                     "(rag's passages read compressed at k=K: a control)")
    ask.add_argument("--encoder", default="minilm", help="passage index to search: minilm or embedder-mean")
    ask.add_argument("--window", type=_positive, default=4096, help="the LLM's window in tokens (default 4096)")
    ask.add_argument("--max-new-tokens", type=_positive, default=96)
    ask.add_argument("--max-k", type=_positive, help=MAX_K_HELP)
    ask.add_argument("--model", help="HF causal LM the store was built with (default: the embedded SmolLM2)")
    ask.add_argument("--plugin", help="plug-in the store was built with (default: the shipped one)")
    ask.add_argument("--json", action="store_true")
    ask.set_defaults(func=cmd_ask)

    qa = sub.add_parser("eval-qa", help="QA on L-Eval-format files: window vs extensible embeddings")
    qa.add_argument("--data", nargs="+", required=True, help="L-Eval .jsonl files")
    qa.add_argument("--methods", default="window,rag,ext:graded,hybrid",
                    help="comma-separated: window, full, rag, rag:K (rag's passages, all read compressed at k=K: the "
                    "test of reading), hybrid, ext:adaptive, ext:graded (the library's default planner), ext:K, and "
                    "foreign:M for M = hybrid, rag:K, ext:adaptive or ext:graded (M's plan read with another "
                    "document's compressed rows: a control; foreign = foreign:hybrid), and with --store library:rag, "
                    "library:hybrid, library:graded (the question asked of the whole stored library)")
    qa.add_argument("--limit", type=_positive, default=None,
                    help="questions per file, spread over its documents and over each document's questions")
    qa.add_argument("--max-new-tokens", type=_positive, default=64, help="answer length (and the reference tokens scored)")
    qa.add_argument("--no-generate", action="store_true", help="answer NLL only: no generation, no F1/EM/ROUGE-L")
    qa.add_argument("--max-k", type=_positive, help=MAX_K_HELP)
    qa.add_argument("--store", help="a store holding every document of --data (precomputed with --text-column "
                    "input): library:rag, library:hybrid and library:graded ask each question of the whole library, "
                    "retrieval included")
    qa.add_argument("--json", help="write the rows here (a .md table, a .png plot and every question beside it, "
                    "the questions as they are answered)")
    qa.add_argument("--resume", action="store_true", help="reuse the answered questions that --json's .questions.jsonl "
                    "holds from a run with the same settings (a killed run goes on where it stopped; window, full and "
                    "rag records serve any plug-in, rag's of the same chunk size)")
    _model_args(qa)
    qa.set_defaults(func=cmd_eval_qa)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="extemb: %(message)s")
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"extemb: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
