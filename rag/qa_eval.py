"""QA evaluation on L-Eval-format files (one JSON object per document: ``input``, ``instructions``, ``outputs`` and,
optionally, ``answers``: every reference of each question).

Methods, the same questions for each; every input is built by the library's own query path (``Prompt`` and
``build_query``: one planner, one composer), in the model's chat template, with ``max_new_tokens`` left for the answer:

* ``window``: the document truncated in the middle (its head and its end kept, LongBench's rule) to fit the window;
* ``full``: the whole document as tokens, only when it fits the model's positions (rows count what was answered);
* ``rag``: the baseline (plain passage RAG) -- the document's chunks ranked against the question by the
  retriever (MiniLM), the best as plain tokens, in document order, while they fit;
* ``rag:K`` (K >= 2): exactly the chunks ``rag`` chooses, every one read compressed at k = K, nothing raw but the
  template and the question: the direct test of reading the compressed rows;
* ``hybrid``: rag's passages raw, the rest of the document compressed in the slots they leave;
* ``ext:graded`` (the library's default planner) / ``ext:adaptive``: those strategies on the whole document;
* ``ext:K``: the runtime's layout at a fixed k (oldest chunks compressed, most recent document tokens raw), as
  ``extemb generate`` reads a file;
* ``foreign:M``, a control for each M that reads compressed chunks (``hybrid``, ``rag:K``, ``ext:adaptive``,
  ``ext:graded``; ``foreign`` is ``foreign:hybrid``): M's plan and raw tokens, but every chunk read compressed holds
  the rows of a chunk of *another* document of the file (``ForeignRows``), down-scaled at the same k. ``M -
  foreign:M`` is what the compressed content adds: where it is zero, M's gain over rag is a learned prompt, not
  content read. The donor is the next document of the file (in file order, wrapping round) that holds a whole chunk
  and shares under 20% of its token 8-grams with the document (``choose_donors``): a file where a document has none
  is refused.
* ``library:rag`` / ``library:hybrid`` / ``library:graded`` (with ``store``): the question asked of the whole stored
  library, as ``Library.answer`` asks it -- retrieval has to find the question's document among all the store holds
  (every document of the files must be precomputed into it: ``make precompute CORPUS=FILE.jsonl
  PRECOMPUTE_ARGS="--text-column input"``), then its two best documents are read with that strategy. Records add
  ``hit@1`` and ``hit@3``: whether the question's own document (by content hash) is the first, or among the first three,
  documents retrieved.

Metrics: ``answer_nll`` = mean per-token NLL of the first reference answer (its first ``max_new_tokens`` tokens),
teacher-forced right after the method's input -- the input generation uses; token F1, exact match (SQuAD
normalisation) and ROUGE-L (rouge-score) of the greedy answer, each the maximum over the references. With
``generate=False`` only ``answer_nll`` is computed. A question whose prompt does not fit the window is skipped and
counted (``skipped`` in its row). The report gives each method minus ``rag``, ``window`` and ``full``, each M minus
``foreign:M`` (for ``hybrid`` and ``ext:graded``/``ext:adaptive`` both also split by where rag's input held the answer),
and, with ``window``, ``rag``, ``rag:K`` and ``foreign:rag:K``, the content recovered
``(foreign:rag:K - rag:K) / (window - rag)``; every ``all`` row pools the questions of all files (each weighs the same).
A task is named by its file's stem, or by as much of its path as tells two same-stem files apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from extensible.downscale import num_kept
from extensible.errors import ContextTooLongError, UserError
from extensible.evaluate import bootstrap_interval, document_names, parse_methods
from extensible.text import MAX_SHARED, SHINGLE, shared_shingles, shingles

from pipeline.corpus import content_hash
from storage.store import Store, runtime_fingerprints

from .index import chunk_relevance, make_encoder, store_digest
from .library import InMemoryDocument, Library, Prompt, build_query, generate_answer
from .plan import parse_strategy

ARTICLES = re.compile(r"\b(a|an|the)\b")
PLANNED = {"rag": "rag", "hybrid": "hybrid", "ext:adaptive": "adaptive", "ext:graded": "graded"}
FOREIGN = "foreign:"
LIBRARY = "library:"
READS_NO_ROWS = ("window", "full", "rag")
LIBRARY_METHODS = ("library:rag", "library:hybrid", "library:graded")
HITS = (1, 3)  # hit@k of the question's own document among the documents retrieved from the library


def normalise_answer(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return ARTICLES.sub(" ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalise_answer(prediction), normalise_answer(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"])
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def _strings(value, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {what} must be a list of strings")
    return value


def read_leval(path: str | Path) -> list[dict]:
    """Records with ``input``, ``instructions`` and ``references`` (per question: every reference answer)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{number + 1}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} is not JSON ({err.msg}); eval-qa reads L-Eval .jsonl files") from None
        if not isinstance(record, dict) or {"input", "instructions", "outputs"} - set(record):
            raise UserError(f"{where} lacks input, instructions or outputs (not an L-Eval file)")
        if not isinstance(record["input"], str) or not record["input"].strip():
            raise UserError(f"{where}: input must be a non-empty string")
        questions = _strings(record["instructions"], "instructions", where)
        outputs = _strings(record["outputs"], "outputs", where)
        answers = record.get("answers", [[o] for o in outputs])
        if not isinstance(answers, list) or len(answers) != len(questions) or len(outputs) != len(questions):
            raise UserError(f"{where}: {len(questions)} instructions but {len(outputs)} outputs / "
                            f"{len(answers) if isinstance(answers, list) else 'no'} answers")
        references = [_strings(a, "answers", where) for a in answers]
        if any(not refs or not all(r.strip() for r in refs) for refs in references):
            raise UserError(f"{where}: a question has an empty reference answer")
        records.append({"input": record["input"], "instructions": questions, "references": references})
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def canonical(method: str) -> str:
    """``foreign`` is ``foreign:hybrid``: its name when hybrid had the only foreign control (old journals hold it)."""
    return "foreign:hybrid" if method == "foreign" else method


