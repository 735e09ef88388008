"""The library on disk: one Zarr v3 array of full-resolution output embeddings per document, a Parquet manifest.

Layout of a store folder::

    zarr.json                  root group; attributes: format, embedder and LLM fingerprints, hidden, chunk size
    docs/<content hash>/       [n_tokens, hidden] float16, rows level-major within blocks (storage.rows),
                               one shard file per block, 128-row inner chunks, zstd
    texts/<content hash>.txt   the document text (passages for retrieval are its chunk spans)
    manifest.parquet           one row per stored document: the commit point

A document becomes visible only when its manifest row is committed (written to a temporary file in the same folder,
then renamed over the manifest), after its array and text are complete. A killed job leaves at most invisible
arrays, which a rerun overwrites. Only one process -- the job's driver -- writes the manifest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 -- pa.compute
import pyarrow.parquet as pq
import torch
import zarr

from extensible.downscale import downscale_chunk, rows_needed
from extensible.errors import UserError
from extensible.models import base_fingerprint

from .rows import RowOrder, block_order, prefix_length, prefix_readable

FORMAT_VERSION = 1
MANIFEST = "manifest.parquet"
INNER_ROWS = 128
MANIFEST_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("content_hash", pa.string()),
        ("n_tokens", pa.int64()),
        ("chunk_size", pa.int32()),
        ("chunk_char_offsets", pa.list_(pa.int64())),  # character offset where each chunk starts, and the end
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("array", pa.string()),
        ("text_path", pa.string()),
        ("checksum", pa.string()),  # sha256 of the stored float16 bytes, in stored order
        ("embedder_fingerprint", pa.string()),
        ("llm_fingerprint", pa.string()),
        ("created", pa.timestamp("s", tz="UTC")),
    ],
    metadata={"format_version": str(FORMAT_VERSION)},
)


class Store:
    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        self.attrs = dict(group.attrs)

    # ---- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, path: str | Path, embedder_fingerprint: str, llm_fingerprint: str, hidden: int,
                       chunk_size: int, block_rows: int = 4096, max_level: int = 32) -> Store:
        """The store for this embedder: created if absent; refused if it was built by another embedder or LLM."""
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls.open(path)
            clash = store.fingerprint_clash({"embedder_fingerprint": embedder_fingerprint,
                                             "llm_fingerprint": llm_fingerprint}, "this job")
            if clash:
                raise UserError(f"{path} holds embeddings of another embedder or LLM ({'; '.join(clash)}); "
                                "use another STORE")
            return store
        if block_rows % chunk_size:
            block_rows = (block_rows // chunk_size + 1) * chunk_size
        group = zarr.open_group(path, mode="w-", attributes={
            "format_version": FORMAT_VERSION, "embedder_fingerprint": embedder_fingerprint,
            "llm_fingerprint": llm_fingerprint, "hidden": hidden, "chunk_size": chunk_size,
            "block_rows": block_rows, "max_level": max_level, "row_order": "level-major within blocks",
        })
        group.require_group("docs")
        (path / "texts").mkdir(exist_ok=True)
        return cls(path, group)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise UserError(f"no store at {path} (run: make precompute STORE={path})")
        group = zarr.open_group(path, mode="r+" if os.access(path, os.W_OK) else "r")
        version = group.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{path} has store format {version}; this version reads format {FORMAT_VERSION}")
        return cls(path, group)

    def fingerprint_clash(self, fingerprints: dict[str, str], whose: str) -> list[str]:
        """The fingerprints (as ``runtime_fingerprints`` gives them) that differ from the ones this store records."""
        return [f"{key}: store {self.attrs.get(key)} vs {whose} {value}"
                for key, value in fingerprints.items() if self.attrs.get(key) != value]

    # ---- the manifest ------------------------------------------------------------------------------------------

    def manifest(self) -> pa.Table:
        file = self.path / MANIFEST
        return pq.read_table(file, schema=MANIFEST_SCHEMA) if file.exists() else MANIFEST_SCHEMA.empty_table()

    def __len__(self) -> int:
        return self.manifest().num_rows

    def stored_hashes(self) -> set[str]:
        return set(self.manifest().column("content_hash").to_pylist())

    def commit(self, rows: list[dict]) -> None:
        """Appends manifest rows atomically (temporary file in the same folder, then rename)."""
        if not rows:
            return
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        new = pa.Table.from_pylist([{**row, "created": row.get("created", now)} for row in rows], schema=MANIFEST_SCHEMA)
        table = pa.concat_tables([self.manifest(), new])
        tmp = self.path / f".{MANIFEST}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.path / MANIFEST)

    # ---- documents ---------------------------------------------------------------------------------------------

    @property
    def hidden(self) -> int:
        return int(self.attrs["hidden"])

    @property
    def chunk_size(self) -> int:
        return int(self.attrs["chunk_size"])

    def writer(self, content_hash: str, n_tokens: int) -> DocumentWriter:
        return DocumentWriter(self, content_hash, n_tokens)

    def document(self, doc_id: str) -> StoredDocument:
        rows = self.manifest().filter(pa.compute.equal(pa.compute.field("doc_id"), doc_id)).to_pylist()
        if not rows:
            raise UserError(f"no document {doc_id!r} in {self.path}")
        return StoredDocument(self, rows[0])

    def documents(self) -> list[StoredDocument]:
        return [StoredDocument(self, row) for row in self.manifest().to_pylist()]

    def text(self, row: dict) -> str:
        return (self.path / row["text_path"]).read_text(encoding="utf-8")

    # ---- checks ------------------------------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Problems found by recomputing every document's checksum; an empty list means the store is sound."""
        problems = []
        for document in self.documents():
            row = document.row
            try:
                array = document.array
                if list(array.shape) != row["shape"]:
                    problems.append(f"{row['doc_id']}: shape {array.shape} != manifest {row['shape']}")
                    continue
                if document.checksum() != row["checksum"]:
                    problems.append(f"{row['doc_id']}: checksum mismatch (array {row['array']} is corrupt)")
                if not (self.path / row["text_path"]).exists():
                    problems.append(f"{row['doc_id']}: text {row['text_path']} is missing")
            except Exception as err:  # a missing or unreadable array is a finding, not a crash
                problems.append(f"{row['doc_id']}: cannot read {row['array']} ({type(err).__name__}: {err})")
        doc_ids = self.manifest().column("doc_id").to_pylist()
        problems += [f"{doc_id}: listed {doc_ids.count(doc_id)} times" for doc_id in sorted(set(doc_ids))
                     if doc_ids.count(doc_id) > 1]
        return problems

    def info(self) -> dict:
        table = self.manifest()
        stored = sum(f.stat().st_size for f in (self.path / "docs").rglob("*") if f.is_file())
        tokens = int(pa.compute.sum(table.column("n_tokens")).as_py() or 0)
        return {"path": str(self.path), "documents": table.num_rows, "tokens": tokens, "bytes_on_disk": stored,
                "bytes_per_token": stored / tokens if tokens else 0.0, "hidden": self.hidden,
                "chunk_size": self.chunk_size, "embedder_fingerprint": self.attrs["embedder_fingerprint"],
                "llm_fingerprint": self.attrs["llm_fingerprint"]}


