"""The passage index beside a store: a faiss inner-product index plus a Parquet table of what each vector is.

Folder ``<store>/index/<encoder>/``::

    vectors.faiss     faiss.write_index of an exact inner-product index (vectors are L2-normalised: cosine); from
                      ``GRAPH_FROM`` passages an HNSW graph over the same vectors instead, whose search cost grows
                      with log N rather than N (approximate: it may miss a passage the exact index ranks in the top)
    passages.parquet  one row per vector: doc_id, content_hash, chunk, char_start, char_end
    meta.json         encoder, dimension, and the digest of the store's documents it covers

No pickle anywhere. A build runs under the store's lock and writes meta.json last, with the size and sha256 of each
file: a killed build leaves an index that is refused as damaged or stale, never read as current, and a rebuild fixes
it. An index whose digest differs from the store's current documents is stale and is refused. The files are read and
written through the store's files (``storage.files``), so an index beside an ``s3://`` store lives in the bucket.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from extensible.errors import UserError
from storage.store import Store

from .encoders import ENCODERS, EmbedderMeanEncoder, MiniLMEncoder

INDEX_DIR = "index"
GRAPH_FROM = 50_000  # passages from which the index is an HNSW graph (an exact search there takes milliseconds)
GRAPH_NEIGHBOURS, GRAPH_SEARCH_DEPTH = 32, 64  # HNSW's M and efSearch


def make_faiss_index(matrix: np.ndarray):
    """An exact inner-product index of ``matrix``, or an HNSW graph of it from ``GRAPH_FROM`` rows."""
    if len(matrix) < GRAPH_FROM:
        index = faiss.IndexFlatIP(matrix.shape[1])
    else:
        index = faiss.IndexHNSWFlat(matrix.shape[1], GRAPH_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 2 * GRAPH_NEIGHBOURS
    index.add(matrix)
    return index


def store_digest(store: Store) -> str:
    """Identifies the set of documents in a store (order-free)."""
    return hashlib.sha256("\n".join(sorted(store.stored_hashes())).encode()).hexdigest()[:16]


def index_folder(encoder: str) -> str:
    """The index's folder, relative to the store's root."""
    return f"{INDEX_DIR}/{encoder}"


def index_meta(store: Store, encoder: str) -> dict | None:
    """The index's meta.json, or None when there is no index."""
    data, tag = store.files.read_tagged(f"{index_folder(encoder)}/meta.json")
    if tag is None:
        return None
    try:
        meta = json.loads(data)
        meta["store_digest"], meta["documents"], meta["passages"]  # noqa: B018 -- the fields every reader needs
        return meta
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"the {encoder} passage index of {store.path} is damaged (meta.json); "
                        f"run: extemb index {store.path} --encoder {encoder}") from None


def check_indexes(store: Store) -> list[str]:
    """Problems with the passage indexes beside a store: every file readable, sizes agreeing, current."""
    problems = []
    built = {name.split("/")[1] for name in store.files.list(INDEX_DIR) if name.count("/") == 2}
    for encoder in sorted(built & set(ENCODERS)):
        try:
            PassageIndex.open(store, encoder)
            folder, meta = index_folder(encoder), index_meta(store, encoder)
            problems += [f"index/{encoder}/{name}: its bytes are not the ones written; run: extemb index {store.path} "
                         f"--encoder {encoder}" for name, file in meta.get("files", {}).items()
                         if hashlib.sha256(store.files.read(f"{folder}/{name}")).hexdigest() != file["sha256"]]
        except UserError as err:
            problems.append(f"index/{encoder}: {err}")
    return problems


def index_is_current(store: Store, encoder: str) -> bool:
    """An index exists and covers exactly the store's documents."""
    meta = index_meta(store, encoder)
    return meta is not None and meta["store_digest"] == store_digest(store)


