"""make train-qa / python -m jobs.train_qa: the QA stage -- the two-stream book loss plus the answer loss of the
library's own hybrid queries over QA training files (rag.qa_train). Takes every option of jobs.train, plus --qa-*."""

from __future__ import annotations

import sys

from .train import build_parser, run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.description = __doc__
    qa = parser.add_argument_group("QA samples")
    qa.add_argument("--qa", nargs="+", required=True, help="L-Eval-format QA training files (never the evaluation ones)")
    qa.add_argument("--qa-windows", type=int, nargs="+", default=[1024], help="windows the queries are built for")
    qa.add_argument("--qa-questions", type=int, default=4, help="questions of one document per step")
    qa.add_argument("--qa-answer-tokens", type=int, default=64)
    qa.add_argument("--qa-weight", type=float, default=1.0)
    qa.add_argument("--qa-contrast", type=float, default=0.0,
                    help="weight of the hinge asking each answer to be likelier with its document's compressed rows "
                         "than with another document's (the foreign control); 0: off")
    qa.add_argument("--qa-margin", type=float, default=0.1, help="the hinge's margin, nats per answer token")
    qa.add_argument("--qa-left-out", action="store_true",
                    help="draw questions whose answer rag's input leaves out first (only compressed chunks hold it)")
    args = vars(parser.parse_args(argv))
    options = {key: args.pop(key) for key in list(args) if key.startswith("qa")}

    def objectives(trainer):
        from rag.qa_train import QAObjective

        return [QAObjective(options["qa"], trainer.tokenizer, tuple(options["qa_windows"]), options["qa_questions"],
                            options["qa_answer_tokens"], options["qa_weight"], contrast=options["qa_contrast"],
                            margin=options["qa_margin"], left_out=options["qa_left_out"])]

    return run(args, objectives)


if __name__ == "__main__":
    sys.exit(main())