class DocumentWriter:
    """Writes one document's rows as they come (token order), a block at a time: memory stays one block."""

    def __init__(self, store: Store, content_hash: str, n_tokens: int):
        self.store, self.n_tokens = store, n_tokens
        self.name = f"docs/{content_hash[:32]}"
        block = int(store.attrs["block_rows"])
        self.order = RowOrder(n_tokens, store.chunk_size, block, int(store.attrs["max_level"]))
        self.array = store.group.create_array(
            self.name, shape=(n_tokens, store.hidden), dtype="float16", chunks=(INNER_ROWS, store.hidden),
            shards=(block, store.hidden), overwrite=True,
            attributes={"row_order": "level-major within blocks", "block_rows": block},
        )
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0
        self.sha = hashlib.sha256()

    def append(self, rows: np.ndarray) -> None:
        self.buffer.append(np.asarray(rows, dtype=np.float16))
        self.buffered += len(rows)
        while self.buffered >= self.order.block_rows or (self.buffered and self.written + self.buffered >= self.n_tokens):
            self._flush()

    def _flush(self) -> None:
        rows = np.concatenate(self.buffer)
        size = min(self.order.block_rows, self.n_tokens - self.written)
        block, rest = rows[:size], rows[size:]
        stored = np.ascontiguousarray(block[block_order(size, self.order.chunk_size, self.order.max_level)])
        self.array[self.written : self.written + size] = stored
        self.sha.update(stored.tobytes())
        self.written += size
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> str:
        if self.written != self.n_tokens or self.buffered:
            raise RuntimeError(f"{self.name}: wrote {self.written} of {self.n_tokens} rows")
        return self.sha.hexdigest()