def make_encoder(name: str, lm=None):
    """An encoder by name; ``embedder-mean`` needs ``lm`` only to embed questions (indexing reads stored outputs)."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return MiniLMEncoder() if name == "minilm" else EmbedderMeanEncoder(lm)


def build_index(store: Store, encoder_name: str = "minilm", encoder=None, progress: bool = True) -> str:
    """Encodes every passage of the store and writes the index, meta.json last; returns where it is."""
    documents = store.documents()
    if not documents:
        raise UserError(f"the store {store.path} is empty; run: make precompute STORE={store.path}")
    with store.lock():  # one index build at a time, and never while a job writes the store
        return _build(store, documents, encoder_name, encoder or make_encoder(encoder_name), progress)


def _build(store: Store, documents: list, encoder_name: str, encoder, progress: bool) -> str:
    rows, vectors = [], []
    for document in tqdm(documents, desc=f"indexing passages ({encoder_name})", unit="doc", disable=not progress):
        offsets = document.row["chunk_char_offsets"]
        if encoder_name == "minilm":
            text = store.text(document.row)
            chunks, spans = encoder.passages(text, offsets)
            vectors.append(encoder.encode([text[a:b] for a, b in spans]))
        else:
            chunks = list(range(document.num_chunks))
            spans = list(zip(offsets[:-1], offsets[1:]))
            vectors.append(encoder.chunk_vectors(document))
        rows += [{"doc_id": document.row["doc_id"], "content_hash": document.row["content_hash"], "chunk": chunk,
                  "char_start": start, "char_end": stop} for chunk, (start, stop) in zip(chunks, spans)]
    matrix = np.concatenate(vectors).astype(np.float32)
    index = make_faiss_index(matrix)

    folder = index_folder(encoder_name)
    store.files.delete(f"{folder}/meta.json")  # from here until the new one is written, there is no index
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    contents = {"vectors.faiss": faiss.serialize_index(index).tobytes(), "passages.parquet": sink.getvalue().to_pybytes()}
    for name, data in contents.items():
        store.files.write(f"{folder}/{name}", data)
    files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()}
    store.files.write(f"{folder}/meta.json", json.dumps({
        "encoder": encoder_name, "kind": "hnsw" if isinstance(index, faiss.IndexHNSW) else "exact",
        "dimension": int(matrix.shape[1]), "passages": len(rows), "files": files,
        "documents": len(documents), "store_digest": store_digest(store), "created": time.time(),
    }, indent=2).encode())
    return f"{store.path}/{folder}"


def chunk_relevance(chunks: list[int], vectors: np.ndarray, query: np.ndarray) -> dict[int, float]:
    """chunk -> the best cosine of its passages to the query (all vectors normalised)."""
    scores = np.asarray(vectors, dtype=np.float32) @ np.asarray(query, dtype=np.float32)
    best: dict[int, float] = {}
    for chunk, score in zip(chunks, scores.tolist()):
        best[chunk] = max(best.get(chunk, -np.inf), score)
    return best


@dataclass
class Hit:
    doc_id: str
    content_hash: str
    chunk: int
    char_start: int
    char_end: int
    score: float


class PassageIndex:
    def __init__(self, store: Store, encoder_name: str, index, passages: list[dict], meta: dict):
        self.store, self.encoder_name, self.index, self.passages, self.meta = store, encoder_name, index, passages, meta
        self._rows_of: dict[str, tuple[int, int]] | None = None  # doc_id -> (first passage row, passages)

    @classmethod
    def open(cls, store: Store, encoder_name: str = "minilm") -> PassageIndex:
        folder = index_folder(encoder_name)
        hint = f"run: extemb index {store.path} --encoder {encoder_name}"
        meta = index_meta(store, encoder_name)
        if meta is None:
            raise UserError(f"no {encoder_name} passage index in {store.path}; {hint}")
        if not index_is_current(store, encoder_name):
            raise UserError(f"the {encoder_name} passage index of {store.path} is stale (built for "
                            f"{meta['documents']} documents, the store now holds {len(store)}); {hint}")
        def read(name: str, reader):
            try:
                data = store.files.read(f"{folder}/{name}")
                if name in meta.get("files", {}) and len(data) != meta["files"][name]["bytes"]:
                    raise ValueError("its size differs from the one written")
                return reader(data)
            except Exception as err:  # faiss raises RuntimeError, pyarrow ArrowInvalid, a missing file OSError
                raise UserError(f"the {encoder_name} passage index of {store.path} is damaged ({name}: "
                                f"{str(err).splitlines()[0][:80] or type(err).__name__}); {hint}") from None

        index = read("vectors.faiss", lambda data: faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))
        passages = read("passages.parquet", lambda data: pq.read_table(pa.BufferReader(data)).to_pylist())
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = GRAPH_SEARCH_DEPTH
        elif hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:  # faiss-gpu: exact search on the GPU
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        if index.ntotal != len(passages) or len(passages) != meta["passages"]:
            raise UserError(f"the {encoder_name} passage index of {store.path} is damaged "
                            f"({index.ntotal} vectors, {len(passages)} passages); {hint}")
        return cls(store, encoder_name, index, passages, meta)

    def chunk_scores(self, vector: np.ndarray, doc_id: str) -> dict[int, float]:
        """Relevance of every chunk of one document to a normalised query vector (its best passage's score)."""
        if self._rows_of is None:
            self._rows_of = {}
            for i, passage in enumerate(self.passages):  # a document's passages are contiguous (built doc by doc)
                first, count = self._rows_of.get(passage["doc_id"], (i, 0))
                self._rows_of[passage["doc_id"]] = (first, count + 1)
        first, count = self._rows_of.get(doc_id, (0, 0))
        vectors = self.index.reconstruct_n(first, count) if count else np.zeros((0, len(vector)), np.float32)
        return chunk_relevance([p["chunk"] for p in self.passages[first : first + count]], vectors, vector)

    def search(self, vector: np.ndarray, top: int = 10) -> list[Hit]:
        """The ``top`` passages nearest to one normalised query vector, best first."""
        scores, ids = self.index.search(np.asarray(vector, dtype=np.float32).reshape(1, -1), min(top, self.index.ntotal))
        return [Hit(**self.passages[i], score=float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
