"""make cluster-test: the precompute job on a real two-node Ray cluster, every process and packet on 127.0.0.1.

Run inside a fresh network namespace (the Makefile's `unshare --net`) whose only interface is lo: Ray 2.60 rewrites
127.0.0.1 to the machine's interface address for `--node-ip-address` and `--address` (services.
resolve_ip_for_localhost) and offers no setting that keeps a worker node on loopback, so the namespace is what keeps
the traffic there; the checks below assert it. A head and a worker node are started as separate `ray start --block`
processes with one CPU each (an embedder actor takes one CPU, so two actors must land on both nodes), with token
authentication through RAY_AUTH_TOKEN_PATH, and stopped by the process sessions this script started (never
`ray stop`). Steps: a one-node run through RAY_ADDRESS, the worker node joins, a two-node run through `make
precompute`, one into an s3:// bucket on moto's S3 server on 127.0.0.1 (both nodes' actors write the bucket) and one
through `ray job submit --working-dir .` (every store must equal the one-node store), a store on
a path only the driver can see (refused up front), then the worker node is killed mid-job and a rerun completes the
store with every document exactly once. Each step's wall time is printed at the end; past CLUSTER_TEST_TIMEOUT
seconds the test stops, naming the step.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from tests.s3_server import Server


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
LOOPBACK = "127.0.0.1"
# Not uploaded by `ray job submit --working-dir .` (.gitignore'd paths such as .venv/ and out/ never are): the training
# runs' checkpoints and the git history, 92 + 139 MiB that the job does not read.
EXCLUDES = '{"excludes": ["/runs/", "/.git/"]}'
TIMEOUT = float(os.environ.get("CLUSTER_TEST_TIMEOUT", 420))  # the whole test, start to cleanup (the goal: 180 s)
DOCS, LOST_DOCS = 8, 16  # documents of the equality runs (~1,700 tokens each) and of the node-loss run (~8,300 each)


def check(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class Timeout(BaseException):
    """Not an Exception: no `except Exception` on the way (a start-up poll, Ray's own code) swallows it."""


class Phases:
    """Wall time of each step, printed at the end (pass or fail); SIGALRM ends the test past TIMEOUT, naming the
    step it was in, instead of leaving it hanging."""

    def __init__(self):
        self.start, self.times, self.current = time.perf_counter(), [], "start"

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times.append((self.current, now - getattr(self, "_since", self.start)))
        self.current, self._since = name, now

    def left(self) -> float:
        return max(1.0, TIMEOUT - (time.perf_counter() - self.start))

    def timeout(self, *_) -> None:
        raise Timeout(f"the cluster test ran past its {TIMEOUT:.0f} s limit (CLUSTER_TEST_TIMEOUT) during: "
                      f"{self.current}")

    def report(self) -> str:
        self("")
        return "phases: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.times if name) + \
            f"; total {time.perf_counter() - self.start:.0f} s"


class Node:
    """One `ray start --block` process in its own session: every Ray process it spawns shares that session id."""

    def __init__(self, name: str, args: list[str], env: dict, folder: Path, mount: str = ""):
        self.name, self.log, self.env, self.retries = name, folder / f"{name}.log", env, 1
        self.cmd = [str(BIN / "ray"), "start", "--block", *args]
        if mount:  # a private mount namespace for this node; the shell execs ray, so the pid stays
            self.cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} "$@"', "sh", *self.cmd]
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait_started(self, seconds: float) -> None:
        """Until `ray start` reports the node up (its GCS or raylet registered): cheaper and more telling than
        driver connection attempts, each of which blocks for up to a minute while the GCS is not there yet. Ray
        gives a new raylet a fixed 30 s to register; on CPUs saturated by other jobs it can miss that, and `ray
        start` exits: the node is started once more."""
        deadline = time.monotonic() + seconds
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None and self.retries and "timed out during startup" in self.tail():
                print(f"the {self.name} node missed Ray's start-up limit (CPUs busy?): starting it again", flush=True)
                self.retries -= 1
                self.kill()
                self.start()
            check(self.proc.poll() is None, f"the {self.name} node exited {self.proc.returncode}:\n{self.tail()}")
            check(time.monotonic() < deadline, f"the {self.name} node did not start in {seconds:.0f} s:\n"
                  f"{self.tail()}")
            time.sleep(0.2)

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def processes(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.proc.pid:
                    found.append(process)
            except (ProcessLookupError, PermissionError):
                pass
        return found

    def kill(self) -> int:
        processes = self.processes()
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=10)
        self.proc.wait(10)
        return len(processes)

    def stop(self) -> None:
        """SIGKILL to every process of the session: nothing of this throwaway cluster needs a graceful shutdown
        (`ray start --block` on SIGTERM takes seconds), and its temp dir is removed next."""
        self.kill()


