"""make train-read / python -m jobs.train_read: the read stage -- the read objective (extensible.reading) on book
samples (evidence chunks only compressed, then their continuation or their reconstruction) plus, with --qa, on QA
samples laid out as eval-qa's rag:K reads them (rag.read_train). Takes every option of jobs.train, plus --qa-*."""

from __future__ import annotations

import sys

from .train import build_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.description = __doc__
    parser.set_defaults(objective="read")
    qa = parser.add_argument_group("QA samples")
    qa.add_argument("--qa", nargs="*", default=[], help="L-Eval-format QA training files (never the evaluation ones)")
    qa.add_argument("--qa-questions", type=int, default=4, help="questions (each of another document) per step")
    qa.add_argument("--qa-distractors", type=int, default=1, help="other chunks of the document read beside the answer's")
    qa.add_argument("--qa-answer-tokens", type=int, default=32)
    qa.add_argument("--qa-weight", type=float, default=1.0)
    args = vars(parser.parse_args(argv))
    options = {key: args.pop(key) for key in list(args) if key.startswith("qa")}

    def objectives(trainer):
        from extensible.reading import ReadingWeights
        from rag.read_train import QAReading

        config = trainer.config
        weights = ReadingWeights(config.ce, config.distill, config.contrast, config.margin,
                                 config.contrast_own_only)
        return [QAReading(options["qa"], trainer.tokenizer, config.chunk_size, config.ks, weights,
                          options["qa_questions"], options["qa_distractors"], options["qa_answer_tokens"],
                          options["qa_weight"], config.downscale,
                          trainer.current_ks)] if options["qa"] else []

    return run(args, objectives)


if __name__ == "__main__":
    sys.exit(main())
