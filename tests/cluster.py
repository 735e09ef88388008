"""make cluster-test: the precompute job on a real two-node Ray cluster, every process and packet on 127.0.0.1.

Run inside a fresh network namespace (the Makefile's `unshare --net`) whose only interface is lo: Ray 2.60 rewrites
127.0.0.1 to the machine's interface address for `--node-ip-address` and `--address` (services.
resolve_ip_for_localhost) and offers no setting that keeps a worker node on loopback, so the namespace is what keeps
the traffic there; the checks below assert it. A head and a worker node are started as separate `ray start --block`
processes with one CPU each (an embedder actor takes one CPU, so two actors must land on both nodes), with token
authentication through RAY_AUTH_TOKEN_PATH, and stopped by the process sessions this script started (never
`ray stop`). Steps: a one-node run through RAY_ADDRESS, the worker node joins, a two-node run through `make
precompute` and one through `ray job submit --working-dir .` (both stores must equal the one-node store), a store on
a path only the driver can see (refused up front), then the worker node is killed mid-job and a rerun completes the
store with every document exactly once.
"""

from __future__ import annotations

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
import time
from pathlib import Path

import numpy as np
import psutil

from storage.store import Store

from .conftest import save_tiny

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
LOOPBACK = "127.0.0.1"
EXCLUDES = '{"excludes": ["/runs/"]}'  # the training runs' checkpoints: past the dashboard's 100 MiB upload limit


def check(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class Node:
    """One `ray start --block` process in its own session: every Ray process it spawns shares that session id."""

    def __init__(self, name: str, args: list[str], env: dict, folder: Path, mount: str = ""):
        self.name, self.log = name, folder / f"{name}.log"
        cmd = [str(BIN / "ray"), "start", "--block", *args]
        if mount:  # a private mount namespace for this node; the shell execs ray, so the pid stays
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} "$@"', "sh", *cmd]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever is left of this session


def text(seed: int, words: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, words)) + "\n"


def corpus(folder: Path, count: int, words: int, offset: int = 0) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"doc{i:02d}.txt").write_text(text(offset + i, words))
    return folder


def run(cmd: list[str], env: dict, timeout: float = 300) -> tuple[str, float]:
    """Runs a command, echoes its output, fails on a non-zero exit; returns the output and the seconds it took."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    print(f"$ {' '.join(cmd)}  ({seconds:.1f} s, exit {done.returncode})\n{done.stdout.rstrip()}", flush=True)
    check(done.returncode == 0, f"{cmd[0]} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout, seconds


def rows(store: Path) -> dict:
    """What must not depend on how many nodes computed the store: each document's row and checksum."""
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


