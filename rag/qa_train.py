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

The answer loss alone can be met without reading: embeddings that, whatever chunk they come from, make the frozen
LLM expect answers in the references' style (a learned prompt; eval-qa's ``foreign`` control measures it). With
``contrast`` > 0 each question is also read as ``foreign`` reads it -- the same plan, the compressed chunks holding
the rows of another document of the same file, encoded with gradients too -- and a hinge
``contrast * max(0, margin + nll(own) - nll(foreign))`` asks the document's own rows to beat them: any change that
helps both readings alike (a prompt) cancels in the difference, so only content can meet it. With ``left_out`` the
step's questions are drawn, where the document has them, among those whose answer rag's input leaves out (the
chunks holding a reference verbatim not read raw): the questions where only the compressed chunks can hold it.
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
from .qa_eval import EvalDocument, ForeignRows, answer_read, read_leval


class QAObjective:
    """Answer loss of hybrid queries over QA files, ``weight`` times the mean over a step's answer tokens."""

    name = "qa"

    def __init__(self, files: list[str], tokenizer, windows: tuple[int, ...] = (1024,),
                 questions: int = 4, answer_tokens: int = 64, weight: float = 1.0, strategy: str = "hybrid",
                 max_k: int = 64, contrast: float = 0.0, margin: float = 0.1, left_out: bool = False):
        if questions < 1 or answer_tokens < 2 or weight <= 0 or contrast < 0:
            raise UserError("--qa-questions must be >= 1, --qa-answer-tokens >= 2, --qa-weight > 0 and "
                            "--qa-contrast >= 0")
        self.files = [str(Path(f).resolve()) for f in files]
        per_file = [read_leval(f) for f in self.files]
        self.records = [record for records in per_file for record in records]
        file_of = [i for i, records in enumerate(per_file) for _ in records]
        self.donors = [[e for e in range(len(file_of)) if file_of[e] == file_of[d] and e != d]
                       for d in range(len(file_of))] if contrast else []  # per document: the others of its file
        if contrast and any(len(records) < 2 for records in per_file):
            raise UserError("--qa-contrast reads another document of the same file: every --qa file needs two or more")
        self.contrast, self.margin, self.left_out = contrast, margin, left_out
        self.metrics: dict[str, float] = {}  # of the last step, logged beside the loss
        self.tokenizer, self.windows = tokenizer, tuple(windows)
        self.questions, self.answer_tokens, self.weight = questions, answer_tokens, weight
        self.strategy, self.max_k = strategy, max_k
        self.end = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>",) if t in tokenizer.get_vocab()] or \
            [tokenizer.eos_token_id]  # the end of the assistant's turn, so that answers learn to stop
        self._documents: dict[int, EvalDocument] = {}  # tokens and passage vectors, made once per document
        self._encoder = None

    def settings(self) -> dict:
        settings = {"files": self.files, "windows": list(self.windows), "questions": self.questions,
                    "answer_tokens": self.answer_tokens, "weight": self.weight, "strategy": self.strategy,
                    "max_k": self.max_k}
        if self.contrast or self.left_out:  # only when used: runs from before these options still resume
            settings.update(contrast=self.contrast, margin=self.margin, left_out=self.left_out)
        return settings

    def _document(self, lm: ExtensibleLM, d: int) -> EvalDocument:
        if d not in self._documents:
            if self._encoder is None:
                self._encoder = make_encoder("minilm")  # the library's default retriever, as eval-qa ranks
            self._documents[d] = EvalDocument(lm, self._encoder, self.records[d]["input"])
        return self._documents[d]

    def draw(self) -> tuple[int, list[int], int, int | None]:
        """(document, candidate questions in draw order, window, donor document or None) of the next sample, from
        the ``random`` module (checkpointed). The donor is another document of the same file."""
        d = random.randrange(len(self.records))
        count = len(self.records[d]["instructions"])
        candidates = random.sample(range(count), count if self.left_out else min(self.questions, count))
        window = random.choice(self.windows)
        return d, candidates, window, (random.choice(self.donors[d]) if self.contrast else None)

    def _questions(self, lm, doc: EvalDocument, d: int, candidates: list[int]) -> list[int]:
        """The step's questions: the first candidates, or with ``left_out`` those whose answer rag's input leaves out
        first (rag's plan reads raw tokens only: nothing is encoded to know it)."""
        if not self.left_out:
            return sorted(candidates)
        record, chosen = self.records[d], []
        for j in candidates:
            question = record["instructions"][j]
            try:
                rag = build_query(lm, question, [doc.stored], [doc.relevance(question)], None, [doc.ids], "rag",
                                  self.answer_tokens, self.max_k)
            except ContextTooLongError:
                continue
            if answer_read(doc, record["references"][j], {str(c): k for c, k in rag.chunk_ks[0].items()}) == "left out":
                chosen.append(j)
                if len(chosen) == self.questions:
                    break
        rest = [j for j in candidates if j not in chosen]
        return sorted(chosen + rest[: self.questions - len(chosen)])

    def _donor(self, lm, embedder, stored: InMemoryDocument, e: int | None):
        """The document read as ``foreign`` reads it, with rows of document ``e`` (None: no contrast, or ``e`` is
        shorter than one chunk)."""
        ids = self._document(lm, e).ids if e is not None else []
        if len(ids) < lm.chunk_size:
            return None
        return ForeignRows(stored, InMemoryDocument.lazy(ids, lm.chunk_size, embedder))

    def loss(self, llm, embedder) -> torch.Tensor:
        d, candidates, window, donor = self.draw()
        plain = getattr(embedder, "module", embedder)  # under DDP the wrapper runs, the module holds the config
        lm = ExtensibleLM(llm, self.tokenizer, plain, window=window)
        doc = self._document(lm, d)
        stored = InMemoryDocument.lazy(doc.ids, lm.chunk_size, embedder)  # with gradients
        readings = [stored] + [r for r in [self._donor(lm, embedder, stored, donor)] if r is not None]
        record = self.records[d]
        inputs, targets = [], []
        for j in self._questions(lm, doc, d, candidates):
            question = record["instructions"][j]
            try:  # own reading first, then foreign's: the same plan, so both fit or neither
                queries = [build_query(lm, question, [reading], [doc.relevance(question)], None, [doc.ids],
                                       self.strategy, self.answer_tokens, self.max_k) for reading in readings]
            except ContextTooLongError:  # a question longer than the window: eval-qa skips it too
                continue
            answer = self.tokenizer(random.choice(record["references"][j]), add_special_tokens=False)["input_ids"]
            answer = torch.tensor(answer[: self.answer_tokens - len(self.end)] + self.end)
            for query in queries:
                inputs.append(torch.cat([query.embeds[0], llm.get_input_embeddings()(
                    answer[:-1].to(llm.device)).to(query.embeds.dtype)]))
                targets.append((query.positions - 1, answer))
        if not inputs:
            return torch.zeros((), device=llm.device)
        sums, lengths = answer_nll_sums(llm, inputs, targets)
        own = slice(0, None, len(readings))
        loss = self.weight * sums[own].sum() / lengths[own].sum()  # per answer token, as eval-qa
        self.metrics = {"own": loss.item() / self.weight}
        if len(readings) == 2:
            nll = sums / lengths  # per input: the mean over its answer tokens
            gap = nll[0::2] - nll[1::2]  # own - foreign: what the document's content adds (negative = it helps)
            loss = loss + self.contrast * torch.relu(self.margin + gap).mean()
            self.metrics["own_minus_foreign"] = gap.mean().item()
        return loss


def answer_nll_sums(llm, inputs: list[torch.Tensor],
                    targets: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input, the summed next-token loss of its answer (``targets``: first predicting position, answer ids) and
    the answer's length, all inputs as one right-padded batch."""
    rows = torch.cat([torch.full((len(ids),), row) for row, (_, ids) in enumerate(targets)])
    cols = torch.cat([torch.arange(first, first + len(ids)) for first, ids in targets])
    losses = padded_batch_loss(llm, torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True), rows, cols,
                               torch.cat([ids for _, ids in targets]), reduction="none")
    sums = torch.zeros(len(targets), dtype=losses.dtype, device=losses.device).index_add(0, rows.to(losses.device), losses)
    return sums, torch.tensor([len(ids) for _, ids in targets], dtype=losses.dtype, device=losses.device)
