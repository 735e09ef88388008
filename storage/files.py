"""Where a store's files live: a local folder, or a prefix in an S3-compatible bucket.

The store (``storage.store``) speaks only to the methods below, so its guarantees are written once and kept by each
place in its own way:

| guarantee                  | local folder                                  | object store (S3 API)                               |
| -------------------------- | --------------------------------------------- | --------------------------------------------------- |
| one writer                 | ``filelock`` (flock) on ``.lock``             | a lease object ``.lock``, created with              |
|                            |                                               | ``If-None-Match: *``, renewed with ``If-Match``,    |
|                            |                                               | taken over only once expired                        |
| whole files or nothing     | a temporary file, fsync'd, renamed into place | a single PUT is atomic                              |
| created once               | ``os.link`` of a complete temporary file      | ``If-None-Match: *``                                |
| replaced only if unchanged | compared under the writer's lock              | ``If-Match`` on the ETag that was read              |
| a commit                   | one fsync'd append to ``manifest.<g>.jsonl``  | one create-only object ``manifest.<g>.journal/<n>`` |

Names are '/'-separated paths relative to the store's root. Credentials and the endpoint of an object store come
from the usual places (``AWS_*`` variables, ``AWS_ENDPOINT_URL``, ``~/.aws``), never from the command line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import filelock

from extensible.errors import UserError

LOCK = ".lock"
OBJECT_SCHEMES = ("s3",)
LEASE_SECONDS = float(os.environ.get("EXTEMB_LEASE_SECONDS", "60"))  # a crashed writer's lease expires after this


def open_files(location: str | Path) -> LocalFiles | ObjectFiles:
    """The files of the store at ``location``: a local path, or an ``s3://bucket/prefix`` URL."""
    text = str(location)
    if "://" not in text:
        return LocalFiles(Path(text))
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return LocalFiles(Path(text.split("://", 1)[1]))
    if scheme not in OBJECT_SCHEMES:
        raise UserError(f"no filesystem for {scheme}:// in STORE {text}; use a local path or s3://bucket/prefix")
    return ObjectFiles(text)


def is_remote(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).lower().startswith("file://")


def holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:200],
            "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def describe_holder(data: bytes | None) -> str:
    try:
        info = json.loads(data)
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (TypeError, ValueError, KeyError):
        return "another process"


# ---- a local folder ----------------------------------------------------------------------------------------------

# One re-entrant lock per store path in this process, held with the file lock: filelock's per-path singleton is shared
# by the process's threads (re-entrant across them), and flock may be per process on network filesystems, so neither
# keeps a second thread out.
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(key: str) -> threading.RLock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(key, threading.RLock())