def text(seed: int, words: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, words)) + "\n"


def corpus(folder: Path, count: int, words: int, offset: int = 0) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"doc{i:02d}.txt").write_text(text(offset + i, words))
    return folder


def run(cmd: list[str], env: dict, timeout: float) -> tuple[str, float]:
    """Runs a command, echoes its output, fails on a non-zero exit; returns the output and the seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    print(f"$ {' '.join(cmd)}  ({seconds:.1f} s, exit {done.returncode})\n{done.stdout.rstrip()}", flush=True)
    check(done.returncode == 0, f"{cmd[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def rows(store: Path) -> dict:
    """What must not depend on how many nodes computed the store: each document's row and checksum."""
    from storage.store import Store

    keys = ("doc_id", "source", "content_hash", "n_tokens", "chunk_char_offsets", "shape", "checksum")
    manifest = Store.open(store).manifest().to_pylist()
    check(len(manifest) == len({row["content_hash"] for row in manifest}), f"{store}: a document stored twice")
    return {row["content_hash"]: tuple(json.dumps(row[key]) for key in keys) for row in manifest}


def embedded_on(output: str) -> dict:
    found = re.search(r"embedded on (\d+) nodes?: (.*)", output)
    check(found, "the summary does not say which nodes embedded the documents")
    return {node: int(count) for node, count in re.findall(r"(\w+) (\d+) documents", found.group(2))}


def assert_loopback(cluster_pids: list[int]) -> None:
    """Only lo exists here, every node registered as 127.0.0.1, the drivers too, and no socket of a cluster process
    is bound to or connected with any other address."""
    import ray

    check(set(psutil.net_if_addrs()) == {"lo"}, f"interfaces besides lo: {sorted(psutil.net_if_addrs())}")
    nodes = [node for node in ray.nodes() if node["Alive"]]
    check(len(nodes) == 2, f"expected 2 alive nodes, found {len(nodes)}")
    for node in nodes:
        check(node["NodeManagerAddress"] == LOOPBACK, f"node registered under {node['NodeManagerAddress']}")
    gcs = ray.get_runtime_context().gcs_address
    check(gcs.rsplit(":", 1)[0] == LOOPBACK, f"GCS at {gcs}")
    check(ray.util.get_node_ip_address() == LOOPBACK, f"driver on {ray.util.get_node_ip_address()}")
    drivers = {job["DriverIPAddress"] for job in ray._private.state.jobs()}
    check(drivers == {LOOPBACK}, f"drivers on {drivers}")
    sockets = [c for c in psutil.net_connections("inet") if c.pid in cluster_pids]
    check(sockets, "no sockets of the cluster's processes found")
    for c in sockets:
        for address in filter(None, (c.laddr, c.raddr)):
            ip = ipaddress.ip_address(address.ip)
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is 127.0.0.1
            check(ip.is_loopback or ip.is_unspecified, f"pid {c.pid} uses {address.ip}:{address.port}")
    listening = sorted({c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN})
    print(f"loopback: {len(nodes)} nodes at {LOOPBACK}, GCS {gcs}, drivers {sorted(drivers)}, {len(sockets)} "
          f"sockets of {len(cluster_pids)} processes, listening on {listening} (only lo exists)", flush=True)


