"""make train-read / make train-read-gpu / make train-recall / python -m jobs.read_recipe [--gpu] [--far] | --recall
[jobs.train_read options]: the read stage's recipes (issue 19), on the CPU or sized for one GPU; ``--far`` aims the
read stage at long texts (8W) from the shipped plug-in; ``--recall`` is the reconstruction diagnostic (a chunk rebuilt
from its own rows at k = 2, 4, 8, opened one by one). Options after it override the recipe's (the last of a repeated
option wins), which is how the tests run the GPU sizing on a tiny model on the CPU."""

from __future__ import annotations

import sys

import torch

from . import train_read

BOOKS, QA = "../shared/data/books", "../shared/data/qa"
HELD_OUT = ["austen_persuasion", "chesterton_thursday", "wells_war_of_the_worlds"]
# Stage 3 of the book training (make train), the shipped plug-in until the read stage replaced it: the read stage's
# first recipe starts from it (the run cards' commands build on that recipe and override its start).
STAGE3 = "runs/smollm2-lora32-k64/checkpoint/plugin"
# The shipped plug-in (runs/smollm2-read-c128-k: token row base, 128-token chunks, the 2x hinge).
SHIPPED = "extensible/shipped/smollm2-135m-instruct"

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

# --far (make train-read, make train-read-gpu): aimed at what the shipped plug-in leaves unmet, the rows' content at 8W
# (context 7680, k = 64); it continues from the shipped plug-in. Book samples of 16 128-token chunks whose evidence is
# only rows, with up to 8 raw chunks between the rows and the 64 target tokens (8W puts 1,024 raw tokens there), k
# from {8, 16, 64, 64}; questions among 5 distractor chunks keep the QA reading (-k's layout). The held-out curve is
# measured in 8W's own layout (--val-tokens 7808: 104 rows at k = 64, 8 raw chunks, the target) rather than the
# training samples': short-layout curves did not foretell 8W (runs/smollm2-read-c128-q).
FAR = ["--init-from", SHIPPED, "--chunk", "128", "--sample-tokens", "2048", "--recent-chunks", "8",
       "--ks", "8", "16", "64", "64", "--reconstruct", "0", "--qa-distractors", "5", "--val-tokens", "7808"]
# its CPU sizing: ~23 s a step on the 2 cores, ~5 minutes a held-out measurement (8W's layout at its three k)
FAR_CPU = ["--qa-questions", "2", "--save-every", "10", "--val-every", "50", "--out", "runs/smollm2-read-8w"]


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
    gpu, recall, far = "--gpu" in argv, "--recall" in argv, "--far" in argv
    if recall and (gpu or far):
        print("read_recipe: --recall is a recipe of its own: not with --gpu or --far", file=sys.stderr)
        return 2
    if gpu and not torch.cuda.is_available():
        print("read_recipe: no CUDA device: the GPU sizing runs on the CPU (slowly)", file=sys.stderr)
    recipe = RECALL if recall else RECIPE + (GPU if gpu else CPU) + (FAR + ([] if gpu else FAR_CPU) if far else [])
    return train_read.main(recipe + [a for a in argv if a not in ("--gpu", "--recall", "--far")])


if __name__ == "__main__":
    sys.exit(main())
