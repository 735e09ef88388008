"""Which token of each k-block does the frozen LLM take content from, read as a row? (issue 19, runs/token-rows)

The kept-token plug-in (nothing trained: a row is the LLM's input embedding of its token) at 8W (context 7680, W =
1024, tail 512, the 12 spans and donors of eval-ppl's seed 0), with the token kept from each block of k chosen three
ways: ``strided`` (the last: what eval-ppl's ext:K reads), ``rare`` (the rarest in the training books) and
``surprisal`` (the one the LLM predicts worst, reading the text before it). Prints own - foreign per choice, with
its paired bootstrap interval.

    python runs/token-rows/kept_token_choice.py runs/token-rows/plugin 64 > runs/token-rows/eval/kept-token-choice.txt
"""
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

from extensible.evaluate import bootstrap_interval, donor_span, draw_samples
from extensible.plugins import load_extensible
from extensible.text import tokenize
from jobs.read_recipe import BOOKS, HELD_OUT  # the read stage's held-out books

CONTEXT, TAIL, PER_DOCUMENT = 7680, 512, 4
CHOICES = ("strided", "rare", "surprisal")

plugin, k = sys.argv[1], int(sys.argv[2])
lm = load_extensible(plugin=plugin, window=1024)
documents = {name: tokenize(lm.tokenizer, (Path(BOOKS) / f"{name}.txt").read_text()) for name in HELD_OUT}
counts = collections.Counter()
for path in sorted(Path(BOOKS).glob("*.txt")):
    if path.stem not in HELD_OUT:
        counts.update(tokenize(lm.tokenizer, path.read_text()).tolist())


@torch.no_grad()
def surprisal(ids: torch.Tensor, segment: int = 1024, prime: int = 256) -> torch.Tensor:
    """-log p(token | up to ``prime`` + the segment's tokens before it) under the frozen LLM."""
    out = torch.zeros(len(ids))
    for start in range(0, len(ids), segment):
        low = max(0, start - prime)
        logprobs = torch.log_softmax(lm.llm(ids[None, low : start + segment], use_cache=False).logits[0].float(), -1)
        positions = torch.arange(max(start, 1), min(start + segment, len(ids)))
        out[positions] = -logprobs[positions - low - 1, ids[positions]]
    return out


def kept_by(full: torch.Tensor, ids: torch.Tensor, choice: str) -> torch.Tensor:
    """Full-resolution rows whose strided pick (the last of each k) is the ``choice`` token of its block."""
    if choice == "strided":
        return full
    score = surprisal(ids) if choice == "surprisal" else torch.tensor([-np.log1p(counts[t]) for t in ids.tolist()])
    n = len(ids) // k * k
    full = full.clone()
    full[torch.arange(k - 1, n, k)] = full[score[:n].view(-1, k).argmax(1) + torch.arange(0, n, k)]
    return full


samples = draw_samples(documents, CONTEXT, TAIL, PER_DOCUMENT, seed=0)
results = {choice: [] for choice in CHOICES}
started = time.time()
for i, sample in enumerate(samples):
    donor = donor_span(documents, sample, CONTEXT, seed=0)
    own_rows, donor_rows = lm.encode(sample.ids), lm.encode(donor)
    for choice in CHOICES:
        own = lm.score(sample.ids, TAIL, k, full=kept_by(own_rows, sample.ids, choice)).mean_nll
        foreign = lm.score(sample.ids, TAIL, k, full=kept_by(donor_rows, donor, choice)).mean_nll
        results[choice].append((own, foreign))
    print(f"span {i} {sample.document}: " + ", ".join(
        f"{c} {results[c][-1][0] - results[c][-1][1]:+.4f}" for c in CHOICES) + f" ({time.time() - started:.0f} s)")
for choice in CHOICES:
    nll = np.array(results[choice])
    difference = nll[:, 0] - nll[:, 1]
    low, high = bootstrap_interval(difference)
    print(f"{choice}: own ppl {np.exp(nll[:, 0].mean()):.2f}, foreign {np.exp(nll[:, 1].mean()):.2f}, own - foreign "
          f"{difference.mean():+.4f} [{low:+.4f}, {high:+.4f}]")
