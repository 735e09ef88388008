"""QA samples for the read objective (``extensible.reading``): the chunk that holds a question's answer, read only
compressed, then the question, then the reference answer -- exactly eval-qa's ``rag:K`` layout (chat template,
the chunks in document order, "\\n\\n", the question, the assistant turn), so the only copy of the evidence is in
the rows.

Each sample is one question of one document of an L-Eval-format training file (SQuAD training articles, FairytaleQA
train): its evidence is the chunk holding a reference verbatim plus up to ``distractors`` other chunks of the same
document, so the LLM must find the answer among rows, not just decode one chunk. A step's samples come from
different documents, so each one's foreign reading (the next sample's rows, ``reading_loss``) is another document.
Questions whose answer does not occur verbatim in a whole chunk are not drawn.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from extensible.errors import UserError
from extensible.reading import ReadingSample, ReadingWeights, reading_loss

from .library import prompt_parts
from .qa_eval import answer_chunks, read_leval


class QAReading:
    """The read objective on QA files, ``weight`` times its loss; one k per sample from ``ks``, or from what
    ``ks_now()`` returns at each step when given (the trainer's k curriculum)."""

    name = "qa_read"

    def __init__(self, files: list[str], tokenizer, chunk_size: int, ks: list[int], weights: ReadingWeights,
                 questions: int = 4, distractors: int = 1, answer_tokens: int = 32, weight: float = 1.0,
                 method: str = "strided", ks_now: Callable[[], list[int]] | None = None):
        if questions < 2 or distractors < 0 or answer_tokens < 2 or weight <= 0:
            raise UserError("--qa-questions must be >= 2 (each sample's foreign rows are another's), --qa-distractors "
                            ">= 0, --qa-answer-tokens >= 2, --qa-weight > 0")
        self.files = [str(Path(f).resolve()) for f in files]
        self.records = [record for f in self.files for record in read_leval(f)]
        if len(self.records) < questions:
            raise UserError(f"--qa files hold {len(self.records)} documents; a step needs {questions} different ones")
        self.tokenizer, self.chunk_size, self.ks, self.weights = tokenizer, chunk_size, list(ks), weights
        self.questions, self.distractors, self.answer_tokens = questions, distractors, answer_tokens
        self.weight, self.method = weight, method
        self.ks_now = ks_now or (lambda: self.ks)
        self.end = [tokenizer.convert_tokens_to_ids("<|im_end|>")] if "<|im_end|>" in tokenizer.get_vocab() else \
            [tokenizer.eos_token_id]  # the end of the assistant's turn, so that answers learn to stop
        self.separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        self._documents: dict[int, tuple[list[int], list[int]]] = {}
        self.metrics: dict[str, float] = {}

    def settings(self) -> dict:
        return {"files": self.files, "questions": self.questions, "distractors": self.distractors,
                "answer_tokens": self.answer_tokens, "weight": self.weight, "ks": self.ks}

    def _document(self, d: int) -> tuple[list[int], list[int]]:
        """Token ids and the character offset where each chunk starts (plus the text's end), made once."""
        if d not in self._documents:
            text = self.records[d]["input"]
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            starts = [start for start, _ in encoding["offset_mapping"]]
            self._documents[d] = encoding["input_ids"], starts[:: self.chunk_size] + [len(text)]
        return self._documents[d]

    def _sample(self, d: int) -> ReadingSample | None:
        """A sample of one random question of document ``d``, or None when its answer is in no whole chunk."""
        record = self.records[d]
        j = random.randrange(len(record["instructions"]))
        reference = random.choice(record["references"][j])
        ids, offsets = self._document(d)
        whole = len(ids) // self.chunk_size
        text, needle = record["input"].lower(), reference.strip().lower()
        gold = sorted(c for c in answer_chunks(record["input"], offsets, reference)  # the whole answer in one chunk
                      if c < whole and needle in text[offsets[c] : offsets[c + 1]])
        if not gold:
            return None
        others = [c for c in range(whole) if c != gold[0]]
        chunks = sorted([gold[0], *random.sample(others, min(self.distractors, len(others)))])
        before, after = prompt_parts(self.tokenizer, record["instructions"][j])
        answer = self.tokenizer(reference, add_special_tokens=False)["input_ids"]
        # the end of the turn only after a whole answer: a cut one must not teach stopping mid-answer
        target = answer + self.end if len(answer) < self.answer_tokens else answer[: self.answer_tokens]
        evidence = [ids[c * self.chunk_size : (c + 1) * self.chunk_size] for c in chunks]
        return ReadingSample(before, evidence, self.separator + after, target)

    def draw(self) -> tuple[list[ReadingSample], list[int]]:
        """A step's samples, each from another document, and their k, from the ``random`` module (checkpointed)."""
        samples = []
        for d in random.sample(range(len(self.records)), len(self.records)):
            sample = self._sample(d)
            if sample is not None:
                samples.append(sample)
            if len(samples) == self.questions:
                break
        if len(samples) < 2:
            raise UserError("fewer than two --qa questions have an answer verbatim in a whole chunk")
        ks = self.ks_now()
        return samples, [random.choice(ks) for _ in samples]

    def loss(self, llm, embedder):
        samples, ks = self.draw()
        loss, self.metrics = reading_loss(llm, embedder, samples, ks, self.chunk_size, self.weights, self.method)
        return self.weight * loss
