"""The Ray precompute job on a tiny random Llama: bad inputs reported, idempotent reruns, resume after kill -9."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from extensible import UserError
from extensible.plugins import load_extensible
from jobs.cli import main
from pipeline.corpus import scan_corpus
from pipeline.precompute import precompute
from storage.store import Store

from .conftest import save_tiny

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def text(seed, words=400):
    return " ".join(np.random.default_rng(seed).choice(WORDS, words)) + "\n"


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """A tiny Llama with 8 layers, so the default 8-layer embedder fits it."""
    return str(save_tiny(tmp_path_factory.mktemp("tiny8"), layers=8))


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(text(i))
    (folder / "copy_of_doc0.txt").write_text(text(0))
    (folder / "empty.txt").write_text("\n\n")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "image.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "records.jsonl").write_text("\n".join(json.dumps({"text": text(10 + i, 100)}) for i in range(2)))
    return folder


def test_scan_reports_every_unusable_file(corpus):
    report = scan_corpus(str(corpus))
    assert len(report.documents) == 5  # doc0..2 and two records
    assert set(report.problems) == {"duplicate", "empty", "non-UTF-8", "binary"}
    assert "copy_of_doc0.txt" in report.problems["duplicate"][0]
    assert len({ref.doc_id for ref in report.documents}) == 5


def test_precompute_stores_reads_back_and_reruns_idempotently(corpus, tiny8, tmp_path):
    store_path = tmp_path / "store"
    summary = precompute(str(corpus), str(store_path), model=tiny8, chunk_size=16, progress=False)
    assert summary.stored == 5 and summary.tokens > 2000 and summary.bytes_written > 0
    assert set(summary.problems) == {"duplicate", "empty", "non-UTF-8", "binary"}
    store = Store.open(store_path)
    assert store.verify() == [] and len(store) == 5

    # The stored rows are the embedder's full-resolution outputs (float16).
    lm = load_extensible(tiny8, chunk_size=16)
    document = next(d for d in store.documents() if d.row["source"].endswith("doc1.txt"))
    ids = torch.tensor(lm.tokenizer(store.text(document.row), add_special_tokens=False)["input_ids"])
    expected = lm.encode(ids).float().numpy()
    assert np.allclose(document.read().astype(np.float32), expected, atol=2e-2)
    offsets = document.row["chunk_char_offsets"]
    assert offsets[0] == 0 and offsets[-1] == len(store.text(document.row)) and len(offsets) == -(-len(ids) // 16) + 1
    # Offline mode from the store gives the same scores as from the in-memory outputs.
    lm.window = 96
    prefix = ids[:300]
    assert torch.allclose(lm.score(prefix, 40, 4, full=document).token_nll,
                          lm.score(prefix, 40, 4, full=torch.from_numpy(document.read())).token_nll, atol=1e-5)
    lm.embedder.config.chunk_size = 32
    with pytest.raises(UserError, match="16-token chunks, this runtime uses 32"):
        lm.score(prefix, 40, 4, full=document)

    again = precompute(str(corpus), str(store_path), model=tiny8, chunk_size=16, progress=False)
    assert again.stored == 0 and again.already_stored == 5 and len(Store.open(store_path)) == 5


def test_a_killed_job_resumes_without_duplicates(corpus, tiny8, tmp_path):
    for i in range(3, 40):
        (corpus / f"doc{i}.txt").write_text(text(i, 2000))
    store_path = tmp_path / "store"
    cmd = [sys.executable, "-m", "jobs.precompute", "--corpus", str(corpus), "--store", str(store_path),
           "--model", tiny8, "--chunk", "16", "--threads", "1", "--commit-every", "1"]
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        if (store_path / "manifest.parquet").exists():
            break
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-job
    job.wait()
    partial = len(Store.open(store_path))
    assert 1 <= partial < 42, "killed halfway"
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    store = Store.open(store_path)
    assert store.verify() == []
    hashes = store.manifest().column("content_hash").to_pylist()
    assert len(hashes) == len(set(hashes)) == 42


def test_cli_store_verify_names_the_corrupt_document(corpus, tiny8, tmp_path, capsys):
    store_path = tmp_path / "store"
    precompute(str(corpus), str(store_path), model=tiny8, chunk_size=16, progress=False)
    assert main(["store", "verify", str(store_path)]) == 0
    row = Store.open(store_path).manifest().to_pylist()[2]
    shard = next(p for p in (store_path / row["array"] / "c").rglob("*") if p.is_file())
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    assert main(["store", "verify", str(store_path)]) == 1
    assert row["doc_id"] in capsys.readouterr().err
    assert main(["store", "info", str(store_path)]) == 0


def test_bad_corpora_are_clear_errors(tiny8, tmp_path, capsys):
    assert main(["precompute", "--corpus", str(tmp_path / "nothing*"), "--store", str(tmp_path / "s"),
                 "--model", tiny8, "--chunk", "16"]) == 2
    assert "no files match" in capsys.readouterr().err


def test_gpu_actors_are_checked_against_the_cluster(corpus, tiny8, tmp_path):
    """--gpus-per-worker puts num_gpus on the actors; a CPU-only cluster is refused up front instead of waiting for
    GPUs forever (no GPU here: the CUDA path itself is not run by this suite)."""
    with pytest.raises(UserError, match=r"--workers 2 x --gpus-per-worker 64 needs 128 GPUs; the Ray cluster has"):
        precompute(str(corpus), str(tmp_path / "store"), model=tiny8, chunk_size=16, workers=2, gpus_per_worker=64,
                   progress=False)
    with pytest.raises(UserError, match="--gpus-per-worker must be 0 or more"):
        precompute(str(corpus), str(tmp_path / "store"), model=tiny8, chunk_size=16, gpus_per_worker=-1)


# ---- packaging -----------------------------------------------------------------------------------------------------

def test_every_documented_install_gets_exactly_one_faiss():
    # faiss-cpu and faiss-gpu-cu12 both own the `faiss` module: installed side by side, one overwrites the other.
    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]

    def faiss(extras):
        requirements = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
        return {name for r in requirements if (name := re.match(r"[\w.-]+", r).group().lower()).startswith("faiss")}

    setup = re.search(r'pip install .*-e "\.\[([\w,]*)\]"', (repo / "Makefile").read_text()).group(1).split(",")
    assert faiss([]) == set()  # only an extra brings faiss, so an install chooses its build
    assert faiss(setup) == {"faiss-cpu"}  # make setup, on the CPU machines
    assert faiss(["gpu"]) == faiss(["gpu", "dev"]) == {"faiss-gpu-cu12"}  # GPU machines
    installed = {name for d in metadata.distributions() if (name := d.metadata["Name"].lower()).startswith("faiss")}
    assert len(installed) == 1, installed  # this environment too