def cli(main, argv: list[str]) -> tuple[int, str]:
    """Runs a command's main() in this process; returns its exit code and its stdout and stderr together."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main(argv)
    return code, output.getvalue()


def stored(store: Path) -> int:
    """Rows committed to a store's manifest (the compacted file and its journal), cheap enough to poll while a job
    runs: the store reads only what changed."""
    from extensible.errors import UserError
    from storage.store import Store

    try:
        return len(Store.open(store))
    except UserError:  # not created yet
        return 0


def main() -> int:
    phase = Phases()
    signal.signal(signal.SIGALRM, phase.timeout)
    signal.alarm(int(TIMEOUT))
    nodes: list[Node] = []

    def watchdog() -> None:  # the alarm's exception cannot interrupt a call blocked inside Ray's C++ code
        print(f"the cluster test is stuck past its {TIMEOUT:.0f} s limit during: {phase.current}; killing it",
              file=sys.stderr, flush=True)
        for node in nodes:
            print(f"--- {node.name} node log:\n{node.tail()}", file=sys.stderr, flush=True)
            node.kill()
        os._exit(124)

    stuck = threading.Timer(TIMEOUT + 30, watchdog)
    stuck.daemon = True
    stuck.start()
    # Before any Ray process starts: outside `make cluster-test`'s namespace Ray would use the real interface.
    check(set(psutil.net_if_addrs()) == {"lo"}, "run this through `make cluster-test`: it needs a network namespace "
          f"whose only interface is lo (found {sorted(psutil.net_if_addrs())})")
    work = Path(tempfile.mkdtemp(prefix="extemb-cluster-"))
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))  # the token file Ray reads through RAY_AUTH_TOKEN_PATH
    token.chmod(0o600)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           # a lost node is declared dead after ~3 s instead of ~15 s
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3",
           # the head's dashboard (ray job submit's server) loads 9 modules: on CPUs shared with other jobs that can
           # take past Ray's 60 s start-up limit, which fails `ray start`; the test's own limit bounds it instead
           "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(int(TIMEOUT))}
    env.pop("RAY_ADDRESS", None)
    # An S3 API on loopback (moto's server): the two-node run to s3:// writes one bucket from both nodes, whose Ray
    # workers find the endpoint and credentials in their environment, as on a cloud cluster.
    s3 = Server(work)
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": s3.url, "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    os.environ.update({key: env[key] for key in env if key.startswith(("RAY_AUTH", "AWS_"))})  # this driver too
    gcs_port, dashboard_port = 46379, 48265
    address = f"{LOOPBACK}:{gcs_port}"
    run_env = {**env, "RAY_ADDRESS": address}
    common = ["--node-ip-address", LOOPBACK, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats"]
    passed = False
    try:
        phase("head start")
        nodes.append(Node("head", ["--head", "--port", str(gcs_port), "--include-dashboard", "true",
                                   "--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard_port),
                                   "--temp-dir", str(work / "ray"), *common], env, work))
        # While the head starts: torch and transformers (seconds of CPU), the tiny model and the corpora.
        import ray

        from storage.store import Store

        from jobs.precompute import main as precompute_main

        from .conftest import save_tiny

        model = str(save_tiny(work / "model", layers=8))
        docs = corpus(work / "corpus", DOCS, 300)
        lost_docs = corpus(work / "lost-corpus", LOST_DOCS, 1500, offset=100)
        job = ["--model", model, "--chunk", "16", "--threads", "1", "--index", "none"]
        nodes[0].wait_started(phase.left())
        ray.init(address=address, log_to_driver=False, configure_logging=False)

        phase("one-node make precompute")
        one, one_s = run(["make", "-s", "precompute", f"CORPUS={docs}", f"STORE={work / 'one'}",
                          f"PRECOMPUTE_ARGS={' '.join(job)} --workers 1"], run_env, phase.left())
        check(len(embedded_on(one)) == 1, "the one-node run used more than one node")

        # The worker node gets its own mount namespace with a tmpfs over `private`: a folder the driver sees and it
        # does not, as a node-local disk would be.
        phase("worker node join")
        private = work / "private"
        private.mkdir()
        nodes.append(Node("worker", ["--address", address, *common], env, work,
                          f"mount -t tmpfs tmpfs {private} && exec"))
        nodes[1].wait_started(phase.left())
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            check(nodes[1].proc.poll() is None, f"the worker node exited:\n{nodes[1].tail()}")
            time.sleep(0.2)

        phase("two-node make precompute")
        two, two_s = run(["make", "-s", "precompute", f"CORPUS={docs}", f"STORE={work / 'two'}",
                          f"PRECOMPUTE_ARGS={' '.join(job)} --workers 2"], run_env, phase.left())
        per_node = embedded_on(two)
        check(len(per_node) == 2 and sum(per_node.values()) == DOCS, f"not embedded on both nodes: {per_node}")
        check(rows(work / "two") == rows(work / "one"), "the two-node store differs from the one-node store")
        check(Store.open(work / "two").verify() == [], "the two-node store does not verify")

        phase("two-node make precompute to s3://")
        import boto3

        boto3.client("s3").create_bucket(Bucket="library")
        bucket, _ = run(["make", "-s", "precompute", f"CORPUS={docs}", "STORE=s3://library/two",
                         f"PRECOMPUTE_ARGS={' '.join(job)} --workers 2"], run_env, phase.left())
        per_node = embedded_on(bucket)
        check(len(per_node) == 2 and sum(per_node.values()) == DOCS, f"not embedded on both nodes: {per_node}")
        check(rows("s3://library/two") == rows(work / "one"), "the s3:// store differs from the one-node store")
        check(Store.open("s3://library/two").verify() == [], "the s3:// store does not verify")

        phase("ray job submit --working-dir .")
        submitted, submit_s = run(["ray", "job", "submit", "--address", f"http://{LOOPBACK}:{dashboard_port}",
                                   "--working-dir", ".", "--runtime-env-json", EXCLUDES, "--", "python", "-m",
                                   "jobs.precompute", "--corpus", str(docs), "--store", str(work / "submitted"), *job,
                                   "--workers", "2"], env, phase.left())
        check(len(embedded_on(submitted)) == 2, "the submitted job did not use both nodes")
        check(rows(work / "submitted") == rows(work / "one"), "the submitted job's store differs")

        phase("loopback checks")
        assert_loopback([p.pid for node in nodes for p in node.processes()])

        # A store on a folder the worker node does not see: refused up front, naming the path. The job's own CLI
        # entry point (`python -m jobs.precompute`'s main), run by this process, already a driver of the cluster: each
        # driver process costs seconds of CPU for torch and transformers.
        phase("node-local store refused")
        code, output = cli(precompute_main, ["--corpus", str(docs), "--store", str(private / "store"), *job,
                                             "--workers", "2"])
        error = output.strip().splitlines()[-1] if output.strip() else ""
        print(f"node-local store: exit {code}: {error}", flush=True)
        check(code == 2 and f"STORE {private / 'store'} must be shared storage" in error,
              "a store the worker node cannot see was not refused up front")
        check(len(Store.open(private / "store")) == 0, "documents were stored in the node-local store")

        # Node loss: the worker node's processes are killed while documents are in flight (both actors hold queued
        # documents: the pool starts with all its actors and each takes several at a time).
        phase("node loss: the job until the kill")
        lost = work / "lost"
        cmd = [str(BIN / "python"), "-m", "jobs.precompute", "--corpus", str(lost_docs), "--store", str(lost), *job,
               "--workers", "2", "--commit-every", "1"]
        first = subprocess.Popen(cmd, env=run_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        try:
            while stored(lost) < 2:
                check(first.poll() is None, "the node-loss job ended before the loss")
                time.sleep(0.05)
            killed = nodes[1].kill()
            stored_at_loss = stored(lost)
            print(f"node loss: killed the worker node's {killed} processes with {stored_at_loss} of {LOST_DOCS} "
                  "documents stored", flush=True)
            check(stored_at_loss < LOST_DOCS, "the worker node was killed only after every document was stored")
            phase("node loss: the job after the kill")
            output = first.communicate(timeout=phase.left())[0]
        except BaseException:
            first.kill()
            output = first.communicate()[0]
            print(f"the node-loss job's output:\n{output[-3000:]}", flush=True)
            raise
        print(f"the job after the loss exited {first.returncode}:\n{output.rstrip()[-2500:]}", flush=True)
        if first.returncode != 0:
            check("rerun to resume" in output, "the failed job does not say how to go on")
            phase("node loss: the rerun")
            before = len(Store.open(lost))
            resumed, _ = run(cmd[:-4] + ["--workers", "1", "--commit-every", "1"], run_env, phase.left())
            check(f"skipped {before} already stored" in resumed, "the rerun did not skip what was stored")
        hashes = Store.open(lost).manifest().column("content_hash").to_pylist()
        check(len(hashes) == len(set(hashes)) == LOST_DOCS,
              f"after the loss: {len(hashes)} rows, {len(set(hashes))} unique of {LOST_DOCS}")
        phase("extemb store verify")
        run([str(BIN / "extemb"), "store", "verify", str(lost)], env, phase.left())

        tokens = int(re.search(r"([\d,]+) tokens in", one).group(1).replace(",", ""))
        print(f"throughput, same {DOCS} documents ({tokens:,} tokens), whole `make precompute` wall time: one node "
              f"{one_s:.1f} s, two nodes {two_s:.1f} s, ray job submit {submit_s:.1f} s")
        for name, output in (("one node", one), ("two nodes", two)):
            print(f"  {name}: " + re.search(r"stored .*tokens/s[^)]*\)", output).group(0))
        passed = True
        return 0
    finally:
        phase("cleanup")
        if not passed:
            for node in nodes:
                print(f"--- {node.name} node log (the end):\n{node.tail()}", file=sys.stderr, flush=True)
        try:
            try:
                import ray

                ray.shutdown()
            finally:
                for node in reversed(nodes):
                    node.stop()
                s3.stop()
                left = [p.pid for node in nodes for p in node.processes()]
                if left:
                    print(f"processes left running: {left}", file=sys.stderr)
                shutil.rmtree(work, ignore_errors=True)
        finally:
            signal.alarm(0)
            stuck.cancel()
            print(phase.report(), flush=True)
            if passed:
                print(f"cluster test passed in {time.perf_counter() - phase.start:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