def strategy_of(method: str) -> str | None:
    """The planner strategy ``method`` reads with (``foreign:M``: M's), None when it is not planned."""
    own = canonical(method).removeprefix(FOREIGN)
    return PLANNED.get(own) or (own if own.startswith("rag:") else None)


def parse_qa_methods(text: str) -> list[str]:
    """Comma-separated methods (see the module docstring), ``foreign`` as ``foreign:hybrid``, each once."""
    methods = [canonical(m.strip()) for m in text.split(",") if m.strip()]
    for method in methods:
        if method.startswith(LIBRARY):
            if method not in LIBRARY_METHODS:
                raise UserError(f"unknown method {method!r}; over a stored library: {', '.join(LIBRARY_METHODS)}")
            continue
        own = method.removeprefix(FOREIGN)
        if own.startswith("rag:"):
            parse_strategy(own)  # K >= 2
        else:
            parse_methods(own, base=("window", "full", "rag", "hybrid"), named_ext=("adaptive", "graded"))
        if own != method and strategy_of(own) in (None, "rag"):
            raise UserError(f"{method}: {own} reads nothing compressed; a foreign control is for hybrid, rag:K, "
                            "ext:adaptive or ext:graded (ext:K, the runtime's layout, has none)")
    if not methods:
        raise UserError("no methods given")
    return list(dict.fromkeys(methods))


def task_names(files: list[str]) -> list[str]:
    """Each file's task name: its stem, or as much of its path as tells same-stem files apart (a/qa.jsonl,
    b/qa.jsonl). Journals key their records by it: two files must never share one."""
    if len({Path(f).resolve() for f in files}) < len(files):
        raise UserError("a file is given twice in --data")
    return document_names([str(f) for f in files])


def choose_donors(tokenizer, texts: list[str], chunk_size: int, documents: list[int], file) -> dict[int, int]:
    """For each of ``documents`` (indices into ``texts``, a file's documents), the document whose rows its foreign
    controls read: the next one in file order (wrapping round) with a whole chunk that shares under 20% of the
    8-grams (``shared_shingles``). Neighbours may be near copies (L-Eval's topic_retrieval_longchat: 50-88% shared),
    whose rows would carry the document's own content."""

    @functools.cache
    def tokens(d: int) -> tuple[int, set]:
        ids = tokenizer(texts[d], add_special_tokens=False)["input_ids"]
        return len(ids), shingles(ids)

    donors = {}
    for d in documents:
        donors[d] = next((e for e in [*range(d + 1, len(texts)), *range(d)] if tokens(e)[0] >= chunk_size
                          and shared_shingles(tokens(d)[1], tokens(e)[1]) < MAX_SHARED), None)
        if donors[d] is None:
            raise UserError(f"{file}: document {d + 1} has no donor for the foreign control (another document of the "
                            f"file with a whole {chunk_size}-token chunk, sharing under {MAX_SHARED:.0%} of its token "
                            f"{SHINGLE}-grams); add other documents to the file or leave out the foreign methods")
    return donors


