"""A training stage that teaches the plug-in to be read in QA, on the queries the library itself builds.

Each sample is one document of an L-Eval-format QA file and a few of its questions. For each question the input is
exactly what the hybrid planner feeds the LLM (``build_query``: chat template, the passages the retriever ranks
highest as plain tokens, the rest of the document compressed in the slots they leave, the question), followed by a
reference answer and the end of the turn; the loss is the next-token loss on the answer tokens. The frozen LLM reads
all of a sample's questions as one right-padded batch.

The embedder runs, with gradients, only on the chunks some query reads compressed, each once per sample
(``InMemoryDocument.lazy``, as eval-qa reads a document); a document (a SQuAD article has ~200 questions) is
tokenised and its passages ranked once, and all the questions of a step share its chunks' encodings. Used by
``jobs.train_qa`` as an extra objective of ``extensible.training.Trainer``, beside the book loss that keeps
perplexity from regressing.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from extensible.errors import ContextTooLongError, UserError
from extensible.runtime import ExtensibleLM
from extensible.training import padded_batch_loss

from .index import make_encoder
from .library import InMemoryDocument, build_query
from .qa_eval import EvalDocument, read_leval


class QAObjective:
    """Answer loss of hybrid queries over QA files, ``weight`` times the mean over a step's answer tokens."""

    name = "qa"

    def __init__(self, files: list[str], tokenizer, windows: tuple[int, ...] = (1024,),
                 questions: int = 4, answer_tokens: int = 64, weight: float = 1.0, strategy: str = "hybrid",
                 max_k: int = 64):
        if questions < 1 or answer_tokens < 2 or weight <= 0:
            raise UserError("--qa-questions must be >= 1, --qa-answer-tokens >= 2 and --qa-weight > 0")
        self.files = [str(Path(f).resolve()) for f in files]
        self.records = [record for f in self.files for record in read_leval(f)]
        self.tokenizer, self.windows = tokenizer, tuple(windows)
        self.questions, self.answer_tokens, self.weight = questions, answer_tokens, weight
        self.strategy, self.max_k = strategy, max_k
        self.end = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tokenizer.get_vocab()] or \
            [tokenizer.eos_token_id]  # the end of the assistant's turn, so that answers learn to stop
        self._documents: dict[int, EvalDocument] = {}  # tokens and passage vectors, made once per document
        self._encoder = None

    def settings(self) -> dict:
        return {"files": self.files, "windows": list(self.windows), "questions": self.questions,
                "answer_tokens": self.answer_tokens, "weight": self.weight, "strategy": self.strategy,
                "max_k": self.max_k}

    def _document(self, lm: ExtensibleLM, d: int) -> EvalDocument:
        if d not in self._documents:
            if self._encoder is None:
                self._encoder = make_encoder("minilm")  # the library's default retriever, as eval-qa ranks
            self._documents[d] = EvalDocument(lm, self._encoder, self.records[d]["input"])
        return self._documents[d]

    def draw(self) -> tuple[int, list[int], int]:
        """(document, questions, window) of the next sample, from the ``random`` module (checkpointed)."""
        d = random.randrange(len(self.records))
        count = len(self.records[d]["instructions"])
        return d, sorted(random.sample(range(count), min(self.questions, count))), random.choice(self.windows)

    def loss(self, llm, embedder) -> torch.Tensor:
        d, questions, window = self.draw()
        plain = getattr(embedder, "module", embedder)  # under DDP the wrapper runs, the module holds the config
        lm = ExtensibleLM(llm, self.tokenizer, plain, window=window)
        doc = self._document(lm, d)
        stored = InMemoryDocument.lazy(doc.ids, lm.chunk_size, embedder)  # with gradients
        record = self.records[d]
        inputs, targets = [], []
        for j in questions:
            try:
                query = build_query(lm, record["instructions"][j], [stored],
                                    [doc.relevance(record["instructions"][j])], None, [doc.ids], self.strategy,
                                    self.answer_tokens, self.max_k)
            except ContextTooLongError:  # a question longer than the window: eval-qa skips it too
                continue
            answer = self.tokenizer(random.choice(record["references"][j]), add_special_tokens=False)["input_ids"]
            answer = answer[: self.answer_tokens - len(self.end)] + self.end
            inputs.append(torch.cat([query.embeds[0], llm.get_input_embeddings()(
                torch.tensor(answer[:-1], device=llm.device)).to(query.embeds.dtype)]))
            targets.append((query.positions - 1, torch.tensor(answer)))
        if not inputs:
            return torch.zeros((), device=llm.device)
        return self.weight * answer_loss(llm, inputs, targets)


def answer_loss(llm, inputs: list[torch.Tensor], targets: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Mean next-token loss of each answer (``targets``: first predicting position, answer ids) after its input,
    all inputs as one right-padded batch."""
    rows = torch.cat([torch.full((len(ids),), row) for row, (_, ids) in enumerate(targets)])
    cols = torch.cat([torch.arange(first, first + len(ids)) for first, ids in targets])
    return padded_batch_loss(llm, torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True), rows, cols,
                             torch.cat([ids for _, ids in targets]))
