"""Document corpora: what a precompute job reads, with every unusable file reported rather than fatal.

CORPUS may be a folder (its .txt/.md/.jsonl/.parquet files), a file, or a glob. Without one, the default corpus is
one every Python install has: CPython's documentation topics (``pydoc_data.topics``), one document per topic.

The scan is safe on any folder: only regular files are read (FIFOs, devices and sockets are skipped and reported,
files are opened non-blocking so none can hang it), a symlink is followed only when it resolves inside the corpus
root (the folder, or a named file's own folder), and no file is read past ``max_bytes``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from extensible.data import TEXT_SUFFIXES
from extensible.errors import UserError

SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
MAX_BYTES = 2**30  # per file: generous, but a link to /dev/zero or a runaway log cannot be read without bound


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


class Unreadable(Exception):
    """A file the scan skips; the message is its kind (``not a regular file``, ``too large``, ...)."""


def _regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "folder" if stat.S_ISDIR(mode)
                else "special file")
        raise Unreadable(f"not a regular file ({kind})")


def read_bytes(path: str | Path, max_bytes: int = MAX_BYTES) -> bytes:
    """A regular file's bytes, at most ``max_bytes``; opened non-blocking so a FIFO cannot hang the reader."""
    try:
        _regular(os.stat(path).st_mode)  # a socket cannot even be opened
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise Unreadable(f"unreadable ({err.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        _regular(os.fstat(fd).st_mode)  # what was opened, in case the path changed since
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Unreadable(f"too large (over --max-bytes {max_bytes:,})")
    return data


def corpus_files(corpus: str, report: CorpusReport) -> list[Path]:
    """The corpus's candidate files, each resolved; links that leave the corpus root are reported, not followed."""
    matches = [Path(m) for m in sorted(glob.glob(corpus))] or [Path(corpus)]
    files = []
    for match in matches:
        if match.is_dir():
            root = match.resolve()
            found = []
            for folder, _, names in os.walk(match):  # does not enter linked folders
                found += [Path(folder) / name for name in names if Path(name).suffix in SUFFIXES]
        elif match.exists() or match.is_symlink():
            root, found = match.parent.resolve(), [match]
        else:
            continue
        for path in sorted(found):
            real = path.resolve()
            if not real.is_relative_to(root):
                report.problems["outside corpus"].append(f"{path} -> {real}")
            else:
                files.append(real if path.is_symlink() else path)
    if not files and not report.problems:
        raise UserError(f"no files match {corpus}")
    return files


def iter_records(path: Path, data: bytes, text_column: str, report: CorpusReport):
    """(source, text) of each usable record of a .jsonl or Parquet file; bad records are reported, the rest kept."""
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line.decode("utf-8"))))
            except (UnicodeDecodeError, ValueError) as err:
                records.append((number, err))
    else:
        table = pq.read_table(io.BytesIO(data))
        if text_column not in table.column_names:
            raise UserError(f"{path} has no {text_column!r} column (columns: {', '.join(table.column_names)}); "
                            "pass --text-column")
        records = [(number, {text_column: text}) for number, text in enumerate(table.column(text_column).to_pylist())]
    if records and not any(isinstance(r, dict) and text_column in r for _, r in records):
        fields = next((sorted(r) for _, r in records if isinstance(r, dict)), [])
        raise UserError(f"no record of {path} has a {text_column!r} field (fields: {', '.join(fields)}); "
                        "pass --text-column")
    bad = 0
    for number, record in records:
        text = record.get(text_column) if isinstance(record, dict) else None
        why = (type(record).__name__ if isinstance(record, Exception) else "not a JSON object"
               if not isinstance(record, dict) else None if text is None or isinstance(text, str)
               else f"{text_column} is {type(text).__name__}, not a string")
        if why:
            report.problems["bad record"].append(f"{path}:{number} ({why})")
            bad += 1
            continue
        yield f"{path}:{number}", text or ""
    if bad:
        report.problems["read in part"].append(f"{path}: {len(records) - bad} of {len(records)} records read")


def scan_corpus(corpus: str | None, text_column: str = "text", max_bytes: int = MAX_BYTES) -> CorpusReport:
    """Lists the documents of a corpus: hashes each, reports unusable files and records, and duplicates."""
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
    for path in corpus_files(corpus, report):
        try:
            data = read_bytes(path, max_bytes)
        except Unreadable as err:
            report.problems[str(err).split(" (")[0]].append(f"{path} ({err})")
            continue
        if path.suffix in (".jsonl", ".parquet"):
            try:
                for source, text in iter_records(path, data, text_column, report):
                    add(f"{path.stem}-{source.rsplit(':', 1)[1]}", source, text)
            except (OSError, ValueError) as err:  # not Parquet at all; UserError (a wrong --text-column) goes up
                if isinstance(err, UserError):
                    raise
                report.problems["unreadable"].append(f"{path} ({type(err).__name__})")
            continue
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


def load_text(ref: dict, max_bytes: int = MAX_BYTES) -> str:
    """The text a worker embeds: exactly the bytes it reads now (which may differ from the scan's, if edited)."""
    if ref.get("text"):
        return ref["text"]
    try:
        return read_bytes(ref["path"], max_bytes).decode("utf-8")
    except Unreadable as err:
        raise OSError(f"{ref['path']}: {err}") from None