class StoredDocument:
    """Reads one stored document; ``downscaled`` reads only the rows a strided sample needs."""

    def __init__(self, store: Store, row: dict):
        self.store, self.row = store, row
        self.order = RowOrder(row["n_tokens"], row["chunk_size"], int(store.attrs["block_rows"]),
                              int(store.attrs["max_level"]))

    @property
    def array(self) -> zarr.Array:
        return self.store.group[self.row["array"]]

    def __len__(self) -> int:
        return self.row["n_tokens"]

    @property
    def chunk_size(self) -> int:
        return self.row["chunk_size"]

    def checksum(self) -> str:
        sha = hashlib.sha256()
        for start, stop in self.order.blocks():
            sha.update(np.ascontiguousarray(self.array[start:stop]).tobytes())
        return sha.hexdigest()

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` in token order (reads the blocks that hold them)."""
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for block_start, block_stop in self.order.blocks():
            if block_stop <= start or block_start >= stop:
                continue
            stored = self.array[block_start:block_stop]
            tokens = np.empty_like(stored)
            tokens[block_order(block_stop - block_start, self.order.chunk_size, self.order.max_level)] = stored
            parts.append(tokens[max(start, block_start) - block_start : min(stop, block_stop) - block_start])
        return np.concatenate(parts) if parts else np.zeros((0, self.store.hidden), dtype=np.float16)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a stored document supports row slices only; use take() for other selections")
        return self.read(key.start or 0, key.stop)

    def take(self, token_rows: np.ndarray) -> np.ndarray:
        """Rows at arbitrary token indices, reading only the inner chunks that hold them."""
        stored = self.order.token_to_stored()[np.asarray(token_rows)]
        return self.array.get_orthogonal_selection((stored, slice(None)))

    def strided(self, k: int, chunks: int | None = None) -> np.ndarray:
        """o_k, o_2k, ... of each of the first ``chunks`` complete chunks, in token order."""
        return self.downscaled(len(self) // self.row["chunk_size"] if chunks is None else chunks, k)

    def downscaled(self, chunks: int, k: int, method: str = "strided", seed: int = 0) -> np.ndarray:
        """Down-scaled outputs of the first ``chunks`` complete chunks, as ``extensible.downscale`` gives them."""
        size = self.row["chunk_size"]
        if method == "strided" and prefix_readable(k, size, self.order.max_level):
            return self._strided_prefix(chunks * size, k)
        rows = np.concatenate([i * size + rows_needed(size, k, method, seed, i) for i in range(chunks)] or [[]]).astype(int)
        taken = self.take(rows)
        if method != "mean":
            return taken
        grouped = torch.from_numpy(taken.astype(np.float32)).view(chunks, size, self.store.hidden)
        return torch.cat([downscale_chunk(grouped[i], k, "mean") for i in range(chunks)]).numpy().astype(np.float16)

    def chunk_length(self, chunk: int) -> int:
        size = self.row["chunk_size"]
        return min(size, len(self) - chunk * size)

    @property
    def num_chunks(self) -> int:
        return -(-len(self) // self.row["chunk_size"])

    def downscaled_chunks(self, ks: dict[int, int], method: str = "strided", seed: int = 0) -> dict[int, np.ndarray]:
        """Each listed chunk (a last partial one too) down-scaled at its own k, in one read of only the rows needed."""
        size = self.row["chunk_size"]
        needed = {i: rows_needed(self.chunk_length(i), k, method, seed, i) for i, k in ks.items()}
        rows = np.concatenate([i * size + needed[i] for i in ks] or [[]]).astype(int)
        taken = self.take(rows) if len(rows) else np.zeros((0, self.store.hidden), dtype=np.float16)
        result, start = {}, 0
        for i, k in ks.items():
            part = taken[start : start + len(needed[i])]
            start += len(needed[i])
            if method == "mean":
                part = downscale_chunk(torch.from_numpy(part.astype(np.float32)), k, "mean").numpy().astype(np.float16)
            result[i] = part
        return result

    def _strided_prefix(self, n_rows: int, k: int) -> np.ndarray:
        parts = []
        for start, stop in self.order.blocks():
            if start >= n_rows:
                break
            length = stop - start
            prefix = prefix_length(length, self.order.chunk_size, k)
            stored = self.array[start : start + prefix]
            tokens = start + block_order(length, self.order.chunk_size, self.order.max_level)[:prefix]
            keep = np.argsort(tokens)
            selected = stored[keep]
            parts.append(selected[tokens[keep] < n_rows])
        return np.concatenate(parts) if parts else np.zeros((0, self.store.hidden), dtype=np.float16)


def embedder_fingerprint(embedder) -> str:
    """Identifies the outputs an embedder produces: its config and every tensor it computes with."""
    sha = hashlib.sha256(json.dumps({k: v for k, v in vars(embedder.config).items() if k != "trained_steps"},
                                    sort_keys=True, default=str).encode())
    for name, tensor in sorted(embedder.body.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def llm_fingerprint(base: dict) -> str:
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]


def runtime_fingerprints(lm) -> dict[str, str]:
    """What a store records of the runtime whose outputs it holds: its embedder and its LLM."""
    return {"embedder_fingerprint": embedder_fingerprint(lm.embedder),
            "llm_fingerprint": llm_fingerprint(base_fingerprint(lm.llm, lm.tokenizer))}
