"""The object-store side of storage.files on a real S3 API (moto's server on 127.0.0.1, as `make s3-test` runs it):
the lease, the create-only journal objects and the conditional manifest replace. `make s3-test` runs the jobs."""

import hashlib
import time

import numpy as np
import pytest

from extensible.errors import UserError
from storage import files as storage_files
from storage.files import ObjectFiles, _Lease
from storage.store import Store
from tests.s3_server import Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch, request):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3.url,
                       "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(key, value)
    name = f"test-{request.node.name.replace('_', '-')[:40].lower()}"
    ObjectFiles(f"s3://{name}").s3.create_bucket(Bucket=name)
    return name


def test_a_lease_excludes_a_second_writer_until_it_expires_then_one_taker_wins(bucket, monkeypatch):
    monkeypatch.setattr(storage_files, "LEASE_SECONDS", 1.5)
    first, second = _Lease(ObjectFiles(f"s3://{bucket}/lib")), _Lease(ObjectFiles(f"s3://{bucket}/lib"))
    assert first.acquire(timeout=0)
    time.sleep(2)  # renewed meanwhile: still held
    assert not second.acquire(timeout=0)
    first._stop.set()  # the holder crashes: no more renewals
    first._thread.join()
    assert second.acquire(timeout=5)  # taken over once expired
    assert not first._put(first.tag)  # the crashed holder's ETag no longer matches: it cannot renew
    second.release()
    assert ObjectFiles(f"s3://{bucket}/lib").tag(".lock") is None


def test_a_commit_object_is_created_once_and_the_manifest_replaced_only_if_unchanged(bucket):
    files, other = ObjectFiles(f"s3://{bucket}/lib"), ObjectFiles(f"s3://{bucket}/lib")
    assert files.journal_append(0, 0, b'{"a": 1}\n') and not other.journal_append(0, 0, b'{"b": 2}\n')
    assert files.journal_read(0, 0) == (b'{"a": 1}\n', 1) and files.journal_read(0, 1) == (b"", 1)
    assert files.create("manifest.parquet", b"v1") and not other.create("manifest.parquet", b"v2")
    _, tag = files.read_tagged("manifest.parquet")
    assert files.replace("manifest.parquet", b"v2", tag) == files.tag("manifest.parquet")  # the new version's tag
    assert other.replace("manifest.parquet", b"v3", tag) is None
    assert files.read("manifest.parquet") == b"v2"


def test_a_store_on_s3_commits_compacts_and_reads_back(bucket, monkeypatch):
    import storage.store

    monkeypatch.setattr(storage.store, "JOURNAL_MIN", 2)
    store = Store.create_or_open(f"s3://{bucket}/lib", "e", "l", 8, 16, block_rows=256)
    written = {}
    for seed in range(5):
        rows = np.random.default_rng(seed).normal(size=(300, 8)).astype(np.float16)
        text = f"document {seed}"
        digest = hashlib.sha256(text.encode()).hexdigest()
        writer = store.writer(digest, 300)
        writer.append(rows)
        row = {"doc_id": f"doc{seed}", "source": "test", "content_hash": digest, "n_tokens": 300, "chunk_size": 16,
               "chunk_char_offsets": [0] * 19 + [1], "dtype": "float16", "shape": [300, 8], "array": writer.name,
               "text_path": store.write_text(digest, text), "checksum": writer.close(), "embedder_fingerprint": "e",
               "llm_fingerprint": "l"}
        store.write_record(row)
        assert store.commit([row]) and not store.commit([row])  # once
        written[f"doc{seed}"] = rows
    reader = Store.open(f"s3://{bucket}/lib")
    assert reader.manifest().column("doc_id").to_pylist() == [f"doc{seed}" for seed in range(5)]
    manifest = reader._refresh()  # compacted once (3 rows as generation 1), then two commit objects
    assert (manifest.generation, len(manifest.base_rows), len(manifest.journal_rows)) == (1, 3, 2)
    assert reader.files.journal_generations() == [0, 1]  # the journal of g stays until the next compaction
    for doc_id, rows in written.items():
        assert np.array_equal(reader.document(doc_id).read(), rows)
    assert reader.verify() == []


def test_bad_object_store_urls_are_one_line_errors(bucket):
    with pytest.raises(UserError, match="no filesystem for gs://"):
        Store.open("gs://bucket/x")
    with pytest.raises(UserError, match="the bucket no-such-bucket does not exist"):
        Store.open("s3://no-such-bucket/x")
    with pytest.raises(UserError, match="no store at s3://"):
        Store.open(f"s3://{bucket}/nothing-here")
