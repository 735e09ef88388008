"""QA evaluation on L-Eval-format files (one JSON object per document: ``input``, ``instructions``, ``outputs``).

Methods, the same questions for each:

* ``window``: the document truncated in the middle (its head and its end kept, LongBench's rule) so that the
  prompt and the answer fit the window;
* ``ext:adaptive`` / ``ext:graded``: the whole document as extensible embeddings at the smallest k that fits (or
  graded), as ``extemb ask`` reads a stored document; chunks that do not fit at k=32 are left out, the earliest first;
* ``ext:K``: the runtime's layout at a fixed k, as ``extemb generate`` reads a file: the oldest chunks compressed, the
  most recent document tokens raw before the question (the beginning is dropped beyond the layout's capacity);
* a document that fits the window as plain tokens is read raw by every ``ext`` method;
* ``full``: the whole document as tokens, only when it fits the model's positions (rows count what was answered).

Metrics (SQuAD-style normalisation): token F1, exact match, ROUGE-L (F-measure of the longest common subsequence).
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from extensible.errors import ContextTooLongError, UserError
from extensible.evaluate import parse_methods

from .library import InMemoryDocument, compose_and_answer, prompt_parts

ARTICLES = re.compile(r"\b(a|an|the)\b")


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


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalise_answer(prediction), normalise_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:  # longest common subsequence, one row at a time
        current = [0]
        for j, r in enumerate(ref):
            current.append(previous[j] + 1 if p == r else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def read_leval(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        missing = {"input", "instructions", "outputs"} - set(record)
        if missing:
            raise UserError(f"{path}:{number + 1} lacks {', '.join(sorted(missing))} (not an L-Eval file)")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def parse_qa_methods(text: str) -> list[str]:
    return parse_methods(text, base=("window", "full"), named_ext=("adaptive", "graded"))


def truncate_middle(ids: list[int], keep: int) -> list[int]:
    if len(ids) <= keep:
        return ids
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


class QAEvaluation:
    def __init__(self, lm, max_new_tokens: int = 64):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        self._outputs: dict[tuple, InMemoryDocument] = {}  # the last document encoded, by (file, index)

    def _raw_answer(self, parts: tuple[list[int], list[int], list[int]], doc_ids: list[int], keep: int) -> str:
        before, separator, after = parts
        ids = before + truncate_middle(doc_ids, keep) + separator + after
        new = self.lm.generate_embeds(self.lm.compose([torch.tensor(ids)]), self.max_new_tokens)
        return self.lm.tokenizer.decode(new, skip_special_tokens=True).strip()

    def answer(self, method: str, key, document: str, question: str) -> str | None:
        """The prediction of ``method``, or None for ``full`` when the document does not fit the model's positions."""
        lm = self.lm
        doc_ids = lm.tokenizer(document, add_special_tokens=False)["input_ids"]
        before, after = prompt_parts(lm.tokenizer, question)
        separator = lm.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        parts = (before, separator, after)
        room = lm.window - len(before) - len(separator) - len(after) - self.max_new_tokens
        if room < 1:
            raise ContextTooLongError(f"the question does not fit the window of {lm.window}")
        if method == "window" or (method.startswith("ext:") and len(doc_ids) <= room):
            return self._raw_answer(parts, doc_ids, room)
        if method == "full":
            positions = lm.llm.config.max_position_embeddings
            if len(doc_ids) > room + positions - lm.window:
                return None
            window, lm.window = lm.window, positions
            try:
                return self._raw_answer(parts, doc_ids, len(doc_ids))
            finally:
                lm.window = window
        if method not in ("ext:adaptive", "ext:graded"):  # ext:K: the runtime's layout, recent tokens kept raw
            k = int(method[4:])
            keep = lm.layout(k).capacity() - (lm.window - room)  # what the template, question and answer leave
            ids = before + doc_ids[max(0, len(doc_ids) - keep) :] + separator + after
            new = lm.generate(torch.tensor(ids), k, max_new_tokens=self.max_new_tokens)
            return lm.tokenizer.decode(new, skip_special_tokens=True).strip()
        if key not in self._outputs:  # one encoding per document, shared by its questions (offline mode)
            self._outputs = {key: InMemoryDocument(lm.encode(torch.tensor(doc_ids)), lm.chunk_size)}
        text, *_ = compose_and_answer(lm, question, [self._outputs[key]], [{}], None, method[4:], self.max_new_tokens,
                                      max_k=32, token_ids=[doc_ids])
        return text


def evaluate_qa(lm, files: list[str], methods: list[str], limit: int | None = None, max_new_tokens: int = 64,
                progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows {method, task, n, f1, em, rougeL, seconds} per task and method (plus an ``all`` average of the tasks per
    method), and every prediction. ``limit`` questions per file, spread over its documents."""
    evaluation = QAEvaluation(lm, max_new_tokens)
    rows, predictions = [], []
    for file in files:
        task = Path(file).stem
        records = read_leval(file)
        # Round-robin over documents (every document's first question, then every second one, ...), so that a
        # --limit spreads over documents instead of taking one document's questions.
        questions = sorted(((j, d, record["input"], q, a) for d, record in enumerate(records)
                            for j, (q, a) in enumerate(zip(record["instructions"], record["outputs"]))),
                           key=lambda item: (item[0], item[1]))
        questions = sorted((item[1:] for item in questions[:limit]), key=lambda item: item[0])  # one encoding per doc
        for method in methods:
            scores, start = [], time.perf_counter()
            for d, document, question, reference in tqdm(questions, desc=f"{task} {method}", disable=not progress):
                prediction = evaluation.answer(method, (file, d), document, question)
                if prediction is None:
                    continue
                scores.append((token_f1(prediction, reference), exact_match(prediction, reference),
                               rouge_l(prediction, reference)))
                predictions.append({"task": task, "method": method, "question": question, "reference": reference,
                                    "prediction": prediction})
            n = len(scores)
            rows.append({"method": method, "task": task, "n": n,
                         "f1": 100 * sum(s[0] for s in scores) / n if n else float("nan"),
                         "em": 100 * sum(s[1] for s in scores) / n if n else float("nan"),
                         "rougeL": 100 * sum(s[2] for s in scores) / n if n else float("nan"),
                         "seconds": (time.perf_counter() - start) / n if n else 0.0})
    for method in methods:
        mine = [r for r in rows if r["method"] == method and r["n"]]
        if mine:
            rows.append({"method": method, "task": "all", "n": sum(r["n"] for r in mine),
                         **{m: sum(r[m] for r in mine) / len(mine) for m in ("f1", "em", "rougeL", "seconds")}})
    return rows, predictions


def qa_markdown(rows: list[dict]) -> str:
    lines = ["| task | method | n | F1 | EM | ROUGE-L | s / question |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["task"] == "all", r["task"])):
        lines.append(f"| {r['task']} | {r['method']} | {r['n']} | {r['f1']:.1f} | {r['em']:.1f} | {r['rougeL']:.1f} "
                     f"| {r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


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
