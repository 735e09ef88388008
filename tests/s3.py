"""make s3-test: the store on a real S3 API -- moto's server (tests/s3_server.py) on 127.0.0.1, in its own process,
stopped by its PID -- through the same commands a user runs, with the credentials and endpoint in AWS_* variables.

Steps: precompute a small corpus to s3:// (the rows equal a local store's), rerun (nothing added), ask, verify; two
concurrent jobs (one refused or both safe, each document once); kill -9 of a job mid-way, then a rerun with --wait
after the dead holder's lease expires (nothing lost or duplicated); a flipped byte in a shard object (refused on read);
repair after a deleted manifest; bad input (a missing bucket, no credentials, an endpoint that does not answer, a
scheme no filesystem handles, a service without conditional writes: one line each, exit 2, nothing written). It
prints each step's wall time and what a read at k=64 costs: bytes and requests against the document's whole size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.cluster import Phases, check, corpus, rows
from tests.s3_server import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUCKET = "library"
LEASE_SECONDS = 8  # leases renew this fast here (60 s by default)
VICTIM_LEASE_SECONDS = 60  # the killed job's lease outlives the next job's start-up (10-30 s on a slow CI machine)
TIMEOUT = float(os.environ.get("S3_TEST_TIMEOUT", 600))


def run(cmd: list[str], env: dict, expect: int = 0, timeout: float = 300) -> str:
    """Runs one of the project's commands; checks its exit code; returns stdout and stderr together."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    print(f"$ {' '.join(cmd[2:] if cmd[0] == PY else cmd)}  ({time.perf_counter() - start:.1f} s, exit "
          f"{done.returncode})\n{done.stdout.rstrip()}", flush=True)
    check(done.returncode == expect, f"exit {done.returncode}, expected {expect}:\n{output[-3000:]}")
    return output


def one_line_error(output: str, words: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith(("extemb: error: ", "precompute: error: "))]
    check(len(errors) == 1 and words in errors[0], f"expected one line naming {words!r}, got:\n{output[-2000:]}")


