"""make train-read / make train-read-gpu / make train-recall / python -m jobs.read_recipe [--gpu | --recall]
[jobs.train_read options]: the read stage's recipes (issue 19), on the CPU or sized for one GPU; ``--recall`` is the
reconstruction diagnostic (a chunk rebuilt from its own rows at k = 2, 4, 8, opened one by one). Options after it
override the recipe's (the last of a repeated option wins), which is how the tests run the GPU sizing on a tiny model
on the CPU."""

from __future__ import annotations

import sys

import torch

from . import train_read

BOOKS, QA = "../shared/data/books", "../shared/data/qa"
HELD_OUT = ["austen_persuasion", "chesterton_thursday", "wells_war_of_the_worlds"]
# Stage 3 of the book training (make train), the shipped plug-in until the read stage replaced it: every recipe here
# starts from it.
STAGE3 = "runs/smollm2-lora32-k64/checkpoint/plugin"

# Short samples (one 256-token chunk of evidence, 64 target tokens; a question's gold chunk and one distractor), so
# that a step is cheap and the only copy of the evidence is its rows. Rows on the token base: they start as the kept
# tokens, which the frozen LLM reads (runs/smollm2-read-c128-g: 3x the content gap of the hidden base); the hinge at
# weight 2, margin 0.5 (runs/smollm2-read-c128-i: content recovered 0.37 -> 0.44, the own reading better too). The
# held-out books measure the content as it trains (--val-every).
RECIPE = [
    "--data", BOOKS, "--exclude", *HELD_OUT, "--val-data", *(f"{BOOKS}/{book}.txt" for book in HELD_OUT),
    "--qa", "out/qa/squad_train.jsonl", f"{QA}/fairytaleqa_train.jsonl",
    "--init-from", STAGE3, "--lora-rank", "32", "--row-mlp", "576",
    "--row-base", "token",
    "--chunk", "256", "--sample-tokens", "512", "--target-tokens", "64", "--ks", "4", "8", "8", "16", "64",
    "--reconstruct", "0.25", "--distill", "1", "--contrast", "2", "--margin", "0.5", "--lr", "2e-4", "--warmup", "20",
]
CPU = ["--batch-size", "2", "--qa-questions", "3", "--steps", "1000", "--save-every", "25", "--val-every", "100",
       "--out", "runs/smollm2-read"]
# One GPU, stopping itself (checkpointed) after 7 minutes, so that loading and the first steps fit in 8.
GPU = ["--batch-size", "16", "--qa-questions", "16", "--steps", "3000", "--save-every", "200", "--val-every", "200",
       "--max-minutes", "7", "--out", "runs/smollm2-read-gpu"]


# Reconstruction only: the evidence chunk is the target, so only what its rows carry can lower the loss; book
# samples only, k opened 2 -> 4 -> 8 over 300 steps (~20 s a step on one core).
RECALL = [
    "--data", BOOKS, "--exclude", *HELD_OUT, "--init-from", STAGE3,
    "--lora-rank", "32", "--row-mlp", "576", "--chunk", "256", "--sample-tokens", "512", "--target-tokens", "64",
    "--ks", "2", "4", "8", "--k-curriculum", "300", "--reconstruct", "1", "--distill", "0", "--contrast", "0",
    "--lr", "2e-4", "--warmup", "20", "--batch-size", "4", "--steps", "1000", "--save-every", "20",
    "--out", "runs/smollm2-recall",
]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    gpu, recall = "--gpu" in argv, "--recall" in argv
    if gpu and recall:
        print("read_recipe: --gpu and --recall are two recipes; choose one", file=sys.stderr)
        return 2
    if gpu and not torch.cuda.is_available():
        print("read_recipe: no CUDA device: the GPU sizing runs on the CPU (slowly)", file=sys.stderr)
    recipe = RECALL if recall else RECIPE + (GPU if gpu else CPU)
    return train_read.main(recipe + [a for a in argv if a not in ("--gpu", "--recall")])


if __name__ == "__main__":
    sys.exit(main())