def spread_questions(counts: list[int], limit: int | None) -> list[tuple[int, int]]:
    """(document, question) pairs: ``limit`` questions shared as evenly as possible over the documents (``counts``
    questions each), and within a document spread evenly over its questions -- they often come in text order, so
    the first N would all sit in its first paragraphs. Sorted by document, so each is encoded once."""
    total = sum(counts)
    limit = total if limit is None else min(limit, total)
    quota = [0] * len(counts)
    while sum(quota) < limit:  # round-robin: each document with questions left takes one more
        for d, count in enumerate(counts):
            if quota[d] < count and sum(quota) < limit:
                quota[d] += 1
    return [(d, int(j)) for d, q in enumerate(quota) if q
            for j in np.unique(np.linspace(0, counts[d] - 1, q).round().astype(int))]


def truncate_middle(ids: list[int], keep: int) -> list[int]:
    if len(ids) <= keep:
        return ids
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


class EvalDocument:
    """One document of a QA file: its tokens and chunk spans, and, made on first use, the full-resolution outputs of
    each chunk read compressed (offline mode: encoded once for all its questions), its passage vectors, each
    question's chunk scores (every method and reading of a question ranks its chunks alike) and its full-attention
    prefix cache."""

    def __init__(self, lm, encoder, text: str):
        self.lm, self.encoder, self.text = lm, encoder, text
        encoding = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.ids = encoding["input_ids"]
        starts = [start for start, _ in encoding["offset_mapping"]]
        self.char_offsets = starts[:: lm.chunk_size] + [len(text)]  # as the store records a document's chunks
        self.stored = InMemoryDocument.lazy(self.ids, lm.chunk_size, lm.embedder, lm.encode_batch)
        self._passages, self._relevance = None, {}
        self.prefix = None  # (cache, prompt) of the full-attention input up to the question
        self.donor: EvalDocument | None = None  # another document of the file, whose rows ``foreign:M`` reads

    def relevance(self, question: str) -> dict[int, float]:
        if self._passages is None:
            chunks, spans = self.encoder.passages(self.text, self.char_offsets)
            self._passages = chunks, self.encoder.encode([self.text[a:b] for a, b in spans])
        if question not in self._relevance:
            self._relevance[question] = chunk_relevance(*self._passages, self.encoder.encode([question])[0])
        return self._relevance[question]


class ForeignRows:
    """Reads like ``document`` -- the same chunks and lengths, so the planner makes the same plan -- but a chunk read
    compressed holds the rows of a whole chunk of ``donor`` (chunk c takes the donor's c mod n-th), down-scaled at
    the same k and cut to the rows c's own length keeps. The ``foreign:M`` controls of eval-qa."""

    def __init__(self, document, donor):
        self.document, self.donor, self.chunk_size = document, donor, document.chunk_size
        self.whole = [c for c in range(donor.num_chunks) if donor.chunk_length(c) == donor.chunk_size]
        if not self.whole:
            raise UserError(f"foreign: the donor document ({len(donor)} tokens) is shorter than one chunk")

    def __len__(self) -> int:
        return len(self.document)

    @property
    def num_chunks(self) -> int:
        return self.document.num_chunks

    def chunk_length(self, chunk: int) -> int:
        return self.document.chunk_length(chunk)

    def downscaled_chunks(self, ks: dict[int, int], method: str = "strided", seed: int = 0) -> dict:
        rows = {}
        for c, k in ks.items():  # one read per chunk: two chunks may take the same donor chunk at different k
            taken = self.whole[c % len(self.whole)]
            rows[c] = self.donor.downscaled_chunks({taken: k}, method, seed)[taken][: num_kept(self.chunk_length(c), k)]
        return rows