def bucket_keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def main() -> int:
    phase = Phases()

    def too_long(*_):
        raise TimeoutError(f"the s3 test ran past its {TIMEOUT:.0f} s limit (S3_TEST_TIMEOUT) during: {phase.current}")

    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(int(TIMEOUT))
    work = Path(tempfile.mkdtemp(prefix="extemb-s3-"))
    phase("S3 server start")
    server = Server(work)
    servers = [server]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.url, "RAY_USAGE_STATS_ENABLED": "0",
           "EXTEMB_LEASE_SECONDS": str(LEASE_SECONDS), "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    env.pop("RAY_ADDRESS", None)
    os.environ.update({key: env[key] for key in env if key.startswith("AWS_") or key.startswith("EXTEMB_")})
    passed = False
    try:
        import boto3

        from tests.conftest import save_tiny

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        model = str(save_tiny(work / "model", layers=8))
        docs = corpus(work / "corpus", 8, 300)
        store = f"s3://{BUCKET}/books"
        job = [PY, "-m", "jobs.precompute", "--model", model, "--chunk", "16", "--threads", "1"]
        extemb = [PY, "-m", "jobs.cli"]

        phase("precompute to s3://")
        output = run([*job, "--corpus", str(docs), "--store", store, "--index", "minilm"], env)
        check("stored 8 documents" in output, "the first job did not store the 8 documents")
        run([*job, "--corpus", str(docs), "--store", str(work / "local"), "--index", "none"], env)
        check(rows(store) == rows(work / "local"), "the s3:// store's rows differ from a local store's")

        phase("rerun: nothing added")
        output = run([*job, "--corpus", str(docs), "--store", store], env)
        check("stored 0 documents" in output and "skipped 8 already stored" in output, "a rerun added documents")

        phase("ask")
        output = run([*extemb, "ask", "--store", store, "--model", model, "--window", "256", "--max-new-tokens",
                      "4", "--json", "what is alpha beta?"], env)
        answer = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
        check(answer["sources"], "the answer names no sources")

        phase("verify")
        output = run([*extemb, "store", "verify", store], env)
        check("8 documents, 0 problems" in output, "verify found problems")

        phase("two concurrent jobs")
        more = corpus(work / "more", 6, 300, offset=50)
        both = [subprocess.Popen([*job, "--corpus", str(more), "--store", store, "--index", "none"], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in both]
        codes = [p.returncode for p in both]
        print(f"two jobs at once: exits {codes}", flush=True)
        check(sorted(codes) in ([0, 0], [0, 2]), f"exits {codes}:\n{outputs[0][-1500:]}\n{outputs[1][-1500:]}")
        if 2 in codes:
            one_line_error(outputs[codes.index(2)], "is being written by pid")
        check(len(rows(store)) == 14, f"each document once: {len(rows(store))} stored, 14 expected")

        phase("kill -9 mid-job, then resume")
        killed = corpus(work / "killed", 10, 1500, offset=100)
        from storage.store import Store

        victim_env = {**env, "EXTEMB_LEASE_SECONDS": str(VICTIM_LEASE_SECONDS)}
        victim = subprocess.Popen([*job, "--corpus", str(killed), "--store", store, "--index", "none",
                                   "--commit-every", "1"], env=victim_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 240
        while len(Store.open(store)) < 15:  # at least one of its documents committed
            check(victim.poll() is None, "the job ended before it could be killed")
            check(time.monotonic() < deadline, "the job committed nothing in 240 s")
            time.sleep(0.3)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        before = len(Store.open(store))
        expires = json.loads(client.get_object(Bucket=BUCKET, Key="books/.lock")["Body"].read())["expires"]
        print(f"killed with {before - 14} of 10 documents committed; its lease is left behind, "
              f"{expires - time.time():.0f} s to go", flush=True)
        output = run([*job, "--corpus", str(killed), "--store", store, "--index", "none"], env, expect=2)
        one_line_error(output, "is being written by pid")
        output = run([*job, "--corpus", str(killed), "--store", store, "--index", "minilm", "--wait"], env)
        check(len(rows(store)) == 24, f"after the resume: {len(rows(store))} documents, 24 expected")
        check(f"stored {24 - before} documents" in output, "the resume did not store exactly what was missing")
        run([*extemb, "store", "verify", store], env)

        phase("a flipped byte in a shard")
        row = Store.open(store).manifest().to_pylist()[0]
        shard = next(key for key in bucket_keys(client, f"books/{row['array']}/c/"))
        original = client.get_object(Bucket=BUCKET, Key=shard)["Body"].read()
        flipped = bytearray(original)
        flipped[len(flipped) // 3] ^= 0xFF
        client.put_object(Bucket=BUCKET, Key=shard, Body=bytes(flipped))
        output = run([*extemb, "store", "verify", store], env, expect=1)
        check(f"{row['doc_id']}: " in output, "verify did not name the damaged document")
        from extensible.errors import UserError

        try:
            Store.open(store).document(row["doc_id"]).read()
            check(False, "a flipped byte was read as vectors")
        except UserError as err:
            check("is damaged" in str(err), f"unexpected error: {err}")
        client.put_object(Bucket=BUCKET, Key=shard, Body=original)

        phase("repair after a deleted manifest")
        client.delete_object(Bucket=BUCKET, Key="books/manifest.parquet")
        output = run([*extemb, "store", "verify", store], env, expect=1)
        check("repair" in output, "verify did not point at repair")
        output = run([*extemb, "store", "repair", store], env)
        check("manifest rebuilt: 24 documents" in output, "repair did not rebuild the 24 documents")
        run([*extemb, "store", "verify", store], env)

        phase("bad input")
        one_line_error(run([*extemb, "store", "verify", "s3://no-such-bucket/x"], env, expect=2), "does not exist")
        no_keys = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        one_line_error(run([*extemb, "store", "verify", store], no_keys, expect=2), "no credentials")
        one_line_error(run([*extemb, "store", "verify", store], {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:"
                                                                  f"{free_port()}"}, expect=2), "does not answer")
        one_line_error(run([*extemb, "store", "verify", "gs://bucket/x"], env, expect=2), "no filesystem for gs://")
        careless = Server(work, "--no-conditional-writes")
        servers.append(careless)
        boto3.client("s3", endpoint_url=careless.url).create_bucket(Bucket=BUCKET)
        output = run([*job, "--corpus", str(docs), "--store", store, "--index", "none"],
                     {**env, "AWS_ENDPOINT_URL": careless.url}, expect=2)
        one_line_error(output, "ignores conditional writes")
        check(bucket_keys(boto3.client("s3", endpoint_url=careless.url)) == [],
              "something was written to a service without conditional writes")

        phase("bytes a read at k=64 takes")
        # SmolLM2's shape (hidden 576, 256-token chunks), random rows: what a read costs, not what the rows mean
        tokens, hidden, chunk = 16_384, 576, 256
        rows_written = np.random.default_rng(0).normal(size=(tokens, hidden)).astype(np.float16)
        shaped = Store.create_or_open(f"s3://{BUCKET}/shaped", "e", "l", hidden, chunk)
        writer = shaped.writer("f" * 64, tokens)
        writer.append(rows_written)
        shaped.commit([{"doc_id": "long", "source": "random", "content_hash": "f" * 64, "n_tokens": tokens,
                        "chunk_size": chunk, "chunk_char_offsets": list(range(tokens // chunk + 1)),
                        "dtype": "float16", "shape": [tokens, hidden], "array": writer.name,
                        "text_path": shaped.write_text("f" * 64, "x"), "checksum": writer.close(),
                        "embedder_fingerprint": "e", "llm_fingerprint": "l"}])
        document = Store.open(f"s3://{BUCKET}/shaped").document("long")
        document.array  # noqa: B018 -- opened (its metadata, the list of shards) before counting
        whole = shaped.files.size(writer.name)
        server.counts(reset=True)
        sampled = document.strided(64)
        at_64 = server.counts(reset=True)
        check(np.array_equal(sampled, rows_written.reshape(-1, chunk, hidden)[:, 63::64].reshape(-1, hidden)),
              "the k=64 sample is not the strided rows written")
        check(np.array_equal(document.read(), rows_written), "the whole document read back differs")
        full = server.counts()
        print(f"a read at k=64 of a {tokens:,}-token document ({len(sampled)} of its rows): "
              f"{at_64['bytes_read']:,} bytes in {at_64['object_gets']} GETs ({at_64['ranged_gets']} ranged), "
              f"{at_64['bytes_read'] / whole:.1%} of its {whole:,} stored bytes; reading it whole: "
              f"{full['bytes_read']:,} bytes in {full['object_gets']} GETs ({full['ranged_gets']} ranged)", flush=True)
        check(at_64["bytes_read"] < whole / 8, "a read at k=64 read an eighth of the document or more")
        passed = True
    finally:
        print(phase.report(), flush=True)
        for running in servers:
            running.stop()
        print(f"s3-test: {'1 passed, 0 failed' if passed else '0 passed, 1 failed'}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
