"""The precompute job: Ray Data runs the embedder over a corpus in an actor pool and fills a store.

The driver scans the corpus (hashes, skips what is stored, reports unusable files), creates or opens the store for
this embedder, and streams documents through ``map_batches`` with ``EmbedDocuments`` actors (one per GPU on a
cluster, CPU actors here). Each actor writes whole documents -- one array and one text file per document, no two
actors on the same document -- and returns its manifest row; the driver alone commits rows to the manifest, a few
documents at a time. ``ray.init()`` takes no address: it joins the cluster named by RAY_ADDRESS or ``ray job submit``,
else starts a local one.

The job holds the store's lock for its whole write phase (a second job is refused, or waits with ``wait``). Retries
are bounded: an actor is restarted and its task retried at most ``RAY_RETRIES`` times, and a document that killed its
worker ``MAX_ATTEMPTS`` times (counted in ``<store>/.attempts/``) is reported as failed instead of tried again.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from extensible.plugins import load_extensible
from extensible.runtime import ExtensibleLM
from storage.files import open_files
from storage.store import Store, runtime_fingerprints

from extensible.errors import UserError

from .corpus import MAX_BYTES, content_hash, load_text, scan_corpus

RAY_RETRIES = 3  # actor restarts and task retries (Ray Data's default is unbounded: a poison document would hang)
MAX_ATTEMPTS = 2  # a document that killed its worker this many times is reported as failed
ATTEMPTS = ".attempts"


def write_document(lm: ExtensibleLM, store: Store, ref: dict) -> dict:
    """Embeds one document chunk by chunk into its store array (memory: one block) and returns its manifest row.
    The hash recorded is the hash of exactly the text embedded (a file edited since the scan gets its new hash)."""
    text = load_text(ref, ref.get("max_bytes") or MAX_BYTES)
    digest = content_hash(text)
    doc_id = ref["doc_id"] if digest == ref["content_hash"] else f"{ref['doc_id'].rsplit('-', 1)[0]}-{digest[:8]}"
    encoding = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    starts = np.asarray([start for start, _ in encoding["offset_mapping"]], dtype=np.int64)
    del encoding
    size = lm.chunk_size
    writer = store.writer(digest, len(ids))
    for rows in lm.iter_encode(torch.from_numpy(ids)):
        writer.append(rows.to("cpu", torch.float16).numpy())
    checksum = writer.close()
    text_path = store.write_text(digest, text)
    row = {
        "doc_id": doc_id, "source": ref["source"], "content_hash": digest, "n_tokens": len(ids),
        "chunk_size": size, "chunk_char_offsets": [int(c) for c in starts[::size]] + [len(text)],
        "dtype": "float16", "shape": [len(ids), store.hidden], "array": writer.name, "text_path": str(text_path),
        "checksum": checksum, "embedder_fingerprint": store.attrs["embedder_fingerprint"],
        "llm_fingerprint": store.attrs["llm_fingerprint"],
    }
    store.write_record(row)  # complete: from here on, repair can list it
    return row


class EmbedDocuments:
    """Ray Data actor: loads the LLM and embedder once, then embeds one document per call."""

    def __init__(self, store: str, model: str | None, plugin: str | None, chunk_size: int | None, threads: int,
                 gpus: float = 0):
        import ray

        torch.set_num_threads(threads)
        if gpus and not torch.cuda.is_available():
            raise UserError(f"this actor was given GPUs {ray.get_gpu_ids()} (--gpus-per-worker {gpus}) but torch "
                            "sees no CUDA device")
        self.lm = load_extensible(model, plugin, chunk_size=chunk_size)  # bf16, on CUDA when the actor has a GPU
        if gpus:
            self.lm.encode_batch = gpu_batch(self.lm)
        self.store = Store.open(store)
        self.node = ray.get_runtime_context().get_node_id()  # the summary counts documents per node

    def __call__(self, batch: dict) -> dict:
        rows = []
        for i in range(len(batch["doc_id"])):
            ref = {key: batch[key][i] for key in batch}
            files, attempts = self.store.files, f"{ATTEMPTS}/{ref['content_hash'][:32]}"
            tried = int(files.read(attempts) or 0) if files.exists(attempts) else 0
            if tried >= MAX_ATTEMPTS:  # it killed the worker each time: a crash or running out of memory
                rows.append({"doc_id": ref["doc_id"], "source": ref["source"],
                             "error": f"its worker died {tried} times while embedding it (a crash or out of memory)"})
                continue
            files.write(attempts, str(tried + 1).encode())  # left behind only if this process dies
            try:
                rows.append({**write_document(self.lm, self.store, ref), "error": ""})
            except Exception as err:  # one bad document is reported; the rest of the corpus goes on
                rows.append({"doc_id": ref["doc_id"], "source": ref["source"],
                             "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"})
            files.delete(attempts)
        return {"row": [{**row, "node": self.node} for row in rows]}


def gpu_batch(lm: ExtensibleLM, budget: float = 0.5) -> int:
    """Chunks per embedder forward that fit in ``budget`` of the free GPU memory: a bf16 forward of one chunk holds
    about a dozen [chunk, hidden] activations and the MLP's [chunk, intermediate] ones (SDPA: no [chunk, chunk])."""
    free, _ = torch.cuda.mem_get_info(lm.embedder.device)
    config = lm.llm.config
    per_chunk = 2 * lm.chunk_size * (12 * config.hidden_size + 3 * config.intermediate_size)
    return max(1, min(512, int(free * budget // per_chunk)))


def check_shared_store(store: Store) -> None:
    """Every node must see the store the driver sees (the same filesystem, or the same bucket with credentials): each
    writes a probe beside one the driver wrote, or the job stops here naming the node, instead of failing document
    by document."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    store.files.write(f".probe-{token}", token.encode())

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(location: str) -> str:
        import socket

        try:
            files = open_files(location)
            if not files.exists(f".probe-{token}") or files.read(f".probe-{token}") != token.encode():
                return (f"cannot see the store the driver writes ({location}/.probe-{token} is missing): not the "
                        "same filesystem")
            files.write(f".probe-{token}-{ray.get_runtime_context().get_node_id()}", socket.gethostname().encode())
        except (OSError, UserError) as err:
            return f"cannot write it ({type(err).__name__}: {getattr(err, 'strerror', None) or err})"
        return ""

    nodes = [node for node in ray.nodes() if node["Alive"]]
    try:
        answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                           .remote(str(store.path)) for node in nodes], timeout=120)
    finally:
        for name in [f".probe-{token}"] + [f".probe-{token}-{node['NodeID']}" for node in nodes]:
            store.files.delete(name)
    for node, problem in zip(nodes, answers):
        if problem:
            raise UserError(f"STORE {store.path} must be shared storage that every Ray node can write: node "
                            f"{node['NodeID'][:8]} ({node['NodeManagerAddress']}) {problem}")


@dataclass
class Summary:
    store: str
    stored: int = 0
    tokens: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    already_stored: int = 0
    first_document_seconds: float = 0.0  # start-up: Ray, the actors' model loading, the first document
    problems: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)  # Ray node id -> documents its actors embedded

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        lines = [f"stored {self.stored} documents, {self.tokens:,} tokens in {self.seconds:.1f} s "
                 f"({self.tokens_per_s:,.0f} tokens/s; the first document after {self.first_document_seconds:.1f} s), "
                 f"{self.bytes_written / 2**20:.1f} MiB written to {self.store}",
                 f"skipped {self.already_stored} already stored"]
        if self.nodes:
            lines.append(f"embedded on {len(self.nodes)} node{'s' * (len(self.nodes) > 1)}: " + ", ".join(
                f"{node[:8]} {count} documents" for node, count in sorted(self.nodes.items())))
        for kind, sources in sorted(self.problems.items()):
            lines.append(f"{kind}: {len(sources)}" + "".join(f"\n  {s}" for s in sources[:20]))
        return lines


def precompute(corpus: str | None, store_path: str, model: str | None = None, plugin: str | None = None,
               chunk_size: int | None = None, workers: int = 1, threads: int | None = None, commit_every: int = 64,
               commit_seconds: float = 5.0, progress: bool = True, text_column: str = "text",
               max_bytes: int = MAX_BYTES, wait: bool = False, gpus_per_worker: float | None = None) -> Summary:
    """Embeds ``corpus`` into the store at ``store_path``; commits every ``commit_every`` documents or
    ``commit_seconds``, whichever comes first, so a killed job loses at most that much work. ``gpus_per_worker``
    (default: 1 when the driver sees CUDA, else 0) is each actor's ``num_gpus``; 0 gives CPU actors."""
    for name, value in (("--workers", workers), ("--chunk", chunk_size or 1), ("--commit-every", commit_every),
                        ("--threads", threads or 1), ("--max-bytes", max_bytes)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker:g}")
    report = scan_corpus(corpus, text_column, max_bytes)
    if not report.documents and not report.problems:
        raise UserError(f"CORPUS {corpus} holds no documents")
    lm = load_extensible(model, plugin, chunk_size=chunk_size)
    fingerprints, hidden, size = runtime_fingerprints(lm), lm.hidden_size, lm.chunk_size
    del lm  # the actors hold their own copies
    open_store = lambda: Store.create_or_open(store_path, **fingerprints, hidden=hidden, chunk_size=size)  # noqa: E731
    store = Store.open(store_path) if open_files(store_path).exists("zarr.json") else open_store()
    with store.lock(wait=wait):  # one writer for the whole write phase: what is stored is read under the lock
        store = open_store()  # under the lock: the fingerprint check (or re-pinning a store with nothing committed)
        return _embed(report, store, model, plugin, chunk_size, workers, threads, commit_every, commit_seconds,
                      progress, max_bytes, gpus_per_worker)


def _embed(report, store: Store, model, plugin, chunk_size, workers, threads, commit_every, commit_seconds, progress,
           max_bytes, gpus_per_worker) -> Summary:
    import ray

    stored = store.stored_hashes()
    todo = [ref for ref in report.documents if ref.content_hash not in stored]
    summary = Summary(store=str(store.path), already_stored=len(report.documents) - len(todo),
                      problems={kind: list(sources) for kind, sources in report.problems.items()})
    if not todo:
        return summary
    before = store.files.size()
    store.files.delete_prefix(ATTEMPTS)  # attempts count per job
    gpus = (1 if torch.cuda.is_available() else 0) if gpus_per_worker is None else gpus_per_worker
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    ray.init(ignore_reinit_error=True, log_to_driver=False, configure_logging=False)
    if gpus * workers > ray.cluster_resources().get("GPU", 0):  # the actors would wait for GPUs forever
        raise UserError(f"--workers {workers} x --gpus-per-worker {gpus} needs {gpus * workers:g} GPUs; the Ray "
                        f"cluster has {ray.cluster_resources().get('GPU', 0):g}")
    check_shared_store(store)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = 600  # a fixed pool starts with all its actors, on every node, not the first one
    # One block per document: a worker that dies takes only its own document with it. Ray 2.60 takes the retry
    # bounds only as ray_remote_args, which it marks deprecated without a named replacement yet.
    warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", ray.util.annotations.RayDeprecationWarning)
    dataset = ray.data.from_items([{**asdict(ref), "max_bytes": max_bytes} for ref in todo],
                                  override_num_blocks=len(todo)).map_batches(
        EmbedDocuments, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus, num_cpus=0 if gpus else 1,
        max_restarts=RAY_RETRIES, max_task_retries=RAY_RETRIES,
        fn_constructor_kwargs={"store": str(store.path), "model": model, "plugin": plugin, "chunk_size": chunk_size,
                               "threads": threads, "gpus": gpus},
    )
    start = last_commit = time.perf_counter()
    pending: list[dict] = []
    scanned = {ref.source: ref for ref in todo}
    done: set[str] = set()
    failed = summary.problems.setdefault("failed", [])
    bar = tqdm(total=len(todo), desc="precompute", unit="doc", disable=not progress)
    try:
        for item in dataset.iter_rows():
            row = item["row"]
            done.add(row["source"])
            bar.update()
            summary.first_document_seconds = summary.first_document_seconds or time.perf_counter() - start
            if row["error"]:
                failed.append(f"{row['source']}: {row['error']}")
                continue
            if row["content_hash"] != scanned[row["source"]].content_hash:
                summary.problems.setdefault("changed during the job", []).append(
                    f"{row['source']} (stored as the text that was embedded)")
            if row["content_hash"] in stored:
                summary.problems.setdefault("duplicate", []).append(f"{row['source']} (its new text is stored)")
                continue
            stored.add(row["content_hash"])
            pending.append({key: value for key, value in row.items() if key not in ("error", "node")})
            summary.nodes[row["node"]] = summary.nodes.get(row["node"], 0) + 1
            summary.stored += 1
            summary.tokens += int(row["n_tokens"])
            bar.set_postfix(tokens=f"{summary.tokens:,}")
            if len(pending) >= commit_every or time.perf_counter() - last_commit >= commit_seconds:
                store.commit(pending)
                pending, last_commit = [], time.perf_counter()
    except ray.exceptions.RayError as err:  # the retries are spent: report what is left, keep what was done
        reason = str(err).strip().splitlines()[0]
        failed += [f"{source}: not embedded: the workers died ({type(err).__name__}: {reason}); rerun to resume"
                   for source in scanned if source not in done]
    finally:
        store.commit(pending)
        bar.close()
    if not failed:
        del summary.problems["failed"]
    summary.seconds = time.perf_counter() - start
    summary.bytes_written = store.files.size() - before
    return summary
