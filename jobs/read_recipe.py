"""make train-read / make train-read-gpu / python -m jobs.read_recipe [--gpu] [jobs.train_read options]: the read
stage's recipe (issue 19), on the CPU or sized for one GPU. Options after it override the recipe's (the last of a
repeated option wins), which is how the tests run the GPU sizing on a tiny model on the CPU."""

from __future__ import annotations

import sys

import torch

from . import train_read

BOOKS, QA = "../shared/data/books", "../shared/data/qa"
HELD_OUT = ["austen_persuasion", "chesterton_thursday", "wells_war_of_the_worlds"]

# Short samples (one 256-token chunk of evidence, 64 target tokens; a question's gold chunk and one distractor), so
# that a step is cheap and the only copy of the evidence is its rows.
RECIPE = [
    "--data", BOOKS, "--exclude", *HELD_OUT, "--qa", "out/qa/squad_train.jsonl", f"{QA}/fairytaleqa_train.jsonl",
    "--init-from", "extensible/shipped/smollm2-135m-instruct", "--lora-rank", "32", "--row-mlp", "576",
    "--chunk", "256", "--sample-tokens", "512", "--target-tokens", "64", "--ks", "4", "8", "8", "16", "64",
    "--reconstruct", "0.25", "--distill", "1", "--contrast", "1", "--margin", "0.2", "--lr", "2e-4", "--warmup", "20",
]
CPU = ["--batch-size", "2", "--qa-questions", "3", "--steps", "1000", "--save-every", "25", "--out", "runs/smollm2-read"]
# One GPU, stopping itself (checkpointed) after 7 minutes, so that loading and the first steps fit in 8.
GPU = ["--batch-size", "16", "--qa-questions", "16", "--steps", "3000", "--save-every", "200", "--max-minutes", "7",
       "--out", "runs/smollm2-read-gpu"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    gpu = "--gpu" in argv
    if gpu and not torch.cuda.is_available():
        print("read_recipe: no CUDA device: the GPU sizing runs on the CPU (slowly)", file=sys.stderr)
    return train_read.main(RECIPE + (GPU if gpu else CPU) + [a for a in argv if a != "--gpu"])


if __name__ == "__main__":
    sys.exit(main())
