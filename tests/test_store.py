"""The Zarr + Parquet store: the level-major row order, the reader, atomic commits and corruption detection."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from extensible import UserError, downscale_chunk, kept_positions
from storage.rows import block_order, prefix_length
from storage import store as store_module
from storage.store import Store

HIDDEN, CHUNK = 8, 64


@pytest.mark.parametrize("n_rows", [256, 200, 64])
def test_the_strided_sample_is_a_prefix_of_every_block(n_rows):
    order = block_order(n_rows, CHUNK, 32)
    assert sorted(order) == list(range(n_rows))
    for k in (1, 2, 4, 8, 16, 32):
        prefix = order[: prefix_length(n_rows, CHUNK, k)]
        assert sorted(prefix) == [r for r in range(n_rows) if (r % CHUNK + 1) % k == 0]


def content_hash(seed):
    return hashlib.sha256(f"text {seed}".encode()).hexdigest()


def write_document(store, n_tokens, seed=0, piece=37):
    rows = np.random.default_rng(seed).normal(size=(n_tokens, HIDDEN)).astype(np.float16)
    writer = store.writer(content_hash(seed), n_tokens)
    for start in range(0, n_tokens, piece):
        writer.append(rows[start : start + piece])
    store.commit([{"doc_id": f"doc{seed}", "source": "test", "content_hash": content_hash(seed), "n_tokens": n_tokens,
                   "chunk_size": CHUNK, "chunk_char_offsets": [0] * -(-n_tokens // CHUNK) + [len(f"text {seed}")], "dtype": "float16", "shape": [n_tokens, HIDDEN],
                   "array": writer.name, "text_path": f"texts/doc{seed}.txt", "checksum": writer.close(),
                   "embedder_fingerprint": "e", "llm_fingerprint": "l"}])
    store.files.write(f"texts/doc{seed}.txt", f"text {seed}".encode())
    return rows


@pytest.fixture
def store(tmp_path):
    return Store.create_or_open(tmp_path / "store", "e", "l", HIDDEN, CHUNK, block_rows=256)


def test_reads_return_what_was_written(store):
    rows = write_document(store, 700)  # 2 full blocks of 256 and a partial one; a partial last chunk
    doc = Store.open(store.path).document("doc0")
    assert np.array_equal(doc.read(), rows) and np.array_equal(doc[100:300], rows[100:300])
    picks = np.array([0, 5, 255, 256, 699, 300])
    assert np.array_equal(doc.take(picks), rows[picks])


@pytest.mark.parametrize("k,method", [(8, "strided"), (32, "strided"), (1, "strided"), (3, "strided"),
                                      (4, "terminal"), (4, "random"), (4, "mean")])
def test_downscaled_reads_equal_downscaling_the_full_array(store, k, method):
    rows = write_document(store, 700)
    doc = store.document("doc0")
    chunks = 700 // CHUNK
    full = torch.from_numpy(rows.astype(np.float32))
    expected = torch.cat([downscale_chunk(full[i * CHUNK : (i + 1) * CHUNK], k, method, 0, i) for i in range(chunks)])
    got = torch.from_numpy(doc.downscaled(chunks, k, method).astype(np.float32))
    assert torch.allclose(got, expected.half().float(), atol=1e-3)
    if method == "strided":
        assert np.array_equal(doc.strided(k, 5), rows[[i * CHUNK + p for i in range(5) for p in kept_positions(CHUNK, k)]])


def test_the_manifest_is_the_commit_point(store):
    write_document(store, 300, seed=1)
    (store.path / ".manifest.parquet.1234.tmp").write_bytes(b"half-written garbage from a killed commit")
    assert Store.open(store.path).manifest().column("doc_id").to_pylist() == ["doc1"]
    store.writer(content_hash(2), 100).append(np.zeros((50, HIDDEN)))  # a killed write: array exists, no manifest row
    assert len(Store.open(store.path)) == 1 and Store.open(store.path).verify() == []


def manifest_row(seed):
    return {"doc_id": f"doc{seed}", "source": "test", "content_hash": content_hash(seed), "n_tokens": 1,
            "chunk_size": CHUNK, "chunk_char_offsets": [0, 1], "dtype": "float16", "shape": [1, HIDDEN],
            "array": f"docs/{seed}", "text_path": f"texts/doc{seed}.txt", "checksum": "x",
            "embedder_fingerprint": "e", "llm_fingerprint": "l"}


def test_commits_append_to_a_journal_that_compacts_geometrically(store, monkeypatch):
    monkeypatch.setattr(store_module, "JOURNAL_MIN", 4)
    reader = Store.open(store.path)  # another reader: it sees every commit, reading only what changed
    generations = []
    for seed in range(20):
        store.commit([manifest_row(seed)])
        generations.append(int(pq.read_schema(store.path / "manifest.parquet").metadata[b"generation"]))
        assert reader.manifest().column("doc_id").to_pylist() == [f"doc{s}" for s in range(seed + 1)]
        assert reader.row(f"doc{seed}")["content_hash"] == content_hash(seed) and len(reader) == seed + 1
        if generations[-1] != generations[0] and generations[-1] != generations[-2]:  # it compacted: the writer
            assert store._cache.base_key == store.files.tag(store_module.MANIFEST)  # keys its cache by what it wrote
    # compactions when the journal holds as many rows as the compacted file (at least 4): after 5, 10 and 20 rows
    assert generations == [0] * 4 + [1] * 5 + [2] * 10 + [3]
    assert [p.name for p in store.path.glob("manifest.*.jsonl")] == ["manifest.2.jsonl"]  # g's stays till g + 2
    assert store.commit([manifest_row(3)]) == [] and len(reader) == 20
    with pytest.raises(TypeError):  # the cache a reader shares is not the caller's to change
        reader.rows_by_id()["doc0"] = manifest_row(99)
    assert reader.row("doc0")["content_hash"] == content_hash(0)


def test_journal_rows_are_the_manifests_rows_and_a_format_1_store_is_read_then_upgraded(store):
    store.group.attrs["format_version"] = 1  # as a store made before the journal
    store = Store.open(store.path)
    store.commit([manifest_row(0)])
    store.commit([{**manifest_row(1), "n_tokens": np.int64(1), "shape": np.array([1, HIDDEN])}])  # numpy values
    rows = Store.open(store.path).manifest().to_pylist()
    assert rows[1]["n_tokens"] == 1 and rows[1]["shape"] == [1, HIDDEN] and rows[0]["created"].tzinfo is not None
    assert Store.open(store.path).attrs["format_version"] == 2


def test_a_torn_journal_line_is_not_committed_and_the_next_commit_cuts_it(store):
    store.commit([manifest_row(0)])
    store.commit([manifest_row(1)])
    journal = store.path / "manifest.0.jsonl"
    intact = journal.read_bytes()
    journal.write_bytes(intact + b'{"doc_id": "doc9", "sou')  # a commit killed mid-write
    assert Store.open(store.path).manifest().column("doc_id").to_pylist() == ["doc0", "doc1"]
    store.commit([manifest_row(2)])
    assert journal.read_bytes().startswith(intact + b'{"doc_id": "doc2"')
    assert Store.open(store.path).manifest().column("doc_id").to_pylist() == ["doc0", "doc1", "doc2"]
    (store.path / "manifest.parquet").unlink()
    with pytest.raises(UserError, match="missing but its journal is there; run: extemb store repair"):
        Store.open(store.path).manifest()


def test_verify_names_a_corrupt_document(store):
    write_document(store, 300, seed=1)
    write_document(store, 300, seed=2)
    assert store.verify() == []
    shard = next(p for p in sorted((store.path / "docs" / content_hash(2)[:32]).rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("doc2:")


def test_another_embedder_never_writes_into_a_store(store):
    # An empty store is not yet pinned: a failed first run must not refuse the corrected rerun.
    assert Store.create_or_open(store.path, "other", "l", HIDDEN, CHUNK).attrs["embedder_fingerprint"] == "other"
    store = Store.create_or_open(store.path, "e", "l", HIDDEN, CHUNK, block_rows=256)
    write_document(store, 100)
    with pytest.raises(UserError, match="another embedder"):
        Store.create_or_open(store.path, "other", "l", HIDDEN, CHUNK)
    with pytest.raises(UserError, match="no store"):
        Store.open(store.path / "missing")


def test_the_embedder_fingerprint_holds_across_precisions_and_covers_the_row_mlp_and_its_base(tiny):
    import copy

    from extensible import EmbedderConfig, ExtensibleEmbedder
    from storage.store import embedder_fingerprint

    llm, tokenizer = tiny
    plain = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16))
    # precomputed in bf16 on a GPU, read in fp32 on a CPU: the same plug-in
    assert embedder_fingerprint(copy.deepcopy(plain).to(torch.bfloat16)) == embedder_fingerprint(plain)
    with_mlp = ExtensibleEmbedder.from_llm(llm, tokenizer, EmbedderConfig(num_layers=2, chunk_size=16, row_mlp=8))
    before = embedder_fingerprint(with_mlp)
    assert before != embedder_fingerprint(plain)
    made_before_row_bases = copy.deepcopy(with_mlp)
    del made_before_row_bases.config.row_base  # a config object as it was before the option existed
    assert embedder_fingerprint(made_before_row_bases) == before  # stores made then stay readable
    on_tokens = copy.deepcopy(with_mlp)
    on_tokens.config.row_base = "token"  # the same tensors, other rows
    assert embedder_fingerprint(on_tokens) != before
    with torch.no_grad():
        with_mlp.row_mlp.down.weight.add_(0.5)  # the same body, other row-MLP weights: other outputs
    assert embedder_fingerprint(with_mlp) != before
