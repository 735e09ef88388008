"""Fault injection: every way issue 12 found to lose the library or to serve bad vectors, reproduced and held.

Each case ends done correctly, refused with a one-line error and a non-zero exit, or reported in the summary."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from extensible import UserError
from extensible.plugins import load_extensible
from jobs.cli import main
from pipeline.corpus import content_hash, scan_corpus
from pipeline.precompute import precompute, write_document
from rag.encoders import EmbedderMeanEncoder
from rag.index import PassageIndex, build_index, check_indexes
from storage.files import LocalFiles
from storage.store import Store

from .test_pipeline import text, tiny8  # noqa: F401 -- tiny8 is a fixture
from .test_store import CHUNK, HIDDEN
from .test_store import write_document as write_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    store = Store.create_or_open(tmp_path / "store", "e", "l", HIDDEN, CHUNK, block_rows=256)
    for seed in (1, 2, 3):
        write_rows(store, 600, seed=seed)
    for row in store.manifest().to_pylist():  # as the job's workers do once a document is complete
        store.write_record({key: value for key, value in row.items() if key != "created"})
    return store


def shards(store, doc_id):
    row = store.document(doc_id).row
    return sorted(p for p in (store.path / row["array"] / "c").rglob("*") if p.is_file())


# ---- the store -----------------------------------------------------------------------------------------------------

def test_two_writers_committing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "store"
    Store.create_or_open(path, "e", "l", HIDDEN, CHUNK)
    writer = textwrap.dedent(f"""
        import sys
        from storage.store import Store
        store = Store.open({str(path)!r})
        for i in range(150):
            name = f"{{sys.argv[1]}}{{i}}"
            store.commit([{{"doc_id": name, "source": "race", "content_hash": name, "n_tokens": 1, "chunk_size": 1,
                           "chunk_char_offsets": [0, 1], "dtype": "float16", "shape": [1, 8], "array": "docs/" + name,
                           "text_path": "texts/x", "checksum": "", "embedder_fingerprint": "e",
                           "llm_fingerprint": "l"}}])
    """)
    jobs = [subprocess.Popen([sys.executable, "-c", writer, who], cwd=REPO) for who in "ab"]
    assert [job.wait() for job in jobs] == [0, 0]
    ids = Store.open(path).manifest().column("doc_id").to_pylist()
    assert sorted(ids) == sorted(f"{who}{i}" for who in "ab" for i in range(150))
    assert (path / "manifest.prev.parquet").exists()  # the generation before the last commit
    assert not list(path.glob(".*.tmp"))


def test_two_threads_committing_at_once_lose_nothing(tmp_path, monkeypatch):
    # filelock's per-path singleton is re-entrant across the threads of a process: the store must exclude them itself.
    path = Store.create_or_open(tmp_path / "store", "e", "l", HIDDEN, CHUNK, block_rows=256).path
    append = LocalFiles.journal_append

    def slow_append(self, generation, position, data):  # widens a commit's read-then-write window: a race loses rows
        time.sleep(0.05)
        return append(self, generation, position, data)

    monkeypatch.setattr(LocalFiles, "journal_append", slow_append)
    start = threading.Barrier(2)

    def writer(seeds):
        store = Store.open(path)
        start.wait()
        for seed in seeds:
            write_rows(store, 100, seed=seed)

    with ThreadPoolExecutor(2) as pool:
        for done in [pool.submit(writer, seeds) for seeds in (range(1, 5), range(5, 9))]:
            done.result()  # re-raises a thread's error
    store = Store.open(path)
    assert sorted(store.manifest().column("doc_id").to_pylist()) == sorted(f"doc{seed}" for seed in range(1, 9))
    assert store.verify() == []


def test_a_second_thread_is_refused_or_waits_like_a_second_process(store):
    held, release = threading.Event(), threading.Event()

    def hold():
        with Store.open(store.path).lock():
            held.set()
            release.wait(30)

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold)
        try:
            assert held.wait(30)
            with pytest.raises(UserError, match=f"being written by pid {os.getpid()} .*--wait"):
                with store.lock():
                    pass
            threading.Timer(0.2, release.set).start()
            with store.lock(wait=True):  # --wait: blocks until the other thread lets go
                assert release.is_set()
        finally:
            release.set()
        holder.result()


def test_a_second_writer_is_refused_naming_the_holder_and_commits_never_duplicate(store):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from storage.store import Store
        with Store.open({str(store.path)!r}).lock():
            print("locked", flush=True)
            time.sleep(60)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"being written by pid {holder.pid} .*--wait"):
            with store.lock():
                pass
    finally:
        holder.kill()
        holder.wait()
    row = store.document("doc1").row
    assert store.commit([row, row]) == [] and len(store) == 3  # already listed: not added again


def test_a_flipped_byte_is_an_error_on_read_not_wrong_vectors(store, capsys):
    shard = shards(store, "doc2")[0]
    data = bytearray(shard.read_bytes())
    for i in range(16):
        data[10 + i] ^= 0xFF  # inside the first inner chunk, which every read of this block touches
    shard.write_bytes(bytes(data))
    doc = Store.open(store.path).document("doc2")
    for read in (doc.read, lambda: doc.strided(8), lambda: doc.take(np.arange(0, 600, 7)),
                 lambda: doc.downscaled_chunks({0: 4, 1: 2})):
        with pytest.raises(UserError, match=r"stored document doc2 .* damaged .*extemb store verify .*store repair"):
            read()
    expected = np.random.default_rng(1).normal(size=(600, HIDDEN)).astype(np.float16)  # as write_rows made doc1
    assert np.array_equal(store.document("doc1").read(), expected)  # the sound documents still read
    assert main(["store", "verify", str(store.path)]) == 1
    assert "doc2" in capsys.readouterr().err


def test_a_deleted_shard_is_an_error_not_fill_values(store):
    shards(store, "doc3")[1].unlink()
    with pytest.raises(UserError, match=r"doc3 .*shard 1 of 3 is missing"):
        Store.open(store.path).document("doc3").strided(4)
    problems = store.verify()
    assert len(problems) == 1 and problems[0].startswith("doc3: ") and "missing" in problems[0]
    shard = shards(store, "doc1")[2]
    shard.write_bytes(shard.read_bytes()[:-30])  # a truncated shard: its index (crc32c too) is gone
    with pytest.raises(UserError, match=r"stored document doc1 .* damaged"):
        Store.open(store.path).document("doc1").read(590, 600)
    shutil.rmtree(store.path / store.document("doc2").row["array"])  # a deleted array
    with pytest.raises(UserError, match=r"stored document doc2 .* damaged"):
        Store.open(store.path).document("doc2").read(0, 10)


def test_an_edited_or_deleted_text_is_never_served(store):
    row = store.document("doc1").row
    (store.path / row["text_path"]).write_text("text 1, edited")
    with pytest.raises(UserError, match="text of doc1 .* is not the text that was embedded"):
        store.text(row)
    assert store.verify() == [f"doc1: text {row['text_path']} does not match its content hash (edited or damaged)"]
    (store.path / row["text_path"]).unlink()
    with pytest.raises(UserError, match="text of doc1 .* cannot be read"):
        store.text(row)


def test_a_truncated_manifest_is_rebuilt_by_repair(store, capsys):
    manifest = store.path / "manifest.parquet"
    before = store.manifest().to_pylist()
    manifest.write_bytes(manifest.read_bytes()[:100])
    with pytest.raises(UserError, match="manifest .* is unreadable .*extemb store repair"):
        Store.open(store.path).manifest()
    assert main(["store", "verify", str(store.path)]) == 1
    assert "extemb store repair" in capsys.readouterr().err
    store.writer(content_hash("killed"), 300).append(np.zeros((100, HIDDEN)))  # an orphan: a write never finished
    assert main(["store", "repair", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "manifest rebuilt: 3 documents" in out and "removed 1 orphans" in out
    assert main(["store", "verify", str(store.path)]) == 0
    after = Store.open(store.path).manifest().to_pylist()
    assert [(r["doc_id"], r["checksum"]) for r in after] == [(r["doc_id"], r["checksum"]) for r in before]
    assert np.array_equal(Store.open(store.path).document("doc2").read(), store.document("doc2").read())


def test_repair_drops_duplicates_and_damaged_documents(store, capsys):
    table = store.manifest()
    for journal in store.path.glob("manifest.*.jsonl"):  # every row in the compacted file, one of them twice
        journal.unlink()
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), store.path / "manifest.parquet")
    problems = Store.open(store.path).verify()
    assert any("doc1: listed 2 times; run: extemb store repair" in p for p in problems)
    shards(store, "doc3")[0].write_bytes(b"garbage")
    lines = Store.open(store.path).repair()
    assert "dropped 1 duplicate manifest rows" in lines and any(line.startswith("dropped doc3: ") for line in lines)
    repaired = Store.open(store.path)
    assert repaired.manifest().column("doc_id").to_pylist() == ["doc1", "doc2"] and repaired.verify() == []


def test_a_damaged_index_file_is_a_clear_error_and_verify_names_it(store):
    build_index(store, "embedder-mean", encoder=EmbedderMeanEncoder(), progress=False)
    assert check_indexes(store) == []
    folder = store.path / "index" / "embedder-mean"
    vectors = (folder / "vectors.faiss").read_bytes()
    (folder / "vectors.faiss").write_bytes(vectors[: len(vectors) // 2])
    with pytest.raises(UserError, match="passage index .* is damaged \\(vectors.faiss.*extemb index"):
        PassageIndex.open(store, "embedder-mean")
    flipped = bytearray(vectors)
    flipped[-40] ^= 0xFF  # same size, readable by faiss: only the recorded digest catches it
    (folder / "vectors.faiss").write_bytes(bytes(flipped))
    assert check_indexes(store) == [f"index/embedder-mean/vectors.faiss: its bytes are not the ones written; run: "
                                    f"extemb index {store.path} --encoder embedder-mean"]
    (folder / "passages.parquet").write_bytes(b"PAR1 not really")
    (folder / "meta.json").write_text("{")
    with pytest.raises(UserError, match="damaged \\(meta.json\\)"):
        PassageIndex.open(store, "embedder-mean")


def test_store_paths_that_cannot_be_written_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a store folder"):
        Store.create_or_open(tmp_path / "file", "e", "l", HIDDEN, CHUNK)
    with pytest.raises(UserError, match="no store at"):
        Store.open(tmp_path / "file")


def test_any_chunk_size_gets_a_block_of_whole_chunks_and_inner_chunks(tmp_path):
    store = Store.create_or_open(tmp_path / "store", "e", "l", HIDDEN, 200)  # --chunk 200 failed every document
    assert store.attrs["block_rows"] % 200 == 0 and store.attrs["block_rows"] % 128 == 0
    rows = np.random.default_rng(0).normal(size=(900, HIDDEN)).astype(np.float16)
    writer = store.writer(content_hash("x"), 900)
    writer.append(rows)
    writer.close()


# ---- the corpus scan -----------------------------------------------------------------------------------------------

def test_the_scan_reads_only_regular_files_inside_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text(text(1))
    (tmp_path / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (corpus / "passwd.txt").symlink_to(tmp_path / "secret.txt")
    (corpus / "zero.txt").symlink_to("/dev/zero")
    (corpus / "inside.txt").symlink_to(corpus / "good.txt")  # a link that stays inside is followed
    os.mkfifo(corpus / "pipe.txt")  # opened blocking, this hung the scan forever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(corpus / "socket.md"))
    (corpus / "big.txt").write_text("word " * 1000)
    start = time.monotonic()
    report = scan_corpus(str(corpus), max_bytes=4000)
    assert time.monotonic() - start < 10
    server.close()
    assert [ref.source for ref in report.documents] == [str(corpus / "good.txt")]
    assert sorted(report.problems["outside corpus"]) == [f"{corpus / 'passwd.txt'} -> {tmp_path / 'secret.txt'}",
                                                         f"{corpus / 'zero.txt'} -> /dev/zero"]
    assert report.problems["not a regular file"] == [f"{corpus / 'pipe.txt'} (not a regular file (FIFO))",
                                                     f"{corpus / 'socket.md'} (not a regular file (socket))"]
    assert report.problems["too large"] == [f"{corpus / 'big.txt'} (too large (over --max-bytes 4,000))"]
    assert report.problems["duplicate"] == [f"{corpus / 'good.txt'} (same as {corpus / 'good.txt'})"]  # inside.txt


def test_a_record_whose_text_is_not_a_string_is_reported_and_the_rest_stored(tmp_path):
    lines = [{"text": text(1, 50)}, {"text": 5}, {"text": ["a", "list"]}, "not json", {"text": text(2, 50)}]
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in lines))
    report = scan_corpus(str(tmp_path / "records.jsonl"))
    assert [ref.source for ref in report.documents] == [f"{tmp_path / 'records.jsonl'}:{n}" for n in (0, 4)]
    assert report.problems["bad record"] == [f"{tmp_path / 'records.jsonl'}:1 (text is int, not a string)",
                                             f"{tmp_path / 'records.jsonl'}:2 (text is list, not a string)",
                                             f"{tmp_path / 'records.jsonl'}:3 (JSONDecodeError)"]
    assert report.problems["read in part"] == [f"{tmp_path / 'records.jsonl'}: 2 of 5 records read"]


def test_records_without_the_text_field_name_the_option_to_change(tmp_path):
    (tmp_path / "leval.jsonl").write_text("\n".join(json.dumps({"input": text(i, 30), "instructions": []})
                                                    for i in range(3)))
    with pytest.raises(UserError, match="no record of .* has a 'text' field \\(fields: input, instructions\\); pass "
                                        "--text-column"):
        scan_corpus(str(tmp_path / "leval.jsonl"))
    assert len(scan_corpus(str(tmp_path / "leval.jsonl"), text_column="input").documents) == 3


# ---- the job -------------------------------------------------------------------------------------------------------

def test_the_hash_recorded_is_the_hash_of_the_text_embedded(tiny8, tmp_path):  # noqa: F811
    """A file edited between the scan and its worker is stored under its new hash, with its new text."""
    corpus = tmp_path / "doc.txt"
    corpus.write_text(text(1, 100))
    ref = vars(scan_corpus(str(corpus)).documents[0])
    corpus.write_text(text(2, 100))
    lm = load_extensible(tiny8, chunk_size=16)
    store = Store.create_or_open(tmp_path / "store", "e", "l", lm.hidden_size, 16)
    row = write_document(lm, store, ref)
    assert row["content_hash"] == content_hash(text(2, 100)) != ref["content_hash"]
    assert row["doc_id"] == f"doc-{row['content_hash'][:8]}"
    store.commit([row])
    assert store.text(row) == text(2, 100) and store.verify() == []
    assert scan_corpus(str(corpus)).documents[0].content_hash in store.stored_hashes()  # a rerun skips it


def test_bad_job_arguments_are_refused_up_front(tiny8, tmp_path, capsys):  # noqa: F811
    for bad in (["--workers", "0"], ["--workers", "-1"], ["--chunk", "0"], ["--max-bytes", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(["precompute", "--store", str(tmp_path / "s"), *bad])
        assert exit_.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    with pytest.raises(UserError, match="--workers must be at least 1"):
        precompute(None, str(tmp_path / "s"), workers=0)
    (tmp_path / "file").write_text("x")
    assert main(["precompute", "--corpus", str(tmp_path / "file"), "--store", str(tmp_path / "file"),
                 "--model", tiny8, "--chunk", "16"]) == 2
    assert "is a file, not a store folder" in capsys.readouterr().err
    (tmp_path / "leval.jsonl").write_text(json.dumps({"input": "a long document", "instructions": ["q?"]}))
    assert main(["precompute", "--corpus", str(tmp_path / "leval.jsonl"), "--store", str(tmp_path / "s")]) == 2
    assert "pass --text-column" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main(["generate", str(tmp_path / "file"), "--prompt", "?", "--max-new-tokens", "100000"]) == 2
    assert "--max-new-tokens (100000) must be smaller than --window (1024)" in capsys.readouterr().err


# Documents that crash their worker: "poison" ones kill its process, "broken" ones raise. Injected into the Ray
# workers of a subprocess job through sitecustomize, so the job itself runs unchanged.
FAULTS = '''
import importlib.abc, importlib.util, os, sys

class Faults(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "pipeline.precompute":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module.write_document

            def write_document(lm, store, ref):
                name = os.path.basename(ref["source"])
                if name.startswith("poison"):
                    os._exit(1)
                if name.startswith("broken"):
                    raise RuntimeError("this document cannot be embedded")
                return real(lm, store, ref)
            module.write_document = write_document
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Faults())
'''


def job(tmp_path, corpus, store, *args, faults=True, **popen):
    hooks = tmp_path / "faults"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(FAULTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks)] * faults + [str(REPO)])}
    cmd = [sys.executable, "-m", "jobs.precompute", "--corpus", str(corpus), "--store", str(store), "--threads", "1",
           "--index", "none", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_a_poison_document_is_reported_failed_under_bounded_retries(tiny8, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed, name in enumerate(("good1", "poison", "broken", "good2")):
        (corpus / f"{name}.txt").write_text(text(seed, 150))
    run = job(tmp_path, corpus, tmp_path / "store", "--model", tiny8, "--chunk", "16")
    out, err = run.communicate(timeout=400)
    assert run.returncode == 1, err[-2000:]
    assert "stored 2 documents" in out, out + err[-3000:]
    summary = out[out.index("stored 2 documents") :]  # Ray prints its worker-death notices before, never inside
    assert "raylet" not in summary and "Traceback" not in summary and "Error:" not in summary.split("failed: 2")[0]
    failed = summary.split("failed: 2\n")[1].splitlines()[:2]
    assert sorted(failed) == sorted([f"  {corpus / 'broken.txt'}: RuntimeError: this document cannot be embedded",
                                     f"  {corpus / 'poison.txt'}: its worker died 2 times while embedding it "
                                     "(a crash or out of memory)"])
    store = Store.open(tmp_path / "store")
    assert sorted(Path(s).stem for s in store.manifest().column("source").to_pylist()) == ["good1", "good2"]
    assert store.verify() == []


def test_a_job_where_every_document_failed_exits_1_and_pins_nothing(tiny8, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        (corpus / f"broken{i}.txt").write_text(text(i, 100))
    run = job(tmp_path, corpus, tmp_path / "store", "--model", tiny8, "--chunk", "32")
    out, err = run.communicate(timeout=400)
    assert run.returncode == 1 and "stored 0 documents" in out and "failed: 2" in out, err[-2000:]
    # The corrected rerun (another chunk: another embedder fingerprint) is not refused by the failed first run.
    summary = precompute(str(corpus), str(tmp_path / "store"), model=tiny8, chunk_size=16, progress=False)
    assert summary.stored == 2 and "failed" not in summary.problems
    assert Store.open(tmp_path / "store").chunk_size == 16


def test_two_jobs_on_one_store_store_each_document_once(tiny8, tmp_path):  # noqa: F811
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(text(i, 300))
    store = tmp_path / "store"
    first = job(tmp_path, corpus, store, "--model", tiny8, "--chunk", "16", "--commit-every", "1", faults=False)
    deadline = time.monotonic() + 300
    while not (store / ".lock.holder").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    waiting = job(tmp_path, corpus, store, "--model", tiny8, "--chunk", "16", "--wait", faults=False)
    refused = job(tmp_path, corpus, store, "--model", tiny8, "--chunk", "16", faults=False)
    out, err = refused.communicate(timeout=300)
    if first.poll() is None:  # only meaningful while the first one still writes
        last = err.strip().splitlines()[-1]
        assert refused.returncode == 2 and "Traceback" not in err, err[-2000:]
        assert last.startswith("precompute: error: the store") and f"being written by pid {first.pid}" in last
    assert first.wait(timeout=400) == 0
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and "skipped 4 already stored" in out, err[-2000:]
    hashes = Store.open(store).manifest().column("content_hash").to_pylist()
    assert len(hashes) == len(set(hashes)) == 4


@pytest.fixture
def read_only(tmp_path):
    """Makes folders read-only even for root (the immutable flag), undone after the test."""
    frozen = []

    def freeze(folder):
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("chattr +i is not available here")
        frozen.append(folder)

    yield freeze
    for folder in frozen:
        subprocess.run(["chattr", "-i", str(folder)])


def test_a_read_only_store_or_folder_is_a_one_line_error(store, tmp_path, read_only, tiny8, capsys):  # noqa: F811
    parent = tmp_path / "readonly"
    parent.mkdir()
    read_only(parent)
    read_only(store.path)
    (tmp_path / "doc.txt").write_text(text(1, 100))
    for argv in (["precompute", "--corpus", str(tmp_path / "doc.txt"), "--store", str(parent / "store"),
                  "--model", tiny8, "--chunk", "16"],
                 ["index", str(store.path), "--encoder", "embedder-mean"],
                 ["store", "repair", str(store.path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("extemb: error: ") and ("read-only" in err or
                                                                              "cannot create the store" in err), err
    assert main(["store", "verify", str(store.path)]) == 0  # reading needs no write access