def main() -> int:
    started = time.perf_counter()
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
           "RAY_health_check_failure_threshold": "3"}
    env.pop("RAY_ADDRESS", None)
    os.environ.update({key: env[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})  # this driver too
    gcs_port, dashboard_port = 46379, 48265
    address = f"{LOOPBACK}:{gcs_port}"
    model = str(save_tiny(work / "model", layers=8))
    docs = corpus(work / "corpus", 12, 1500)
    common = ["--node-ip-address", LOOPBACK, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats"]
    job = ["--model", model, "--chunk", "16", "--threads", "1", "--index", "none"]
    nodes: list[Node] = []
    try:
        import ray

        nodes.append(Node("head", ["--head", "--port", str(gcs_port), "--include-dashboard", "true",
                                   "--dashboard-host", LOOPBACK, "--dashboard-port", str(dashboard_port),
                                   "--temp-dir", str(work / "ray"), *common], env, work))
        run_env = {**env, "RAY_ADDRESS": address}
        deadline = time.monotonic() + 240  # minutes, not seconds, when the CPUs are shared with other jobs
        while True:  # the head is up when a driver can join it
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                break
            except Exception:
                check(time.monotonic() < deadline and nodes[0].proc.poll() is None,
                      f"the head did not start: {nodes[0].log.read_text()[-2000:]}")
                time.sleep(1)

        one, one_s = run(["make", "-s", "precompute", f"CORPUS={docs}", f"STORE={work / 'one'}",
                          f"PRECOMPUTE_ARGS={' '.join(job)} --workers 1"], run_env)
        check(len(embedded_on(one)) == 1, "the one-node run used more than one node")

        # The worker node gets its own mount namespace with a tmpfs over `private`: a folder the driver sees and it
        # does not, as a node-local disk would be.
        private = work / "private"
        private.mkdir()
        nodes.append(Node("worker", ["--address", address, *common], env, work,
                          f"mount -t tmpfs tmpfs {private} && exec"))
        deadline = time.monotonic() + 240
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            check(time.monotonic() < deadline and nodes[1].proc.poll() is None,
                  f"the worker node did not join: {nodes[1].log.read_text()[-2000:]}")
            time.sleep(1)

        two, two_s = run(["make", "-s", "precompute", f"CORPUS={docs}", f"STORE={work / 'two'}",
                          f"PRECOMPUTE_ARGS={' '.join(job)} --workers 2"], run_env)
        per_node = embedded_on(two)
        check(len(per_node) == 2 and sum(per_node.values()) == 12, f"not embedded on both nodes: {per_node}")
        check(rows(work / "two") == rows(work / "one"), "the two-node store differs from the one-node store")
        check(Store.open(work / "two").verify() == [], "the two-node store does not verify")

        submitted, submit_s = run(["ray", "job", "submit", "--address", f"http://{LOOPBACK}:{dashboard_port}",
                                   "--working-dir", ".", "--runtime-env-json", EXCLUDES, "--", "python", "-m",
                                   "jobs.precompute", "--corpus", str(docs), "--store", str(work / "submitted"), *job,
                                   "--workers", "2"], env)
        check(len(embedded_on(submitted)) == 2, "the submitted job did not use both nodes")
        check(rows(work / "submitted") == rows(work / "one"), "the submitted job's store differs")
        assert_loopback([p.pid for node in nodes for p in node.processes()])

        # A store on a folder the worker node does not see: refused up front, naming the path.
        refused = subprocess.run([str(BIN / "python"), "-m", "jobs.precompute", "--corpus", str(docs), "--store",
                                  str(private / "store"), *job, "--workers", "2"], env=run_env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
        error = refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else ""
        print(f"node-local store: exit {refused.returncode}: {error}", flush=True)
        check(refused.returncode == 2 and f"STORE {private / 'store'} must be shared storage" in error,
              "a store the worker node cannot see was not refused up front")
        check(len(Store.open(private / "store")) == 0, "documents were stored in the node-local store")

        # Node loss: the worker node's processes are killed while documents are in flight.
        lost_docs = corpus(work / "lost-corpus", 20, 3000, offset=100)
        lost = work / "lost"
        cmd = [str(BIN / "python"), "-m", "jobs.precompute", "--corpus", str(lost_docs), "--store", str(lost), *job,
               "--workers", "2", "--commit-every", "1"]
        first = subprocess.Popen(cmd, env=run_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        deadline = time.monotonic() + 300  # generous: the CPUs may be shared with other jobs
        while not (lost / "manifest.parquet").exists() or len(Store.open(lost)) < 4:  # both actors at work
            check(first.poll() is None, f"the node-loss job ended before the loss:\n{first.communicate()[0][-3000:]}")
            check(time.monotonic() < deadline, "the node-loss job stored fewer than 4 documents in 300 s")
            time.sleep(0.2)
        killed = nodes[1].kill()
        stored_at_loss = len(Store.open(lost))
        print(f"node loss: killed the worker node's {killed} processes with {stored_at_loss} of 20 documents stored",
              flush=True)
        try:
            output, _ = first.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            first.kill()
            output = first.communicate()[0]
            raise AssertionError(f"the job hung after the node loss:\n{output[-3000:]}")
        print(f"the job after the loss exited {first.returncode}:\n{output.rstrip()[-2500:]}", flush=True)
        if first.returncode != 0:
            check("rerun to resume" in output, "the failed job does not say how to go on")
            before = len(Store.open(lost))
            resumed, _ = run(cmd[:-4] + ["--workers", "1", "--commit-every", "1"], run_env)
            check(f"skipped {before} already stored" in resumed, "the rerun did not skip what was stored")
        hashes = Store.open(lost).manifest().column("content_hash").to_pylist()
        check(len(hashes) == len(set(hashes)) == 20, f"after the loss: {len(hashes)} rows, {len(set(hashes))} unique")
        run([str(BIN / "extemb"), "store", "verify", str(lost)], env)

        tokens = int(re.search(r"([\d,]+) tokens in", one).group(1).replace(",", ""))
        print(f"throughput, same 12 documents ({tokens:,} tokens), whole `make precompute` wall time: one node "
              f"{one_s:.1f} s, two nodes {two_s:.1f} s, ray job submit {submit_s:.1f} s")
        for name, output in (("one node", one), ("two nodes", two)):
            print(f"  {name}: " + re.search(r"stored .*tokens/s[^)]*\)", output).group(0))
        print(f"cluster test passed in {time.perf_counter() - started:.0f} s")
        return 0
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            for node in reversed(nodes):
                node.stop()
            left = [p.pid for node in nodes for p in node.processes()]
            if left:
                print(f"processes left running: {left}", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
