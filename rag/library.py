"""Long-document QA over a stored library: retrieve, choose k per chunk to fit the window, answer with the frozen LLM.

The LLM's input, in the model's chat template (one user turn)::

    [template start] + for each document: "Document n (name):\\n" [its chunks, in order] "\\n\\n"
                     + question + [template end, assistant turn]

where each chunk the planner chose is read either as its plain tokens (k = 1: the passages nearest to the question,
as far as the window allows) or as the stored full-resolution outputs down-scaled at its k: only those rows are read
from Zarr, and the embedder never runs at query time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from extensible.downscale import downscale_chunk
from extensible.errors import ContextTooLongError, UserError
from extensible.text import prompt_parts  # noqa: F401  (re-exported: the RAG layer's prompts use it)
from storage.store import Store, runtime_fingerprints

from .index import PassageIndex, make_encoder
from .plan import DEFAULT_STRATEGY, Unit, parse_strategy, plan

CACHED_TEXTS = 64  # texts and token lists a Library keeps between queries


class InMemoryDocument:
    """Full-resolution outputs held in memory ([n_tokens, hidden]), read like a StoredDocument (online mode)."""

    def __init__(self, outputs: torch.Tensor, chunk_size: int):
        self.chunk_size, self.n_tokens = chunk_size, len(outputs)
        self.encoded = {i: outputs[i * chunk_size : (i + 1) * chunk_size] for i in range(self.num_chunks)}
        self._ids, self._embedder = None, None

    @classmethod
    def lazy(cls, ids: list[int], chunk_size: int, embedder, encode_batch: int = 8) -> InMemoryDocument:
        """A document whose chunks ``embedder`` encodes on their first compressed read, each once, ``encode_batch``
        chunks per forward (only raw chunks read: never). Under autograd the outputs keep their gradients (QA
        training)."""
        document = cls(torch.zeros(len(ids), 0), chunk_size)
        document.encoded, document._ids, document._embedder = {}, ids, embedder
        document.encode_batch = encode_batch
        return document

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def num_chunks(self) -> int:
        return -(-len(self) // self.chunk_size)

    def chunk_length(self, chunk: int) -> int:
        return min(self.chunk_size, len(self) - chunk * self.chunk_size)

    def _encode(self, chunks: list[int]) -> None:
        size, device = self.chunk_size, next(self._embedder.parameters()).device
        whole = [c for c in chunks if self.chunk_length(c) == size]
        for start in range(0, len(whole), self.encode_batch):  # bounded activations, as ExtensibleLM encodes
            batch = whole[start : start + self.encode_batch]
            rows = torch.tensor([self._ids[c * size : (c + 1) * size] for c in batch], device=device)
            self.encoded.update(zip(batch, self._embedder(rows)))
        for c in set(chunks) - set(whole):  # a last partial chunk on its own
            self.encoded[c] = self._embedder(torch.tensor([self._ids[c * size :]], device=device))[0]

    def downscaled_chunks(self, ks: dict[int, int], method: str = "strided", seed: int = 0) -> dict[int, torch.Tensor]:
        missing = [c for c in ks if c not in self.encoded]
        if missing:
            self._encode(missing)
        return {c: downscale_chunk(self.encoded[c], k, method, seed, c) for c, k in ks.items()}


class Prompt:
    """The fixed parts of a query around its documents: template, one header per document, separators.

    ``budget`` is what they leave of the window for the documents' slots once ``answer_tokens`` are reserved."""

    def __init__(self, lm, question: str, names: list[str] | None, documents: int, answer_tokens: int):
        tokenizer = lm.tokenizer
        if not question.strip():
            raise UserError("the question is empty")
        self.before, self.after = prompt_parts(tokenizer, question)
        self.headers = [tokenizer(f"Document {n + 1} ({name}):\n", add_special_tokens=False)["input_ids"]
                        for n, name in enumerate(names)] if names else [[] for _ in range(documents)]
        self.separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        fixed = len(self.before) + len(self.after) + sum(len(h) + len(self.separator) for h in self.headers)
        if len(self.before) + len(self.after) + answer_tokens > lm.window:
            raise ContextTooLongError(f"the question ({len(self.before) + len(self.after)} tokens with the template) "
                                      f"and the answer ({answer_tokens}) do not fit the window of {lm.window}")
        self.budget = lm.window - fixed - answer_tokens

    def segments(self, bodies: list[list]) -> list:
        """[template start] + per document: header, its segments, separator + [question, template end]."""
        segments = [torch.tensor(self.before)]
        for header, body in zip(self.headers, bodies):
            segments += [torch.tensor(header, dtype=torch.long), *body, torch.tensor(self.separator)]
        return segments + [torch.tensor(self.after)]


