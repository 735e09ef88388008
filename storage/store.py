"""The library on disk: one Zarr v3 array of full-resolution output embeddings per document, a Parquet manifest.

Layout of a store folder::

    zarr.json                  root group; attributes: format, embedder and LLM fingerprints, hidden, chunk size
    docs/<content hash>/       [n_tokens, hidden] float16, rows level-major within blocks (storage.rows),
                               one shard file per block, 128-row inner chunks, zstd
    texts/<content hash>.txt   the document text (passages for retrieval are its chunk spans)
    docs/<content hash>/record.json   the document's manifest row, written once its array and text are complete
    manifest.parquet           the manifest's compacted rows, one per stored document; its metadata names its
                               generation g (manifest.prev.parquet: the generation before)
    manifest.<g>.jsonl         the journal of generation g: the rows committed since, one JSON line each
    .lock                      held by the one writer (filelock); .lock.holder says who

A document becomes visible only when its manifest row is committed -- appended under the lock to the journal as one
complete, fsync'd line -- after its array, text and record are complete. A commit costs its own rows, not the
library's: when the journal holds as many rows as the compacted file (and at least ``JOURNAL_MIN``), both are written
as generation g + 1 (to a unique temporary file, then renamed over ``manifest.parquet``) and the journal starts anew,
so each row is rewritten a bounded number of times on average. A killed commit leaves at most a torn last journal line,
which readers ignore and the next commit cuts off, and invisible arrays, which a rerun overwrites. The manifest is
only an index: ``repair`` rebuilds it from the records. Every inner chunk carries a crc32c checksum, so damaged bytes
are an error on read, never wrong vectors. Readers keep the manifest in memory and re-read only what changed (a stat
of the two files per read), so a query costs the same in a library of 100 or 100,000 documents.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 -- pa.compute
import pyarrow.parquet as pq
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from extensible.downscale import downscale_chunk, rows_needed
from extensible.errors import UserError
from extensible.models import base_fingerprint

from .files import LocalFiles, ObjectFiles, open_files
from .rows import RowOrder, block_order, prefix_length, prefix_readable

FORMAT_VERSION = 2  # 2: the manifest's journal; a format-1 store (no journal) is read, and becomes 2 at its next commit
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.parquet"
PREVIOUS_MANIFEST = "manifest.prev.parquet"
JOURNAL_MIN = 256  # rows the journal may hold before a compaction, however small the compacted file
RECORD = "record.json"
INNER_ROWS = 128
COMMIT_WAIT_S = 120  # a commit waits this long for another writer's commit, then names it
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


def _repair_hint(path) -> str:
    return f"run: extemb store verify {path} (and extemb store repair {path})"


def journal_name(generation: int) -> str:
    return f"manifest.{generation}.jsonl"


def _row_to_json(row: dict) -> str:
    created = row["created"]
    return json.dumps({**row, "created": created.isoformat() if hasattr(created, "isoformat") else created})


def _row_from_json(line: bytes) -> dict:
    row = json.loads(line)
    row["created"] = dt.datetime.fromisoformat(row["created"]) if row.get("created") else None
    return row


class _Manifest:
    """The manifest as this process last read it: the compacted file's rows plus the journal's complete lines,
    refreshed by what changed since (the journal from where the last read stopped)."""

    def __init__(self):
        self.base_key, self.generation, self.base_rows = None, 0, []
        self.journal_position, self.journal_rows = 0, []
        self.by_id: dict[str, dict] = {}
        self.hashes: set[str] = set()

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.by_id.setdefault(row["doc_id"], row)  # the first row of a doc_id is the one served, as before
            self.hashes.add(row["content_hash"])

    @property
    def count(self) -> int:
        return len(self.base_rows) + len(self.journal_rows)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class Store:
    """A store of precomputed embeddings in a local folder or under an ``s3://bucket/prefix`` URL (``storage.files``
    keeps the guarantees in each)."""

    def __init__(self, files: LocalFiles | ObjectFiles, group: zarr.Group):
        self.files = files
        self.path = files.location  # a Path for a local store, the URL of an object store
        self.group = group
        self.attrs = dict(group.attrs)
        self._cache = _Manifest()
        self._cache_guard = threading.Lock()

    # ---- opening -----------------------------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, path: str | Path, embedder_fingerprint: str, llm_fingerprint: str, hidden: int,
                       chunk_size: int, block_rows: int = 4096, max_level: int = 32) -> Store:
        """The store for this embedder: created if absent; refused if it was built by another embedder or LLM.
        An empty store (nothing committed yet) is re-pinned to this embedder, so a failed first run does not stick."""
        files = open_files(path)
        files.check_reachable()
        path = files.location
        unit = math.lcm(chunk_size, INNER_ROWS)  # a block is whole chunks and whole inner chunks, for any chunk size
        block_rows = -(-block_rows // unit) * unit
        attributes = {
            "format_version": FORMAT_VERSION, "embedder_fingerprint": embedder_fingerprint,
            "llm_fingerprint": llm_fingerprint, "hidden": hidden, "chunk_size": chunk_size,
            "block_rows": block_rows, "max_level": max_level, "row_order": "level-major within blocks",
        }
        if files.exists("zarr.json"):
            store = cls.open(path)
            clash = store.fingerprint_clash({"embedder_fingerprint": embedder_fingerprint,
                                             "llm_fingerprint": llm_fingerprint, "hidden": hidden,
                                             "chunk_size": chunk_size}, "this job")
            if clash and store.is_empty():
                store._check_writable()
                store.group.attrs.update(attributes)
                return cls.open(path)
            if clash:
                raise UserError(f"{path} holds embeddings of another embedder or LLM ({'; '.join(clash)}); "
                                "use another STORE")
            return store
        files.prepare()
        if files.remote:
            files.check_conditional_writes()  # before anything is written
        try:
            group = zarr.open_group(store=files.zarr_store(read_only=False), mode="w-", attributes=attributes)
            group.require_group("docs")
        except PermissionError as err:
            raise UserError(f"cannot create the store {path}: {err.strerror} ({err.filename})") from None
        return cls(files, group)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        files = open_files(path)
        files.check_reachable()
        path = files.location
        if not files.exists("zarr.json"):
            raise UserError(f"no store at {path} (run: make precompute STORE={path})")
        try:
            writable = files.writable()
            group = zarr.open_group(store=files.zarr_store(read_only=not writable), mode="r+" if writable else "r")
        except Exception as err:  # a damaged zarr.json
            raise UserError(f"{path}/zarr.json is unreadable ({type(err).__name__}); the store cannot be opened") from None
        version = group.attrs.get("format_version")
        if version not in READABLE_FORMATS:
            raise UserError(f"{path} has store format {version}; this version reads formats "
                            f"{', '.join(map(str, READABLE_FORMATS))}")
        return cls(files, group)

    def fingerprint_clash(self, fingerprints: dict[str, str], whose: str) -> list[str]:
        """The fingerprints (as ``runtime_fingerprints`` gives them) that differ from the ones this store records."""
        return [f"{key}: store {self.attrs.get(key)} vs {whose} {value}"
                for key, value in fingerprints.items() if self.attrs.get(key) != value]

    def is_empty(self) -> bool:
        """Nothing committed and no complete document on disk: the store is not yet pinned to an embedder."""
        return self.count() == 0 and not any(name.endswith(f"/{RECORD}") for name in self.files.list("docs"))

    # ---- the writer's lock -------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if not self.files.writable():
            raise UserError(f"the store {self.path} is read-only; copy it or fix its permissions to write to it")

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it."""
        return self.files.holder()

    def _busy(self) -> UserError:
        return UserError(f"the store {self.path} is being written by {self.holder()}; wait for it to finish "
                         "(or pass --wait)")

    @contextmanager
    def lock(self, wait: bool = False, timeout: float | None = None):
        """The store's one writer: held by a job for its whole write phase and by every commit and repair.
        Refused at once (or after ``timeout`` seconds) with a message naming the holder, unless ``wait``.
        Re-entrant in one thread; another thread of this process waits or is refused like another process."""
        self._check_writable()
        timeout = -1 if wait else (timeout or 0)
        start = time.monotonic()
        thread_lock = self.files.thread_lock
        if not thread_lock.acquire(timeout=timeout):
            raise self._busy()
        held = False
        try:
            held = self.files.lock_acquire(-1 if timeout < 0 else max(0.0, timeout - (time.monotonic() - start)))
        finally:
            if not held:
                thread_lock.release()
        if not held:
            raise self._busy()
        try:
            yield self
        finally:
            self.files.lock_release()
            thread_lock.release()

    # ---- the manifest ------------------------------------------------------------------------------------------

    def _unreadable(self, name: str, err: Exception) -> UserError:
        return UserError(f"the manifest {self.path}/{name} is unreadable ({type(err).__name__}); "
                         f"run: extemb store repair {self.path}")

    def _refresh(self) -> _Manifest:
        """The manifest as it is now, reading only what changed since the last read."""
        with self._cache_guard:
            for _ in range(3):  # a compaction between reading the file and its journal: read again
                cache = self._cache
                key = self.files.tag(MANIFEST)
                if key is None and self.files.journal_exists():
                    raise UserError(f"the manifest {self.path}/{MANIFEST} is missing but its journal is there; "
                                    f"run: extemb store repair {self.path}")
                if key != cache.base_key:
                    cache = _Manifest()
                    if key is not None:
                        data, key = self.files.read_tagged(MANIFEST)  # its rows, generation and key: one version
                        if key is None:
                            continue
                        try:
                            table = pq.read_table(pa.BufferReader(data), schema=MANIFEST_SCHEMA)
                            metadata = pq.read_schema(pa.BufferReader(data)).metadata or {}
                        except Exception as err:  # truncated or overwritten: the records can rebuild it
                            raise self._unreadable(MANIFEST, err) from None
                        cache.generation = int(metadata.get(b"generation", b"0"))
                        cache.base_rows = table.to_pylist()
                        cache.add(cache.base_rows)
                    cache.base_key = key
                data, position = self.files.journal_read(cache.generation, cache.journal_position)
                if not data and key is not None and self.files.tag(MANIFEST) != key:
                    self._cache = _Manifest()  # compacted while read: its journal may be gone
                    continue
                try:
                    rows = [_row_from_json(line) for line in data.splitlines() if line.strip()]
                except (ValueError, KeyError) as err:
                    raise self._unreadable(journal_name(cache.generation), err) from None
                cache.journal_rows += rows
                cache.add(rows)
                cache.journal_position = position
                self._cache = cache
                return cache
            raise UserError(f"the manifest of {self.path} kept changing while it was read; try again")

    def manifest(self) -> pa.Table:
        """Every committed row, in commit order."""
        cache = self._refresh()
        return pa.Table.from_pylist(cache.base_rows + cache.journal_rows, schema=MANIFEST_SCHEMA)

    def count(self) -> int:
        return self._refresh().count

    def __len__(self) -> int:
        return self.count()

    def rows_by_id(self) -> Mapping[str, dict]:
        """Every document's manifest row by doc_id, as committed now: a read-only view of this store's cache (no copy
        of a large library's rows per lookup)."""
        return MappingProxyType(self._refresh().by_id)

    def row(self, doc_id: str) -> dict:
        """One document's manifest row (a dict lookup, whatever the library's size)."""
        row = self.rows_by_id().get(doc_id)
        if row is None:
            raise UserError(f"no document {doc_id!r} in {self.path}")
        return row

    def stored_hashes(self) -> set[str]:
        return set(self._refresh().hashes)

    def commit(self, rows: list[dict]) -> list[dict]:
        """Appends manifest rows under the lock, atomically per commit; a document already listed is not added
        twice. Returns the rows that were new."""
        if not rows:
            return []
        with self.lock(timeout=COMMIT_WAIT_S):
            lost = self.files.lease_lost()
            if lost:  # another writer may be committing: this job's rows stay invisible, a rerun commits them
                raise UserError(f"this job lost its hold on {self.path} ({lost}); rerun it to commit what it wrote")
            for _ in range(5):  # a lost race (a writer whose lease expired under it): read again, then commit
                cache = self._refresh()
                new_rows, batch = [], set()
                for row in rows:
                    if row["content_hash"] not in cache.hashes and row["content_hash"] not in batch:
                        batch.add(row["content_hash"])
                        new_rows.append(row)
                if not new_rows:
                    return []
                now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
                # through the manifest's schema: the journal holds exactly what the compacted file would
                stamped = pa.Table.from_pylist([{**row, "created": row.get("created") or now} for row in new_rows],
                                               schema=MANIFEST_SCHEMA).to_pylist()
                if self.attrs.get("format_version") != FORMAT_VERSION:  # format 1: older code must not read it
                    self.group.attrs["format_version"] = self.attrs["format_version"] = FORMAT_VERSION
                if cache.base_key is None:  # the first commit writes the compacted file, which names the generation
                    committed = self._write_manifest(pa.Table.from_pylist(stamped, schema=MANIFEST_SCHEMA),
                                                     cache.generation, None) is not None
                else:
                    lines = "".join(_row_to_json(row) + "\n" for row in stamped).encode()
                    committed = self.files.journal_append(cache.generation, cache.journal_position, lines)
                if committed:
                    if len(cache.journal_rows) + len(stamped) >= max(JOURNAL_MIN, len(cache.base_rows)):
                        self._compact()
                    return new_rows
            raise UserError(f"another writer kept committing to {self.path} while this job held its lock; "
                            f"{_repair_hint(self.path)}")

    def _compact(self) -> None:
        """The compacted file and the journal as generation g + 1 (the journal of g stays until the next compaction:
        a reader that read the file of g reads its journal)."""
        cache = self._refresh()
        rows = cache.base_rows + cache.journal_rows
        written = self._write_manifest(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), cache.generation + 1,
                                       cache.base_key)
        if written is None:
            return  # another writer replaced it first: the next read sees theirs
        for generation in self.files.journal_generations():
            if generation not in (cache.generation, cache.generation + 1):
                self.files.journal_delete(generation)
        with self._cache_guard:  # the writer knows what it wrote: no re-read of the whole manifest
            compacted = _Manifest()
            compacted.base_key = written
            compacted.generation, compacted.base_rows = cache.generation + 1, rows
            compacted.by_id, compacted.hashes = cache.by_id, cache.hashes
            self._cache = compacted

    def _write_manifest(self, table: pa.Table, generation: int, expected):
        """Replaces the manifest only if it is still the version ``expected`` names (None: only if there is none),
        keeping the previous generation (manifest.prev.parquet); the new version's tag, None when another writer
        replaced it first."""
        previous = self.files.read_tagged(MANIFEST)[0] if expected is not None else None
        table = table.replace_schema_metadata({**(MANIFEST_SCHEMA.metadata or {}), b"generation": str(generation)})
        if previous is not None:
            self.files.write(PREVIOUS_MANIFEST, previous)
        written = self.files.replace(MANIFEST, parquet_bytes(table), expected)
        if written is not None:
            self.files.journal_delete(generation)  # a new generation starts with an empty journal
        return written

    def write_text(self, content_hash: str, text: str) -> str:
        """Stores a document's text (exactly the UTF-8 bytes that were hashed); returns its path in the store."""
        text_path = f"texts/{content_hash[:32]}.txt"
        self.files.write(text_path, text.encode("utf-8"))
        return text_path

    def write_record(self, row: dict) -> None:
        """The document is complete: its manifest row beside its array, from which ``repair`` can rebuild. Created
        only if absent; one left by an earlier, uncommitted run of another array is replaced."""
        name = f"{row['array']}/{RECORD}"
        record = json.dumps({**row, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
        if self.files.create(name, record.encode()):
            return
        data, tag = self.files.read_tagged(name)
        try:
            same = json.loads(data)["checksum"] == row["checksum"]
        except (TypeError, ValueError, KeyError):
            same = False
        if not same:
            self.files.replace(name, record.encode(), tag)

    # ---- repair ------------------------------------------------------------------------------------------------

    def repair(self) -> list[str]:
        """Rebuilds the manifest from the documents' records (and any readable manifest generation): keeps every
        document whose array, checksum and text are sound, once; removes duplicates, damaged documents and orphans
        (arrays, texts and temporary files no document owns). Returns what it did, one line each."""
        done = []
        with self.lock():
            current, generations = [], []
            for name in (MANIFEST, PREVIOUS_MANIFEST):
                data, _ = self.files.read_tagged(name)
                if data is None:
                    continue
                try:
                    rows = pq.read_table(pa.BufferReader(data), schema=MANIFEST_SCHEMA).to_pylist()
                    if name == MANIFEST:
                        metadata = pq.read_schema(pa.BufferReader(data)).metadata or {}
                        generations.append(int(metadata.get(b"generation", b"0")))
                except Exception as err:
                    done.append(f"{name} was unreadable ({type(err).__name__}); rebuilt from the records")
                    continue
                current += rows
            try:
                listed = self.manifest().column("content_hash").to_pylist()
                if len(listed) != len(set(listed)):
                    done.append(f"dropped {len(listed) - len(set(listed))} duplicate manifest rows")
            except UserError:
                pass  # named above
            journals = self.files.journal_generations()
            for generation in journals:  # every generation's complete, readable lines
                lines = self.files.journal_bytes(generation).splitlines(keepends=True)
                damaged = 0
                for line in lines:
                    try:
                        if not line.endswith(b"\n"):
                            raise ValueError("a torn line")
                        current.append(_row_from_json(line))
                    except (ValueError, KeyError):
                        damaged += 1
                if damaged:
                    done.append(f"ignored {damaged} damaged or torn lines of {journal_name(generation)}")
            candidates: dict[str, dict] = {}
            for name in self.files.list("docs"):
                if not name.endswith(f"/{RECORD}"):
                    continue
                try:
                    row = json.loads(self.files.read(name))
                    row["created"] = dt.datetime.fromisoformat(row["created"])
                except (ValueError, KeyError) as err:
                    done.append(f"ignored the damaged record {name} ({type(err).__name__})")
                    continue
                candidates.setdefault(row["content_hash"], row)
            for row in current:  # documents of older stores, written before records existed
                candidates.setdefault(row["content_hash"], row)
            keep = []
            for row in sorted(candidates.values(), key=lambda r: (r["created"], r["doc_id"])):
                problem = self.check_document(row)
                if problem:
                    done.append(f"dropped {row['doc_id']}: {problem} (rerun precompute to embed it again)")
                else:
                    keep.append(row)
            for row in keep:
                if not self.files.exists(f"{row['array']}/{RECORD}"):
                    self.write_record({k: v for k, v in row.items() if k != "created"})
            generation = max(journals + generations, default=0) + 1
            self._write_manifest(pa.Table.from_pylist(keep, schema=MANIFEST_SCHEMA), generation,
                                 self.files.tag(MANIFEST))
            for old in journals:
                self.files.journal_delete(old)
            done += self._remove_orphans(keep)
            done.append(f"manifest rebuilt: {len(keep)} documents")
        return done

    def _remove_orphans(self, rows: list[dict]) -> list[str]:
        arrays = {row["array"] for row in rows}
        texts = {row["text_path"] for row in rows}
        removed = []
        for folder in sorted({"/".join(name.split("/")[:2]) for name in self.files.list("docs") if name.count("/") > 1}):
            if folder not in arrays:
                self.files.delete_prefix(folder)
                removed.append(folder)
        for name in self.files.list("texts"):
            if name not in texts:
                self.files.delete(name)
                removed.append(name)
        for name in self.files.temporaries():
            self.files.delete(name)
            removed.append(name)
        return [f"removed {len(removed)} orphans: {', '.join(removed[:10])}" + (" ..." if len(removed) > 10 else "")
                ] if removed else []

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
        return StoredDocument(self, self.row(doc_id))

    def documents(self) -> list[StoredDocument]:
        return [StoredDocument(self, row) for row in self.manifest().to_pylist()]

    def text(self, row: dict) -> str:
        """The document's text, refused unless its bytes are the ones that were hashed and embedded."""
        try:
            data = self.files.read(row["text_path"])
        except OSError as err:
            raise UserError(f"the text of {row['doc_id']} ({row['text_path']}) cannot be read "
                            f"({err.strerror or 'missing'}); "
                            f"{_repair_hint(self.path)}") from None
        if hashlib.sha256(data).hexdigest() != row["content_hash"]:
            raise UserError(f"the text of {row['doc_id']} ({row['text_path']}) is not the text that was embedded; "
                            f"{_repair_hint(self.path)}")
        return data.decode("utf-8")

    # ---- checks ------------------------------------------------------------------------------------------------

    def check_document(self, row: dict) -> str | None:
        """What is wrong with one stored document (array shape, checksum of its bytes, its text), or None."""
        try:
            document = StoredDocument(self, row)
            if list(document.array.shape) != list(row["shape"]):
                return f"shape {document.array.shape} != manifest {row['shape']}"
            if document.checksum() != row["checksum"]:
                return f"checksum mismatch (array {row['array']} is corrupt)"
        except UserError as err:
            return str(err).split("; run:")[0]
        try:
            text = self.files.read(row["text_path"])
        except OSError:
            return f"text {row['text_path']} is missing"
        if hashlib.sha256(text).hexdigest() != row["content_hash"]:
            return f"text {row['text_path']} does not match its content hash (edited or damaged)"
        return None

    def verify(self) -> list[str]:
        """Problems found by recomputing every document's checksums; an empty list means the store is sound."""
        try:
            table = self.manifest()
        except UserError as err:
            return [str(err)]
        if not table.num_rows and not self.is_empty():
            return [f"the manifest {self.path}/{MANIFEST} is missing but documents are stored; "
                    f"run: extemb store repair {self.path}"]
        problems = [f"{row['doc_id']}: {problem}" for row in table.to_pylist()
                    if (problem := self.check_document(row))]
        for column in ("doc_id", "content_hash"):
            counts = Counter(table.column(column).to_pylist())
            problems += [f"{value}: listed {n} times; run: extemb store repair {self.path}"
                         for value, n in sorted(counts.items()) if n > 1]
        return problems

    def info(self) -> dict:
        table = self.manifest()
        stored = self.files.size("docs")
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
            shards=(block, store.hidden), overwrite=True, compressors=[ZstdCodec(), Crc32cCodec()],
            config={"write_empty_chunks": True},  # every shard exists, so a missing one is damage, not zeros
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
        self._array: zarr.Array | None = None

    @property
    def array(self) -> zarr.Array:
        """The document's array, opened once; refused when it or any of its shard files is missing."""
        if self._array is None:
            with self._checked():
                array = self.store.group[self.row["array"]]
                present = set(self.store.files.list(self.row["array"]))
                missing = [b for b in range(len(self.order.blocks()))
                           if f"{self.row['array']}/{array.metadata.encode_chunk_key((b, 0))}" not in present]
                if missing:
                    raise FileNotFoundError(f"shard {missing[0]} of {len(self.order.blocks())} is missing")
                self._array = array
        return self._array

    @contextmanager
    def _checked(self):
        """Any failure to read the stored bytes (a crc32c mismatch, a missing or truncated file) as one clear error."""
        try:
            yield
        except UserError:
            raise
        except Exception as err:
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise UserError(f"stored document {self.row['doc_id']} in {self.store.path} is damaged ({reason}); "
                            f"{_repair_hint(self.store.path)}, then rerun precompute") from None

    def _get(self, selection) -> np.ndarray:
        with self._checked():
            return self.array[selection]

    def __len__(self) -> int:
        return self.row["n_tokens"]

    @property
    def chunk_size(self) -> int:
        return self.row["chunk_size"]

    def checksum(self) -> str:
        sha = hashlib.sha256()
        for start, stop in self.order.blocks():
            sha.update(np.ascontiguousarray(self._get(slice(start, stop))).tobytes())
        return sha.hexdigest()

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` in token order (reads the blocks that hold them)."""
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for block_start, block_stop in self.order.blocks():
            if block_stop <= start or block_start >= stop:
                continue
            stored = self._get(slice(block_start, block_stop))
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
        array = self.array
        with self._checked():
            return array.get_orthogonal_selection((stored, slice(None)))

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
            stored = self._get(slice(start, start + prefix))
            tokens = start + block_order(length, self.order.chunk_size, self.order.max_level)[:prefix]
            keep = np.argsort(tokens)
            selected = stored[keep]
            parts.append(selected[tokens[keep] < n_rows])
        return np.concatenate(parts) if parts else np.zeros((0, self.store.hidden), dtype=np.float16)


def embedder_fingerprint(embedder) -> str:
    """Identifies the outputs an embedder produces: its config and every tensor it computes with.

    Tensors are hashed as bf16, so that one plug-in has one fingerprint whether it runs in bf16 (a GPU) or fp32 (a
    CPU) -- a store precomputed on a GPU cluster is read on a CPU -- and as stores made before fp32 on CPUs recorded
    it. A config without a row MLP, or with one on the hidden rows, hashes as configs did before either option
    existed, so that stores made then stay readable."""
    defaults_of_old = {"row_mlp": 0, "row_base": "hidden"}
    config = {k: v for k, v in vars(embedder.config).items()
              if k != "trained_steps" and not (k in defaults_of_old and v == defaults_of_old[k])}
    sha = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    tensors = dict(embedder.body.state_dict())
    if embedder.row_mlp is not None:
        tensors.update({f"row_mlp.{name}": t for name, t in embedder.row_mlp.state_dict().items()})
    for name, tensor in sorted(tensors.items()):
        sha.update(name.encode())
        canonical = tensor.detach().cpu().to(torch.bfloat16).contiguous()
        sha.update(canonical.view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def llm_fingerprint(base: dict) -> str:
    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]


def runtime_fingerprints(lm) -> dict[str, str]:
    """What a store records of the runtime whose outputs it holds: its embedder and its LLM."""
    return {"embedder_fingerprint": embedder_fingerprint(lm.embedder),
            "llm_fingerprint": llm_fingerprint(base_fingerprint(lm.llm, lm.tokenizer))}