class LocalFiles:
    remote = False

    def __init__(self, root: Path):
        self.root = root
        self.location = root
        self.thread_lock = _thread_lock(os.path.realpath(root))
        # One lock object per store path in this process, so a job's lock and its commits nest (in one thread).
        self._file_lock = filelock.FileLock(root / LOCK, is_singleton=True, thread_local=False)

    def __str__(self) -> str:
        return str(self.root)

    def zarr_store(self, read_only: bool):
        import zarr.storage

        return zarr.storage.LocalStore(self.root, read_only=read_only)

    def prepare(self) -> None:
        """Ready to create a store in: the folder exists."""
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"--store {self.root} is a file, not a store folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except PermissionError as err:
            raise UserError(f"cannot create the store {self.root}: {err.strerror} ({err.filename})") from None

    def check_reachable(self) -> None:
        pass  # a local path is always there to ask; what is missing is named by the caller

    def writable(self) -> bool:
        return os.access(self.root, os.W_OK)

    # reads
    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_tagged(self, name: str) -> tuple[bytes, tuple] | tuple[None, None]:
        """The file's bytes and the tag of exactly that version (None, None when absent)."""
        try:
            with (self.root / name).open("rb") as handle:
                opened = os.fstat(handle.fileno())
                return handle.read(), (opened.st_ino, opened.st_mtime_ns, opened.st_size)
        except FileNotFoundError:
            return None, None

    def tag(self, name: str) -> tuple | None:
        try:
            stat = (self.root / name).stat()
            return stat.st_ino, stat.st_mtime_ns, stat.st_size
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` (a folder name, '' for all), as names relative to the root, sorted."""
        folder = self.root / prefix if prefix else self.root
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file())

    def size(self, prefix: str = "") -> int:
        folder = self.root / prefix if prefix else self.root
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0

    # writes
    @contextmanager
    def _complete_temporary(self, name: str, data: bytes):
        """A unique temporary file beside ``name`` holding ``data``, flushed to disk; removed afterwards unless the
        caller renamed it into place. Yields (its path, the target's path)."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            yield tmp, target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write(self, name: str, data: bytes) -> None:
        """The whole file or nothing: a complete temporary file renamed over it."""
        with self._complete_temporary(name, data) as (tmp, target):
            os.replace(tmp, target)

    def create(self, name: str, data: bytes) -> bool:
        """Writes the file only if it does not exist (a complete temporary file linked into place); False if it did."""
        with self._complete_temporary(name, data) as (tmp, target):
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
        return True

    def replace(self, name: str, data: bytes, tag) -> tuple | None:
        """Writes the file only if it is still the version ``tag`` names (None: absent); the caller holds the lock.
        The new version's tag, None when the file had changed."""
        if self.tag(name) != tag:
            return None
        self.write(name, data)
        return self.tag(name)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def temporaries(self) -> list[str]:
        """Temporary files of killed writes."""
        return [str(p.relative_to(self.root)) for p in self.root.glob(".*.tmp")]

    # the manifest's journal: one file, appended
    def journal_generations(self) -> list[int]:
        names = [p.name.split(".") for p in self.root.glob("manifest.*.jsonl")]
        return sorted(int(parts[1]) for parts in names if parts[1].isdigit())

    def journal_read(self, generation: int, position: int) -> tuple[bytes, int]:
        """The journal's complete lines from ``position``; the position after them. A torn last line (a killed
        commit) is not committed."""
        try:
            with (self.root / f"manifest.{generation}.jsonl").open("rb") as handle:
                handle.seek(position)
                data = handle.read()
        except FileNotFoundError:
            data = b""
        complete = data[: data.rfind(b"\n") + 1]
        return complete, position + len(complete)

    def journal_append(self, generation: int, position: int, data: bytes) -> bool:
        """One write of complete lines, fsync'd: the commit point. A torn tail of a killed commit is cut off first."""
        with (self.root / f"manifest.{generation}.jsonl").open("ab") as handle:
            handle.truncate(position)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def journal_bytes(self, generation: int) -> bytes:
        """Every line of the journal, a torn last one too (repair reads what it can)."""
        file = self.root / f"manifest.{generation}.jsonl"
        return file.read_bytes() if file.exists() else b""

    def journal_delete(self, generation: int) -> None:
        (self.root / f"manifest.{generation}.jsonl").unlink(missing_ok=True)

    def journal_exists(self) -> bool:
        return any(self.root.glob("manifest.*.jsonl"))

    # the writer's lock
    def lock_acquire(self, timeout: float) -> bool:
        """Takes the store's lock (re-entrant in this process); False when it could not within ``timeout``
        (-1: wait for ever). Writes who holds it on the outermost hold."""
        first = not self._file_lock.is_locked
        try:
            self._file_lock.acquire(timeout=timeout)
        except filelock.Timeout:
            return False
        except PermissionError:
            raise UserError(f"the store {self.root} is read-only; copy it or fix its permissions to write to it") from None
        if first:
            (self.root / f"{LOCK}.holder").write_text(json.dumps(holder_record()))
        return True

    def lock_release(self) -> None:
        self._file_lock.release()

    def lease_lost(self) -> str | None:
        return None  # a flock is held until released or the process dies

    def holder(self) -> str:
        try:
            return describe_holder((self.root / f"{LOCK}.holder").read_bytes())
        except OSError:
            return "another process"


# ---- an object store ---------------------------------------------------------------------------------------------

_LEASES: dict[str, _Lease] = {}
_CONDITIONAL_WRITES_CHECKED: set[str] = set()


def _client():
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                               connect_timeout=5, read_timeout=60))


def _error_code(err) -> str:
    return getattr(err, "response", {}).get("Error", {}).get("Code", "")


class ObjectFiles:
    remote = True

    def __init__(self, url: str):
        rest = url.split("://", 1)[1].strip("/")
        if not rest:
            raise UserError(f"STORE {url} names no bucket; use s3://bucket/prefix")
        self.url = url.rstrip("/")
        self.location = self.url
        self.bucket, _, self.prefix = rest.partition("/")
        self.thread_lock = _thread_lock(self.url)
        self.s3 = _client()

    def __str__(self) -> str:
        return self.url

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _name(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    @contextmanager
    def _errors(self):
        """The failures a user can fix, as one line naming what to change."""
        import botocore.exceptions as errors

        endpoint = self.s3.meta.endpoint_url
        try:
            yield
        except errors.NoCredentialsError:
            raise UserError(f"no credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or AWS_PROFILE)") from None
        except (errors.EndpointConnectionError, errors.ConnectTimeoutError) as err:
            raise UserError(f"the object store at {endpoint} does not answer ({type(err).__name__}); check "
                            "AWS_ENDPOINT_URL") from None
        except errors.ClientError as err:
            code = _error_code(err)
            if code in ("NoSuchBucket", "404"):  # HeadBucket answers a bare 404
                raise UserError(f"the bucket {self.bucket} does not exist at {endpoint}; create it or fix STORE "
                                f"{self.url}") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
                raise UserError(f"{endpoint} refused the credentials for {self.url} ({code}); check "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise

    def zarr_store(self, read_only: bool):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(f"s3://{self.bucket}/{self.prefix}", read_only=read_only)

    def prepare(self) -> None:
        self.check_reachable()

    def check_reachable(self) -> None:
        with self._errors():
            self.s3.head_bucket(Bucket=self.bucket)

    def writable(self) -> bool:
        return True  # a refused write names the credentials at the first write

    # reads
    def exists(self, name: str) -> bool:
        return self.tag(name) is not None

    def read(self, name: str) -> bytes:
        data, tag = self.read_tagged(name)
        if tag is None:
            raise FileNotFoundError(f"{self.url}/{name}")
        return data

    def read_tagged(self, name: str) -> tuple[bytes, str] | tuple[None, None]:
        with self._errors():
            try:
                answer = self.s3.get_object(Bucket=self.bucket, Key=self._key(name))
            except self.s3.exceptions.NoSuchKey:
                return None, None
            return answer["Body"].read(), answer["ETag"]

    def tag(self, name: str) -> str | None:
        import botocore.exceptions

        with self._errors():
            try:
                return self.s3.head_object(Bucket=self.bucket, Key=self._key(name))["ETag"]
            except botocore.exceptions.ClientError as err:
                if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def _objects(self, prefix: str, start_after: str = ""):
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(prefix), **({"StartAfter": self._key(start_after)} if start_after else {}))
        with self._errors():
            for page in pages:
                yield from page.get("Contents", [])

    def list(self, prefix: str = "") -> list[str]:
        folder = f"{prefix.rstrip('/')}/" if prefix else ""
        return sorted(self._name(item["Key"]) for item in self._objects(folder))

    def size(self, prefix: str = "") -> int:
        return sum(item["Size"] for item in self._objects(f"{prefix.rstrip('/')}/" if prefix else ""))

    # writes
    def write(self, name: str, data: bytes) -> None:
        with self._errors():
            self.s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def put_if(self, name: str, data: bytes, tag: str | None) -> str | None:
        """Writes the object only if it is still the version ``tag`` names (None: only if absent); its new ETag, or
        None when the condition failed."""
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        with self._errors():
            try:
                return self.s3.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **condition)["ETag"]
            except self.s3.exceptions.ClientError as err:
                if _error_code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    return None
                raise

    def create(self, name: str, data: bytes) -> bool:
        return self.put_if(name, data, None) is not None

    def replace(self, name: str, data: bytes, tag) -> str | None:
        return self.put_if(name, data, tag)

    def delete(self, name: str) -> None:
        with self._errors():
            self.s3.delete_object(Bucket=self.bucket, Key=self._key(name))

    def delete_prefix(self, prefix: str) -> None:
        keys = [item["Key"] for item in self._objects(f"{prefix.rstrip('/')}/")]
        with self._errors():
            for start in range(0, len(keys), 1000):
                self.s3.delete_objects(Bucket=self.bucket,
                                       Delete={"Objects": [{"Key": key} for key in keys[start : start + 1000]]})

    def temporaries(self) -> list[str]:
        return []  # a PUT is whole or absent: nothing is left half-written

    def check_conditional_writes(self) -> None:
        """Refuses, once per process and store, a service that ignores conditional writes: two creates of one
        probe object must not both succeed (the probe is removed)."""
        if self.url in _CONDITIONAL_WRITES_CHECKED:
            return
        probe = f".conditional-write-probe-{uuid.uuid4().hex}"
        try:
            first, second = self.create(probe, b"1"), self.create(probe, b"2")
        finally:
            self.delete(probe)
        if not (first and not second):
            raise UserError(f"the object store at {self.s3.meta.endpoint_url} ignores conditional writes "
                            "(If-None-Match); the store needs them for one writer and atomic commits: use AWS S3, "
                            "GCS, MinIO, Cloudflare R2 or another service that supports them")
        _CONDITIONAL_WRITES_CHECKED.add(self.url)

    # the manifest's journal: an object cannot be appended to, so each commit creates one object
    def _journal_key(self, generation: int, number: int) -> str:
        return f"manifest.{generation}.journal/{number:012d}.jsonl"

    def journal_generations(self) -> list[int]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key("manifest."),
                                                                   Delimiter="/")
        with self._errors():
            folders = [self._name(p["Prefix"]).rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        parts = [name.split(".") for name in folders if name.endswith(".journal")]
        return sorted(int(p[1]) for p in parts if p[1].isdigit())

    def journal_read(self, generation: int, position: int) -> tuple[bytes, int]:
        """The commits after number ``position`` (listed from there: a read costs what changed); the last number."""
        data = []
        after = self._journal_key(generation, position) if position else ""
        for item in self._objects(f"manifest.{generation}.journal/", start_after=after):
            number = int(self._name(item["Key"]).rsplit("/", 1)[1].split(".")[0])
            body, tag = self.read_tagged(self._name(item["Key"]))
            if tag is None:  # compacted away while listed: the caller reads the new generation
                break
            data.append(body)
            position = number
        return b"".join(data), position

    def journal_append(self, generation: int, position: int, data: bytes) -> bool:
        """Creates commit number ``position + 1``; False when another writer created it first."""
        return self.create(self._journal_key(generation, position + 1), data)

    def journal_bytes(self, generation: int) -> bytes:
        return b"".join(self.read(name) for name in self.list(f"manifest.{generation}.journal"))

    def journal_delete(self, generation: int) -> None:
        self.delete_prefix(f"manifest.{generation}.journal")

    def journal_exists(self) -> bool:
        return bool(self.journal_generations())

    # the writer's lock: a lease object
    def lock_acquire(self, timeout: float) -> bool:
        lease = _LEASES.get(self.url)
        if lease is None:
            self.check_conditional_writes()
            lease = _Lease(self)
            if not lease.acquire(timeout):
                return False
            _LEASES[self.url] = lease
        lease.holds += 1
        return True

    def lock_release(self) -> None:
        lease = _LEASES[self.url]
        lease.holds -= 1
        if lease.holds == 0:
            del _LEASES[self.url]
            lease.release()

    def lease_lost(self) -> str | None:
        lease = _LEASES.get(self.url)
        return lease.lost if lease else None

    def holder(self) -> str:
        data, _ = self.read_tagged(LOCK)
        return describe_holder(data)


class _Lease:
    """The writer's lease on an object store: the object ``.lock`` (holder, host, expiry), created only if absent,
    renewed every third of its life with ``If-Match`` on the ETag this holder wrote, and taken over by another
    writer only once expired (with ``If-Match`` on the expired one's ETag: of two takers, one wins)."""

    def __init__(self, files: ObjectFiles):
        self.files, self.tag, self.holds, self.lost = files, None, 0, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({**holder_record(), "expires": time.time() + LEASE_SECONDS}).encode()

    def _put(self, tag) -> bool:
        new_tag = self.files.put_if(LOCK, self._record(), tag)
        if new_tag is None:
            return False
        self.tag = new_tag
        return True

    def acquire(self, timeout: float) -> bool:
        start = time.monotonic()
        while True:
            data, tag = self.files.read_tagged(LOCK)
            if tag is None or json.loads(data).get("expires", 0) < time.time():
                if self._put(tag):
                    break
            if 0 <= timeout <= time.monotonic() - start:
                return False
            time.sleep(min(1.0, LEASE_SECONDS / 10))
        self._thread = threading.Thread(target=self._renew, daemon=True, name="store-lease")
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                if not self._put(self.tag):
                    self.lost = "another writer took the lease over"
                    return
            except Exception as err:  # the service is unreachable: the lease may expire
                self.lost = f"the lease could not be renewed ({type(err).__name__})"

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.lost is None and self.files.tag(LOCK) == self.tag:
            self.files.delete(LOCK)