@dataclass
class Source:
    doc_id: str
    source: str
    score: float  # best passage score (cosine), NaN when the document was given, not retrieved
    passages: list[dict] = field(default_factory=list)  # the hits: chunk, characters, score, text
    chunks_read: int = 0
    chunks_total: int = 0
    k_min: int = 0
    k_max: int = 0
    raw_chunks: list[int] = field(default_factory=list)  # chunks read as plain tokens
    chunk_ks: dict[int, int] = field(default_factory=dict)  # every chunk read -> its k (1 = raw)


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[Source]
    strategy: str
    input_positions: int
    new_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def metadata(self) -> dict:
        """What the integrations attach to a reply: the strategy, the input length and, per source, the k read."""
        return {"strategy": self.strategy, "input_positions": self.input_positions, "seconds": self.seconds,
                "sources": [{"doc_id": s.doc_id, "source": s.source, "score": s.score, "k_min": s.k_min,
                             "k_max": s.k_max, "chunks_read": s.chunks_read, "chunks_total": s.chunks_total}
                            for s in self.sources]}


@dataclass
class Query:
    """A composed LLM input and, per document, what it reads: chunk -> k (1 = plain tokens)."""

    embeds: torch.Tensor  # [1, positions, hidden]
    chunk_ks: list[dict[int, int]]
    chunks_total: list[int]

    @property
    def positions(self) -> int:
        return self.embeds.shape[1]

    def describe(self, d: int, source: Source) -> None:
        """Fills ``source`` with what this query read of document ``d``."""
        ks = self.chunk_ks[d]
        source.chunks_read, source.chunks_total = len(ks), self.chunks_total[d]
        source.k_min, source.k_max = (min(ks.values()), max(ks.values())) if ks else (0, 0)
        source.raw_chunks, source.chunk_ks = [c for c, k in ks.items() if k == 1], dict(ks)


def build_query(lm, question: str, documents: list, relevance: list[dict[int, float]], names: list[str] | None,
                token_ids: list, strategy: str = DEFAULT_STRATEGY, answer_tokens: int = 96, max_k: int | None = None,
                min_k: int = 1) -> Query:
    """The library's one query path: plan which chunks are read at which k, read those rows, compose the input.

    ``documents`` are StoredDocument or InMemoryDocument, ``token_ids`` their tokens (a chunk planned at k=1 is read
    as its plain tokens, which the LLM reads natively), ``relevance`` per document chunk -> retrieval score, ``names``
    head each document (None: no headers). ``answer_tokens`` positions are left free for the answer. ``max_k`` (the
    planner's coarsest k) defaults to the coarsest k the plug-in was trained at (``ExtensibleLM.max_k``)."""
    read_k = parse_strategy(strategy)[1]
    if read_k and read_k > lm.chunk_size:
        raise UserError(f"{strategy}: K must be at most the chunk size ({lm.chunk_size}): a chunk keeps at least one row")
    prompt = Prompt(lm, question, names, len(documents), answer_tokens)
    units = [Unit(d, c, doc.chunk_length(c), relevance[d].get(c, float("-inf")))
             for d, doc in enumerate(documents) for c in range(doc.num_chunks)]
    chosen = plan(units, len(documents), prompt.budget, strategy, max_k=min(max_k or lm.max_k, lm.chunk_size),
                  min_k=min_k)
    bodies = []
    for d, doc in enumerate(documents):
        ks, size = chosen.ks[d], doc.chunk_size
        rows = doc.downscaled_chunks({c: min(k, doc.chunk_length(c)) for c, k in ks.items() if k > 1},
                                     lm.method, lm.seed)
        bodies.append([torch.as_tensor(token_ids[d][c * size : (c + 1) * size]) if k == 1 else torch.as_tensor(rows[c])
                       for c, k in ks.items()])
    return Query(lm.compose(prompt.segments(bodies)), chosen.ks, [doc.num_chunks for doc in documents])


