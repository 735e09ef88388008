"""Training text: folders of .txt/.md, .jsonl or Parquet files with a text column, tokenised and packed."""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .errors import UserError

TEXT_SUFFIXES = (".txt", ".md")


def expand_sources(sources: list[str]) -> list[Path]:
    """Files named by paths, folders (their .txt/.md/.jsonl/.parquet files) and glob patterns, sorted."""
    files: list[Path] = []
    for source in sources:
        matches = [Path(m) for m in sorted(glob.glob(source))] or [Path(source)]
        for match in matches:
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet"))
            elif match.is_file():
                files.append(match)
    if not files:
        raise UserError(f"no files match {' '.join(sources)}")
    return files


def iter_records(path: Path, text_column: str = "text") -> Iterator[tuple[str, str]]:
    """("file:row", text) for every record of a .jsonl or Parquet file, empty ones included."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                if line.strip():
                    yield f"{path}:{number}", json.loads(line).get(text_column) or ""
    else:
        for number, text in enumerate(pq.read_table(path, columns=[text_column]).column(text_column).to_pylist()):
            yield f"{path}:{number}", text or ""


def iter_documents(files: list[Path], text_column: str = "text") -> Iterator[tuple[str, str]]:
    """(document id, text) for every non-empty UTF-8 document; non-UTF-8 files are skipped."""
    for path in files:
        if path.suffix in (".jsonl", ".parquet"):
            yield from ((source, text) for source, text in iter_records(path, text_column) if text.strip())
        else:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                yield str(path), text


class PackedTokens:
    """All documents' tokens in one stream (an EOS between documents), cut into samples of ``sample_tokens``.

    The stream is cached as a .npy file keyed by the files, their sizes and the tokenizer, so a resumed run reads
    exactly the same samples.
    """

    def __init__(self, tokenizer, sources: list[str], sample_tokens: int, cache_dir: Path,
                 exclude: tuple[str, ...] = (), text_column: str = "text", progress: bool = True):
        files = [f for f in expand_sources(sources) if not any(name in f.name for name in exclude)]
        key = hashlib.sha256(json.dumps(
            [[str(f), f.stat().st_size] for f in files] + [tokenizer.name_or_path, len(tokenizer), text_column]
        ).encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"tokens-{key}.npy"
        if cache.exists():
            self.tokens = np.load(cache, mmap_mode="r")
        else:
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
            parts = []
            for _, text in tqdm(list(iter_documents(files, text_column)), desc="tokenising", disable=not progress):
                parts += [np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32), [eos]]
            if not parts:
                raise UserError(f"no usable text in {' '.join(sources)} (empty, binary or non-UTF-8 files)")
            cache.parent.mkdir(parents=True, exist_ok=True)
            # one temporary file per process: the processes of a distributed run tokenise at once and each moves
            # its own (identical) stream into place, atomically
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, np.concatenate(parts).astype(np.int32))
            tmp.replace(cache)
            self.tokens = np.load(cache, mmap_mode="r")
        self.files = files
        self.sample_tokens = sample_tokens
        if len(self) == 0:
            raise UserError(f"{len(self.tokens)} tokens of text: fewer than one {sample_tokens}-token sample")

    def __len__(self) -> int:
        return len(self.tokens) // self.sample_tokens

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.sample_tokens
        return np.asarray(self.tokens[start : start + self.sample_tokens], dtype=np.int64)


def spread_samples(tokenizer, sources: list[str], sample_tokens: int, per_document: int,
                   text_column: str = "text") -> np.ndarray:
    """The same number of samples of ``sample_tokens`` (``per_document``, or fewer where a document is shorter)
    evenly spaced through each document of ``sources`` that holds one, interleaved across documents ([A1, B1, C1,
    A2, ...]) so that each sample's neighbour (the last one's: the first) is another document's: a fixed held-out set
    whose foreign control pairs each sample with the next."""
    # a file named twice (or by its folder too) is one document, not its own foreign control
    files = list(dict.fromkeys(path.resolve() for path in expand_sources(sources)))
    documents = [np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
                 for _, text in iter_documents(files, text_column)]
    documents = [ids for ids in documents if len(ids) >= sample_tokens]
    if len(documents) < 2:
        raise UserError(f"{' '.join(sources)}: the held-out set needs two documents of at least {sample_tokens} "
                        "tokens (a sample's foreign control is another document's)")
    count = min(per_document, *(len(ids) // sample_tokens for ids in documents))
    spread = [[ids[s : s + sample_tokens] for s in
               np.linspace(0, (len(ids) // sample_tokens - 1) * sample_tokens, count).astype(int)] for ids in documents]
    return np.stack([by_document[i] for i in range(count) for by_document in spread])
