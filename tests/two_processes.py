"""Run by tests/test_training.py under `accelerate launch --num_processes 2 --cpu` (gloo): the read stage with QA
samples on a tiny model, recording per process what it drew and the learning rate after each step.

usage: python -m tests.two_processes MODEL BOOKS QA OUT [STOP_AT]
"""

import faulthandler
import json
import sys
from pathlib import Path

from extensible.reading import ReadingWeights
from extensible.training import TrainConfig, Trainer
from rag.read_train import QAReading


def main(model: str, books: str, qa: str, out: str, stop_at: str | None = None) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang (the test waits 180 s) ends with where each rank stood
    config = TrainConfig(data=[books], out=out, model=model, num_layers=2, chunk_size=64, sample_tokens=128,
                         ks=[2, 4, 8], steps=4, warmup=2, lr=1e-3, save_every=1, objective="read", target_tokens=8, batch_size=2,
                         contrast=1.0)
    drawn = []

    def objectives(trainer):
        objective = QAReading([qa], trainer.tokenizer, 64, config.ks, ReadingWeights(contrast=1.0), questions=2)
        draw = objective.draw

        def recorded():
            samples, ks = draw()
            drawn.append({"questions": [s.target for s in samples], "ks": ks})
            return samples, ks

        objective.draw = recorded
        return [objective]

    trainer = Trainer(config, progress=False, objectives=objectives)
    summary = trainer.train(until=int(stop_at) if stop_at else None)
    rank = trainer.accelerator.process_index
    Path(out, f"rank{rank}.json").write_text(json.dumps({"drawn": drawn, "lr": summary["lr"], "step": summary["step"],
                                                         "processes": trainer.accelerator.num_processes}))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # as jobs.train does: no process group left to the interpreter's exit


if __name__ == "__main__":
    main(*sys.argv[1:])
