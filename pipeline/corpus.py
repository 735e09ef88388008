"""Document corpora: what a precompute job reads, with every unusable file reported rather than fatal.

CORPUS may be a folder (its .txt/.md/.jsonl/.parquet files), a file, or a glob. Without one, the default corpus is
one every Python install has: CPython's documentation topics (``pydoc_data.topics``), one document per topic.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from extensible.data import expand_sources, iter_records


@dataclass
class DocumentRef:
    """One document to embed. Text travels inline for records and built-in topics; files are re-read by workers."""

    doc_id: str
    source: str
    content_hash: str
    n_chars: int
    path: str = ""
    text: str = ""


@dataclass
class CorpusReport:
    documents: list[DocumentRef] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # kind -> sources


def pydoc_topics() -> dict[str, str]:
    """CPython's documentation topics: one real document per topic, name -> text."""
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items()) if text.strip()}


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def scan_corpus(corpus: str | None, text_column: str = "text") -> CorpusReport:
    """Lists the documents of a corpus: hashes each, reports empty, binary, non-UTF-8 and duplicate ones."""
    report = CorpusReport()
    seen: dict[str, str] = {}

    def add(label: str, source: str, text: str, path: str = "") -> None:
        """``label`` names the document readably; the content hash makes its id unique."""
        if not text.strip():
            report.problems["empty"].append(source)
            return
        digest = content_hash(text)
        if digest in seen:
            report.problems["duplicate"].append(f"{source} (same as {seen[digest]})")
            return
        seen[digest] = source
        report.documents.append(DocumentRef(f"{label}-{digest[:8]}", source, digest, len(text), path,
                                            "" if path else text))

    if corpus is None:
        for name, text in pydoc_topics().items():
            add(f"pydoc-{name}", f"pydoc:{name}", text)
        return report
    for path in expand_sources([corpus]):
        if path.suffix in (".jsonl", ".parquet"):
            try:
                for source, text in iter_records(path, text_column):
                    add(f"{path.stem}-{source.rsplit(':', 1)[1]}", source, text)
            except (UnicodeDecodeError, ValueError, KeyError) as err:
                report.problems["unreadable"].append(f"{path} ({type(err).__name__})")
            continue
        data = path.read_bytes()
        if b"\x00" in data[:8192]:
            report.problems["binary"].append(str(path))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            report.problems["non-UTF-8"].append(str(path))
            continue
        add(path.stem, str(path), text, str(path))
    return report


def load_text(ref: dict) -> str:
    return ref["text"] if ref.get("text") else Path(ref["path"]).read_text(encoding="utf-8")
