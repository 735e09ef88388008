"""Benchmark: training throughput of the two-stream trainer beside a forward+backward of the LLM alone.

Same 2,048 tokens (the pydoc topics text, on every Python install), same bf16 autocast, same threads: one training
step's loss and backward (pass 1 over every chunk, pass 2 over every chunk i > 1) at several k, against the frozen
LLM made trainable for the measurement and run forward+backward on the 2,048 tokens as one sequence -- what training
the LLM itself on those tokens would cost. The median of ``--repeats`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from jobs.report import write_rows


def timed(step, repeats: int) -> float:
    step()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    from extensible.embedder import EmbedderConfig
    from extensible.models import load_llm
    from extensible.plugins import load_embedder
    from extensible.training import two_stream_loss
    from pipeline.corpus import pydoc_topics

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugin", default=None, help="plug-in to train from (default: the shipped one)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="out/bench/train.json")
    args = parser.parse_args()

    llm, tokenizer = load_llm()
    embedder = load_embedder(llm, tokenizer, args.plugin, EmbedderConfig(chunk_size=256))
    for name, parameter in embedder.named_parameters():  # train what the plug-in trains, in fp32 master weights
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    text = "\n\n".join(pydoc_topics().values())
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens])[None]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    rows = []

    for k in args.ks:
        def step(k=k):
            with autocast:
                loss = two_stream_loss(llm, embedder, ids, [k], embedder.config.chunk_size)
            loss.backward()
            embedder.zero_grad(set_to_none=True)

        seconds = timed(step, args.repeats)
        rows.append({"what": f"trainer k={k}", "seconds": seconds, "tokens_per_s": args.tokens / seconds})
        print(json.dumps(rows[-1]), flush=True)

    llm.requires_grad_(True)  # only for this measurement: the LLM as if it were trained itself

    def llm_step():
        with autocast:
            logits = llm(ids, use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits.float(), ids[0, 1:])
        loss.backward()
        llm.zero_grad(set_to_none=True)

    seconds = timed(llm_step, args.repeats)
    llm.requires_grad_(False)
    rows.append({"what": "LLM alone fwd+bwd", "seconds": seconds, "tokens_per_s": args.tokens / seconds})
    print(json.dumps(rows[-1]))
    lines = [f"| {args.tokens} tokens | s / step | tokens/s | vs LLM alone |", "|---|---:|---:|---:|"]
    lines += [f"| {r['what']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | {seconds / r['seconds']:.2f}x |" for r in rows]
    print("\n".join(lines))
    write_rows(args.out, rows, "\n".join(lines))


if __name__ == "__main__":
    main()
