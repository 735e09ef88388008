"""make train / python -m jobs.train: two-stream AR training of the embedder. Runs under `accelerate launch` too."""

from __future__ import annotations

import argparse
import json
import sys

from extensible.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from extensible.embedder import ROW_BASES
    from extensible.training import OBJECTIVES

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", required=True, help="folders, files or globs: .txt/.md, .jsonl, .parquet")
    p.add_argument("--exclude", nargs="*", default=[], help="file-name fragments held out (evaluation books)")
    p.add_argument("--out", default="runs/embedder")
    p.add_argument("--model", default=None, help="HF causal LM (default: the embedded SmolLM2)")
    p.add_argument("--layers", dest="num_layers", type=int, default=8)
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--chunk", dest="chunk_size", type=int, default=256)
    p.add_argument("--sample-tokens", type=int, default=2048)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--k-curriculum", type=int, default=0,
                   help="steps over which the ks open one by one, smallest first (0: all from the start)")
    p.add_argument("--objective", choices=OBJECTIVES, default="ar")
    p.add_argument("--recent-chunks", type=int, default=0,
                   help="up to R raw chunks between the compressed context and the predicted chunk (sliding layout; the "
                   "ar and read objectives)")
    p.add_argument("--init-from", default=None, help="plug-in folder whose tensors start a new run")
    p.add_argument("--downscale", default="strided", help="strided, terminal, random or mean")
    p.add_argument("--row-mlp", type=int, default=0, help="width of a residual MLP on the embedder's rows (0: none)")
    p.add_argument("--row-base", choices=ROW_BASES, default="hidden",
                   help="what the row MLP adds to: the last layer's row, or the row's own token embedding (rows start "
                        "as the kept tokens, which the frozen LLM reads; needs --row-mlp)")
    read = p.add_argument_group("the read objective (--objective read): evidence only compressed")
    read.add_argument("--target-tokens", type=int, default=128, help="tokens of the last chunk scored")
    read.add_argument("--reconstruct", type=float, default=0.0, help="share of samples whose target is the evidence")
    read.add_argument("--ce", type=float, default=1.0, help="weight of the target's next-token loss")
    read.add_argument("--distill", type=float, default=1.0,
                      help="weight of KL(LLM reading the evidence raw || LLM reading its rows) on the target")
    read.add_argument("--contrast", type=float, default=0.0,
                      help="weight of the hinge asking own rows to beat another sample's rows at the same k")
    read.add_argument("--margin", type=float, default=0.1, help="the hinge's margin, nats per target token")
    read.add_argument("--contrast-own-only", action="store_true",
                      help="the hinge moves only the own reading (the foreign one is a fixed target), so it cannot be "
                           "met by making other documents' rows worse")
    read.add_argument("--focus", type=float, default=0.0,
                      help="extra weight of the continuation's tokens that only the evidence tells (in it, not in the "
                           "raw text, not among the training text's most frequent tokens): 1 + F each")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--val-data", nargs="*", default=[],
                   help="held-out documents (e.g. the --exclude'd books) whose read objective is measured")
    p.add_argument("--val-every", type=int, default=0, help="measure --val-data every this many steps (0: never)")
    p.add_argument("--val-samples", type=int, default=4,
                   help="evenly spaced samples per --val-data document (as many as the shortest holds)")
    p.add_argument("--val-tokens", type=int, default=0,
                   help="held-out samples' length (default --sample-tokens): measure a long text's layout, e.g. "
                        "7808 = 8W's 104 rows at k = 64 with --recent-chunks 8 at --chunk 128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly (checkpointed) after this long")
    p.add_argument("--stop-at", type=int, default=None, help="stop cleanly (checkpointed) at this step")
    p.add_argument("--export", default=None, help="after training, copy the plug-in here")
    return p


def main(argv: list[str] | None = None) -> int:
    return run(vars(build_parser().parse_args(argv)))


def run(args: dict, objectives=None) -> int:
    """Trains with the parsed ``args``; ``objectives(trainer)`` gives the extra objectives (jobs.train_qa)."""
    from extensible.training import TrainConfig, Trainer

    from .report import plot_content_gap

    export, max_minutes, stop_at = args.pop("export"), args.pop("max_minutes"), args.pop("stop_at")
    try:
        trainer = Trainer(TrainConfig(**args), objectives=objectives)
        summary = trainer.train(until=stop_at, max_minutes=max_minutes)
        if trainer.accelerator.is_main_process:
            plot_content_gap(trainer.out)
            if export:
                trainer.accelerator.unwrap_model(trainer.embedder).save_pretrained(export)
        # a distributed run's process group left to the interpreter's exit can abort it (gloo's threads); the
        # processes meet first, or one still working (plotting, exporting) would wait forever on a destroyed group
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    except UserError as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if not summary["finished"]:  # stopped by --max-minutes: make (and scripts) must not take this as finished
        print(f"train: stopped at step {summary['step']}; rerun the same command to resume", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