class QAEvaluation:
    def __init__(self, lm, max_new_tokens: int = 64, max_k: int | None = None, library=None):
        self.lm, self.max_new_tokens, self.max_k, self.library = lm, max_new_tokens, max_k or lm.max_k, library
        self.encoder = make_encoder("minilm")  # the library's default retriever

    def query(self, method: str, doc: EvalDocument, question: str):
        """(embeds, what was read) of ``method``'s input, or None for ``full`` when the document does not fit."""
        lm = self.lm
        if method.startswith(LIBRARY):  # the whole library, as Library.answer asks it
            found = self.library.search(question, documents=max(HITS))
            query, sources = self.library.prepare(question, 2, method.removeprefix(LIBRARY), self.max_new_tokens,
                                                  found[:2], self.max_k)
            own = content_hash(doc.text)
            retrieved = [self.library.store.row(s.doc_id)["content_hash"] for s in found]
            return query.embeds, {"sources": [s.doc_id for s in sources],
                                  **{f"hit@{k}": float(own in retrieved[:k]) for k in HITS}}
        if method == "window":
            prompt = Prompt(lm, question, None, 1, self.max_new_tokens)
            return lm.compose(prompt.segments([[torch.tensor(truncate_middle(doc.ids, prompt.budget))]])), {}
        strategy = strategy_of(method)
        if strategy is not None:
            document = doc.stored
            if canonical(method).startswith(FOREIGN):  # M's plan, another document's compressed rows
                if doc.donor is None:
                    raise UserError(f"{method} needs another document to read: set the document's donor")
                document = ForeignRows(doc.stored, doc.donor.stored)
            with torch.no_grad():  # the chunks it reads compressed are encoded here, each once per document
                query = build_query(lm, question, [document], [doc.relevance(question)], None, [doc.ids], strategy,
                                    self.max_new_tokens, self.max_k)
            return query.embeds, {"chunk_ks": {str(c): k for c, k in query.chunk_ks[0].items()}}
        raise UserError(f"method {method!r} has no composed input")

    def _fits_positions(self, doc: EvalDocument, question: str) -> Prompt | None:
        prompt = Prompt(self.lm, question, None, 1, self.max_new_tokens)
        return prompt if len(doc.ids) <= prompt.budget + self.positions - self.lm.window else None

    def answer_nll(self, method: str, doc: EvalDocument, question: str, reference: list[int]) -> tuple[float, dict] | None:
        lm = self.lm
        if method == "full":
            prompt = self._fits_positions(doc, question)
            if prompt is None:
                return None
            if doc.prefix is None or doc.prefix[1] != (prompt.before, prompt.separator):  # one cache per document
                doc.prefix = (lm.prefix_cache(lm.compose(prompt.segments([[torch.tensor(doc.ids)]])[:-1])),
                              (prompt.before, prompt.separator))
            return lm.score_continuation(lm.compose([torch.tensor(prompt.after)]), reference, doc.prefix[0]).mean_nll, {}
        if method.startswith("ext:") and method not in PLANNED:  # the runtime's layout at a fixed k
            opening, ids, k = self._layout_ids(doc, question, int(method[4:]))
            return lm.score(ids + reference, len(reference), k, prefix=opening).mean_nll, {}
        embeds, read = self.query(method, doc, question)
        return lm.score_continuation(embeds, reference).mean_nll, read

    def _layout_ids(self, doc: EvalDocument, question: str, k: int) -> tuple[list[int], list[int], int]:
        """The runtime's layout at k: (the template's opening, read raw in front and never compressed; the
        document's last tokens that fit, the separator and the question; k)."""
        prompt = Prompt(self.lm, question, None, 1, self.max_new_tokens)
        opening = len(prompt.before)
        keep = self.lm.layout(k, opening).capacity() - (self.lm.window - prompt.budget - opening)
        return prompt.before, doc.ids[max(0, len(doc.ids) - keep) :] + prompt.separator + prompt.after, k

    def record(self, method: str, doc: EvalDocument, question: str, references: list[str], generate: bool) -> dict:
        """One question's record for ``method``: its answer NLL (and greedy answer with its scores), or why not."""
        record = {"method": method, "question": question, "reference": references[0]}
        reference = self.lm.tokenizer(references[0], add_special_tokens=False)["input_ids"][: self.max_new_tokens]
        start = time.perf_counter()
        try:
            scored = self.answer_nll(method, doc, question, reference)
        except ContextTooLongError as err:
            return {**record, "skipped": str(err)}
        if scored is None:
            return {**record, "skipped": f"the document does not fit the model's {self.positions} positions"}
        record.update(answer_nll=scored[0], **scored[1])
        if "chunk_ks" in record:
            record["answer_read"] = answer_read(doc, references, record["chunk_ks"])
        if generate:
            prediction = self.generate(method, doc, question)
            record.update(prediction=prediction, **{name: 100 * max(metric(prediction, r) for r in references)
                                                    for name, metric in (("f1", token_f1), ("em", exact_match),
                                                                         ("rougeL", rouge_l))})
        record["seconds"] = time.perf_counter() - start
        return record

    @property
    def positions(self) -> int:
        return self.lm.llm.config.max_position_embeddings

    def generate(self, method: str, doc: EvalDocument, question: str) -> str | None:
        lm = self.lm
        if method == "full":
            prompt = self._fits_positions(doc, question)
            if prompt is None:
                return None
            window, lm.window = lm.window, self.positions
            try:
                return generate_answer(lm, lm.compose(prompt.segments([[torch.tensor(doc.ids)]])), self.max_new_tokens)[0]
            finally:
                lm.window = window
        if method.startswith("ext:") and method not in PLANNED:
            opening, ids, k = self._layout_ids(doc, question, int(method[4:]))
            return lm.tokenizer.decode(lm.generate(torch.tensor(ids), k, max_new_tokens=self.max_new_tokens,
                                                   prefix=opening), skip_special_tokens=True).strip()
        return generate_answer(lm, self.query(method, doc, question)[0], self.max_new_tokens)[0]