def generate_answer(lm, embeds: torch.Tensor, max_new_tokens: int, **generate_kwargs) -> tuple[str, int]:
    """Greedy (by default) answer to a composed input: (text, new tokens)."""
    new = lm.generate_embeds(embeds, max_new_tokens, **generate_kwargs)
    return lm.tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


class Library:
    """A store, its passage index and the frozen LLM with its embedder; everything heavy loads on first use."""

    def __init__(self, store: str | Path | Store, lm=None, encoder: str = "minilm", model: str | None = None,
                 plugin: str | None = None, window: int = 4096):
        self.store = store if isinstance(store, Store) else Store.open(store)
        if len(self.store) == 0:
            raise UserError(f"the store {self.store.path} is empty; run: make precompute STORE={self.store.path}")
        self.encoder_name, self.model, self.plugin, self.window = encoder, model, plugin, window
        self._lm, self._index, self._encoder = lm, None, None
        self._texts: dict[tuple, str | list[int]] = {}  # insertion order: the oldest first
        if lm is not None:
            self.check_compatible(lm)

    @property
    def lm(self):
        if self._lm is None:
            from extensible.plugins import load_extensible

            lm = load_extensible(self.model, self.plugin, window=self.window, chunk_size=self.store.chunk_size)
            self.check_compatible(lm)
            self._lm = lm
        return self._lm

    def check_compatible(self, lm) -> None:
        """The store must hold this embedder's outputs for this LLM: other vectors would be silently wrong."""
        clash = self.store.fingerprint_clash(runtime_fingerprints(lm), "runtime")
        if clash:
            raise UserError(f"{self.store.path} was built by another embedder or LLM ({'; '.join(clash)}); pass the "
                            "--model/--plugin it was built with, or rebuild it with make precompute")
        if lm.chunk_size != self.store.chunk_size:
            raise UserError(f"{self.store.path} holds {self.store.chunk_size}-token chunks, the runtime uses {lm.chunk_size}")

    @property
    def index(self) -> PassageIndex:
        if self._index is None:
            self._index = PassageIndex.open(self.store, self.encoder_name)
        return self._index

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = make_encoder(self.encoder_name, self.lm if self.encoder_name == "embedder-mean" else None)
        return self._encoder

    def _text(self, row: dict) -> str:
        """A stored document's text, checked against its content hash on its first read in this library."""
        key = ("text", row["content_hash"])
        if key not in self._texts:
            self._remember(key, self.store.text(row))
        return self._texts[key]

    def _token_ids(self, row: dict) -> list[int]:
        key = ("ids", row["content_hash"])
        if key not in self._texts:
            self._remember(key, self.lm.tokenizer(self._text(row), add_special_tokens=False)["input_ids"])
        return self._texts[key]

    def _remember(self, key: tuple, value) -> None:
        """Keeps the last ``CACHED_TEXTS`` texts and token lists read (keyed by content hash: a text never changes
        under its hash), so a query re-reads, re-hashes and re-tokenises none of the documents it has just read."""
        self._texts[key] = value
        while len(self._texts) > CACHED_TEXTS:
            self._texts.pop(next(iter(self._texts)))

    def search(self, question: str, documents: int | None = 2, passages: int = 20) -> list[Source]:
        """The ``documents`` best documents (None: all found) by their best passage among the ``passages`` nearest
        to the question."""
        return self._search(self._question_vector(question), documents, passages)

    def passages(self, question: str, top: int = 4) -> list[dict]:
        """The ``top`` passages nearest to the question, best first: doc_id, source, chunk, char_start, char_end,
        score and text (what the LangChain and LlamaIndex retrievers return)."""
        passages = [{"doc_id": source.doc_id, "source": source.source, **passage}
                    for source in self.search(question, documents=None, passages=top) for passage in source.passages]
        return sorted(passages, key=lambda passage: passage["score"], reverse=True)

    def _question_vector(self, question: str):
        if not question.strip():
            raise UserError("the question is empty")
        self.index  # noqa: B018 -- opened before the encoder loads: a missing index fails fast
        return self.encoder.encode([question])[0]

    def _search(self, vector, documents: int | None, passages: int = 20) -> list[Source]:
        hits = self.index.search(vector, passages)
        by_doc: dict[str, Source] = {}
        rows = self.store.rows_by_id()  # one look at the manifest for all the hits
        for hit in hits:
            row = rows[hit.doc_id]
            source = by_doc.setdefault(hit.doc_id, Source(hit.doc_id, row["source"], hit.score))
            text = self._text(row)
            source.passages.append({"chunk": hit.chunk, "char_start": hit.char_start, "char_end": hit.char_end,
                                    "score": hit.score, "text": text[hit.char_start : hit.char_end]})
        return sorted(by_doc.values(), key=lambda s: s.score, reverse=True)[:documents]

    def answer(self, question: str, documents: int = 2, strategy: str = DEFAULT_STRATEGY, max_new_tokens: int = 96,
               sources: list[Source] | None = None, max_k: int | None = None, **generate_kwargs) -> Answer:
        """Answers from the retrieved documents (or ``sources`` when given) as the planner reads them: by default
        (``graded``, see ``plan.DEFAULT_STRATEGY``) the most relevant chunks compressed in half the window and the
        nearest of them refined, raw where they fit; ``rag`` reads only the nearest passages, raw."""
        start = time.perf_counter()
        query, sources = self.prepare(question, documents, strategy, max_new_tokens, sources, max_k)
        text, new = generate_answer(self.lm, query.embeds, max_new_tokens, **generate_kwargs)
        return Answer(question, text, sources, strategy, query.positions, new, time.perf_counter() - start)

    def prepare(self, question: str, documents: int = 2, strategy: str = DEFAULT_STRATEGY, answer_tokens: int = 96,
                sources: list[Source] | None = None, max_k: int | None = None) -> tuple[Query, list[Source]]:
        """Everything of ``answer`` before the LLM's forward: retrieval, the plan, the stored rows read and the
        composed input; ``sources`` come back describing what the query reads of each."""
        vector = self._question_vector(question)  # once, for the search and for each chunk's relevance
        sources = sources if sources is not None else self._search(vector, documents)
        if not sources:
            raise UserError("no document to answer from")
        lm = self.lm
        ordered = sources[::-1]  # the most relevant document nearest to the question
        stored = [self.store.document(s.doc_id) for s in ordered]
        relevance = [self.index.chunk_scores(vector, s.doc_id) for s in ordered]
        names = [Path(s.source).name for s in ordered]
        token_ids = [self._token_ids(doc.row) for doc in stored]
        if any(len(ids) != len(doc) for ids, doc in zip(token_ids, stored)):
            raise UserError(f"{self.store.path} was tokenised by another tokenizer")
        query = build_query(lm, question, stored, relevance, names, token_ids, strategy, answer_tokens, max_k)
        for d, source in enumerate(ordered):
            query.describe(d, source)
        return query, sources