def llm_weights(llm) -> str:
    """A digest of the LLM's token embeddings and output head: ``llm_fingerprint`` (config and vocabulary) is shared
    by fine-tuned derivatives, and records that read no rows are keyed on the LLM alone."""
    sha = hashlib.sha256()
    for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
        sha.update(weight.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return sha.hexdigest()[:16]


def read_journal(path: Path | None, reusable: Callable[[dict], bool]) -> dict[tuple, dict]:
    """Records of an earlier run that ``reusable`` accepts, by (task, document, question, method). (Records of
    ``foreign``, before foreign:M, are not reused: their donor was the next document, whatever it shared.)"""
    if path is None or not path.exists():
        return {}
    done = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if reusable(record):
            done[(record["task"], record["document"], record["question_index"], record["method"])] = record
    return done


def library_for(lm, store, files: dict[str, list[dict]]):
    """The Library over ``store`` that library:M methods ask, refused unless it holds every document of ``files``
    (each file's records)."""
    library = Library(Store.open(store), lm=lm)
    stored = library.store.stored_hashes()
    for file, records in files.items():
        missing = sum(content_hash(r["input"]) not in stored for r in records)
        if missing:
            raise UserError(f"{missing} documents of {file} are not in the store {store}; run: make precompute "
                            f"CORPUS={file} STORE={store} PRECOMPUTE_ARGS=\"--text-column input\"")
    library.index  # noqa: B018 -- a missing or stale index fails before any question
    return library


def evaluate_qa(lm, files: list[str], methods: list[str], limit: int | None = None, max_new_tokens: int = 64,
                generate: bool = True, progress: bool = True, journal: str | Path | None = None,
                max_k: int | None = None, store: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """Rows {method, task, n, f1, em, rougeL, answer_nll, seconds, skipped} per file and method (plus a ``task: all``
    row per method: the mean over all questions), and one record per question and method.

    With ``journal``, every record is appended to that .jsonl file as soon as it is made, and the records it already
    holds from a run with the same settings are reused: a killed evaluation resumes where it stopped (``window``,
    ``full`` and ``rag`` records depend on the LLM, and rag's on the chunk size, not on the plug-in or ``max_k``)."""
    asks_library = any(m.startswith(LIBRARY) for m in methods)
    if asks_library and store is None:
        raise UserError(f"{', '.join(LIBRARY_METHODS)} ask a stored library: give --store STORE")
    records_of = {file: read_leval(file) for file in files}
    evaluation = QAEvaluation(lm, max_new_tokens, max_k, library_for(lm, store, records_of) if asks_library else None)
    settings = {"window": lm.window, "max_new_tokens": max_new_tokens, "generate": generate, "max_k": evaluation.max_k,
                **runtime_fingerprints(lm)}  # a resumed run reuses only records of this LLM, plug-in and window
    # library:M records hold what the library held (its documents and index, not where it lives): they change what
    # its questions retrieve
    library_settings = {**settings, "store": f"{evaluation.library.encoder_name}:"
                                             f"{store_digest(evaluation.library.store)}"} if asks_library else settings

    # window, full and rag read no rows: their records hold for any plug-in (rag's for any that cuts the same
    # chunks), so a journal resumed under another plug-in reuses them
    raw_settings = {key: settings[key] for key in ("window", "max_new_tokens", "generate", "llm_fingerprint")}
    raw_settings["llm_weights"] = llm_weights(lm.llm)

    def settings_for(method: str) -> dict:
        if method.startswith(LIBRARY):
            return library_settings
        if method == "rag":
            return {**raw_settings, "chunk_size": lm.chunk_size}
        return raw_settings if method in READS_NO_ROWS else settings

    def reusable(record: dict) -> bool:
        # a window, full or rag record of a journal from before was keyed on its plug-in, as every record then
        wanted = settings if record["method"] in READS_NO_ROWS and "llm_weights" not in record else \
            settings_for(record["method"])
        return all(record.get(key) == value for key, value in wanted.items())

    journal = Path(journal) if journal else None
    done = read_journal(journal, reusable)
    log = journal.open("a", encoding="utf-8") if journal else None
    records_out, tasks, methods = [], task_names(files), [canonical(m) for m in methods]
    foreign = any(m.startswith(FOREIGN) for m in methods)
    try:
        for file, task in zip(files, tasks):
            records = records_of[file]
            chosen = spread_questions([len(r["instructions"]) for r in records], limit)
            donors = choose_donors(lm.tokenizer, [r["input"] for r in records], lm.chunk_size,
                                   sorted({d for d, _ in chosen}), file) if foreign else {}
            doc, doc_index, made = None, None, {}
            for d, j in tqdm(chosen, desc=task, disable=not progress):
                question, references = records[d]["instructions"][j], records[d]["references"][j]
                for method in methods:
                    if (task, d, j, method) in done:
                        records_out.append(done[(task, d, j, method)])
                        continue
                    if d != doc_index:  # questions come sorted by document: one encoding and cache per document
                        # (a donor, often the next document, is made once for both roles)
                        wanted = [d, donors[d]] if foreign else [d]
                        made = {i: made.get(i) or EvalDocument(lm, evaluation.encoder, records[i]["input"])
                                for i in wanted}
                        doc, doc_index = made[d], d
                        doc.donor = made[wanted[-1]] if foreign else None
                    record = evaluation.record(method, doc, question, references, generate)
                    record.update(task=task, document=d, question_index=j, **settings_for(method))
                    if method.startswith(FOREIGN):
                        record["donor"] = donors[d]
                    records_out.append(record)
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
    finally:
        if log:
            log.close()
    return summarise(records_out, methods, tasks), records_out


def summarise(records: list[dict], methods: list[str], tasks: list[str]) -> list[dict]:
    """A row per method and task, and per method the ``all`` row: the mean over every question of the tasks (a
    1-question file weighs what one question of a 100-question file weighs)."""

    def row(method: str, task: str, mine: list[dict]) -> dict:
        done = [r for r in mine if "answer_nll" in r]
        return {"method": method, "task": task, "n": len(done), "skipped": len(mine) - len(done),
                **{m: float(np.mean([r[m] for r in done])) if done and m in done[0] else float("nan")
                   for m in ("f1", "em", "rougeL", "answer_nll", "seconds", *(f"hit@{k}" for k in HITS))}}

    rows = []
    for method in methods:
        mine = {task: [r for r in records if r["method"] == method and r["task"] == task] for task in tasks}
        rows += [row(method, task, mine[task]) for task in tasks]
        pooled = [r for task in tasks for r in mine[task]]
        if any("answer_nll" in r for r in pooled):
            rows.append(row(method, "all", pooled))
    return rows


def answer_read(doc: EvalDocument, references: list[str], chunk_ks: dict[str, int]) -> str:
    """Where a planned input held the answer: ``raw`` (a chunk holding a reference verbatim was read as tokens),
    ``compressed`` (only at k > 1), ``left out``, or ``not in text`` (no reference occurs verbatim)."""
    gold = set().union(*(answer_chunks(doc.text, doc.char_offsets, r) for r in references))
    ks = [chunk_ks.get(str(c)) for c in gold]
    if not gold:
        return "not in text"
    return "raw" if 1 in ks else "compressed" if any(ks) else "left out"


def paired_differences(records: list[dict], method: str, anchor: str, metric: str = "answer_nll",
                       where: str | None = None) -> dict[str, tuple]:
    """Per task and over all tasks (``all``: every question pooled, each weighing the same, and resampled pooled):
    (n, mean of method - anchor, 95% low, high) on the questions both answered (with ``where``, only those whose
    ``rag`` input held the answer so)."""
    by_task: dict[str, list[float]] = defaultdict(list)
    values = {(r["task"], r["document"], r["question_index"], r["method"]): r[metric] for r in records if metric in r}
    selector = anchor if where is None else "rag"
    kept = {(r["task"], r["document"], r["question_index"]) for r in records
            if r["method"] == selector and (where is None or r.get("answer_read") == where)}
    for (task, d, j, m), value in values.items():
        if m == method and (task, d, j, anchor) in values and (task, d, j) in kept:
            by_task[task].append(value - values[(task, d, j, anchor)])
    out = {task: (len(v), float(np.mean(v)), *bootstrap_interval(np.asarray(v))) for task, v in by_task.items() if v}
    if by_task:
        pooled = np.concatenate([np.asarray(v) for v in by_task.values()])
        out["all"] = (len(pooled), float(pooled.mean()), *bootstrap_interval(pooled))
    return out


def _task_order(task: str) -> tuple:
    return task == "all", task  # the files first, all their questions last


def _difference_rows(label: str, differences: dict[str, tuple]) -> list[str]:
    """Table rows of ``paired_differences``."""
    return [f"| {label} | {task} | {n} | {mean:+.3f} | [{low:+.3f}, {high:+.3f}] |"
            for task, (n, mean, low, high) in sorted(differences.items(), key=lambda item: _task_order(item[0]))]


def _recovered_rows(records: list[dict], method: str) -> list[str]:
    """Per task and over all questions: what reading rag's passages compressed (``method`` = rag:K) recovers of what
    they add raw over the window, (foreign:rag:K - rag:K) / (window - rag), both on the questions all four answered;
    n/a where rag is no better than window."""
    question = lambda r: (r["task"], r["document"], r["question_index"])  # noqa: E731
    methods = (FOREIGN + method, method, "window", "rag")
    shared = set.intersection(*({question(r) for r in records if r["method"] == m and "answer_nll" in r}
                                for m in methods))
    records = [r for r in records if question(r) in shared]
    content = paired_differences(records, FOREIGN + method, method)
    passages = paired_differences(records, "window", "rag")
    lines = []
    for task in sorted(content.keys() & passages.keys(), key=_task_order):
        (n, gained, low, high), (m, raw, raw_low, raw_high) = content[task], passages[task]
        recovered = f"{gained / raw:.2f}" if raw > 0 else "n/a"
        lines.append(f"| {method} | {task} | {n} | {gained:+.3f} [{low:+.3f}, {high:+.3f}] | {m} "
                     f"| {raw:+.3f} [{raw_low:+.3f}, {raw_high:+.3f}] | {recovered} |")
    return lines


def qa_markdown(rows: list[dict], records: list[dict]) -> str:
    # records made before foreign:M call hybrid's control ``foreign``
    rows = [{**r, "method": canonical(r["method"])} for r in rows]
    records = [{**r, "method": canonical(r["method"])} for r in records]
    lines = ["| task | method | n | answer NLL | F1 | EM | ROUGE-L | s / question |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: _task_order(r["task"])):
        skipped = f" ({r['skipped']} skipped)" if r["skipped"] else ""
        lines.append(f"| {r['task']} | {r['method']} | {r['n']}{skipped} "
                     f"| {r['answer_nll']:.3f} | {r['f1']:.1f} | {r['em']:.1f} | {r['rougeL']:.1f} | {r['seconds']:.2f} |")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for anchor in ("rag", "window", "full"):
        if anchor not in methods:
            continue
        lines += ["", f"Answer NLL of each method minus `{anchor}` on the same questions (negative = better), with a 95% "
                  "paired-bootstrap interval; `all` pools the files' questions (each weighs the same; n shared "
                  "questions), resampling them all:", "",
                  "| method | task | n | difference | 95% interval |", "|---|---|---:|---:|---|"]
        for method in methods:
            if method == anchor:
                continue
            lines += _difference_rows(method, paired_differences(records, method, anchor))
    controlled = [m for m in methods if FOREIGN + m in methods]
    if controlled:
        lines += ["", "Each method M minus `foreign:M` (the same plan and raw tokens, another document's compressed "
                  "rows): what the compressed content itself adds (negative = it helps):", "",
                  "| method | task | n | difference | 95% interval |", "|---|---|---:|---:|---|"]
        for method in controlled:
            control = FOREIGN + method
            lines += _difference_rows(f"{method} - {control}", paired_differences(records, method, control))
    recovering = [m for m in controlled if m.startswith("rag:")]
    if recovering and {"window", "rag"} <= set(methods):
        lines += ["", "Content recovered = (`foreign:rag:K` - `rag:K`) / (`window` - `rag`): the share of what rag's "
                  "passages add read raw that reading them compressed at k = K recovers (issue 19's goal: >= 0.4, with "
                  "the interval of `rag:K - foreign:rag:K` excluding zero):", "",
                  "| method | task | n | foreign:rag:K - rag:K [95%] | n | window - rag [95%] | recovered |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for method in recovering:
            lines += _recovered_rows(records, method)
    asked = [r for r in rows if r["method"].startswith(LIBRARY)]
    if asked:
        lines += ["", "Over the stored library: how often retrieval put the question's own document first (hit@1) or "
                  "among the first three (hit@3); the answer NLL of `library:M` against `M` above is what retrieving "
                  "among all the library's documents costs:", "",
                  "| task | method | n | hit@1 | hit@3 | answer NLL |", "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['task']} | {r['method']} | {r['n']} | {r['hit@1']:.2f} | {r['hit@3']:.2f} "
                  f"| {r['answer_nll']:.3f} |" for r in sorted(asked, key=lambda r: _task_order(r["task"]))]
    places = sorted({r["answer_read"] for r in records if r["method"] == "rag" and "answer_read" in r})
    planned = [m for m in methods if strategy_of(m) in ("hybrid", "graded", "adaptive") and not m.startswith(FOREIGN)]
    if planned and places:  # does the compressed context help where rag's passages miss the answer -- by its content?
        lines += ["", "Each planned method that reads compressed chunks, minus `rag` and minus its `foreign:` "
                  "control, by where `rag`'s input held the answer (a chunk holding a reference verbatim read raw, "
                  "left out -- then only the method's compressed rows can hold it -- or no reference verbatim in the "
                  "text):", "", "| difference | rag held the answer | task | n | mean | 95% interval |",
                  "|---|---|---|---:|---:|---|"]
        for method in planned:
            for anchor in ("rag", FOREIGN + method):
                if anchor in methods:
                    lines += [row for place in places for row in _difference_rows(
                        f"{method} - {anchor} | {place}", paired_differences(records, method, anchor, where=place))]
    return "\n".join(lines) + "\n"


def plot_qa(rows: list[dict], path, title: str = "") -> None:
    """Answer NLL by task, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    value = {(r["task"], r["method"]): r["answer_nll"] for r in rows}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(tasks) * len(methods) / 3), 4.5))
    for i, method in enumerate(methods):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [value.get((task, method), float("nan")) for task in tasks], width, label=method)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_ylabel("answer NLL (nats / token, lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def answer_chunks(text: str, char_offsets: list[int], answer: str) -> set[int]:
    """Chunks whose text holds the reference answer verbatim (case-insensitive); empty when it is not extractive."""
    lowered, needle = text.lower(), answer.strip().lower()
    chunks, start = set(), lowered.find(needle) if len(needle) >= 3 else -1
    while start >= 0:
        chunks.update(i for i in range(len(char_offsets) - 1)
                      if char_offsets[i] < start + len(needle) and char_offsets[i + 1] > start)
        start = lowered.find(needle, start + 1)
    return chunks


def evaluate_retrieval(library, questions: list[tuple[str, str, str]], tops: tuple[int, ...] = (1, 5)) -> dict:
    """Recall@k of the chunks that hold the answer, and document accuracy@1, over (doc_id, question, answer) triples
    whose answer occurs verbatim in its document."""
    store = library.store
    rows = {row["doc_id"]: row for row in store.manifest().to_pylist()}
    hits = {top: 0 for top in tops}
    document_hits = counted = 0
    for doc_id, question, answer in questions:
        row = rows[doc_id]
        gold = answer_chunks(store.text(row), row["chunk_char_offsets"], answer)
        if not gold:
            continue
        counted += 1
        found = library.index.search(library.encoder.encode([question])[0], 10 * max(tops))
        ranked = list(dict.fromkeys((hit.doc_id, hit.chunk) for hit in found))  # passages -> chunks, best first
        for top in tops:
            hits[top] += any(d == doc_id and c in gold for d, c in ranked[:top])
        document_hits += bool(found) and found[0].doc_id == doc_id
    return {"questions": counted, **{f"recall@{top}": hits[top] / counted if counted else float("nan") for top in tops},
            "document@1": document_hits / counted if counted else float("nan")}
