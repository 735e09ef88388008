"""An S3 API on 127.0.0.1 for `make s3-test` and `make cluster-test`: moto's server application, served as
`moto_server` serves it, in its own process, with a count of the object reads it answers (``GET /_counts``;
``DELETE /_counts`` starts a new count). ``Server`` starts one and stops it by its PID.

``--no-conditional-writes`` makes it a service that ignores ``If-Match`` and ``If-None-Match``, as some S3-compatible
services do: the store must refuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

COUNTS = "/_counts"
ROOT = Path(__file__).resolve().parents[1]


class Counted:
    """WSGI middleware: object GETs (ranged and whole), their response bytes, and every request."""

    def __init__(self, app, conditional_writes: bool):
        self.app, self.conditional_writes = app, conditional_writes
        self.guard = threading.Lock()
        self.counts = self.zero()

    @staticmethod
    def zero() -> dict:
        return {"requests": 0, "object_gets": 0, "ranged_gets": 0, "bytes_read": 0}

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == COUNTS:
            with self.guard:
                body = json.dumps(self.counts).encode()
                if environ["REQUEST_METHOD"] == "DELETE":
                    self.counts = self.zero()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if not self.conditional_writes:
            environ.pop("HTTP_IF_MATCH", None)
            environ.pop("HTTP_IF_NONE_MATCH", None)
        body = b"".join(self.app(environ, start_response))
        is_object_get = (environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"].strip("/").count("/") >= 1
                         and "list-type" not in environ.get("QUERY_STRING", ""))
        with self.guard:
            self.counts["requests"] += 1
            if is_object_get:
                self.counts["object_gets"] += 1
                self.counts["ranged_gets"] += "HTTP_RANGE" in environ
                self.counts["bytes_read"] += len(body)
        return [body]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """This module's server in its own session, on a free port of 127.0.0.1; stopped by its PID."""

    def __init__(self, folder: Path, *args: str):
        """Starts a server logging into ``folder``; ``args``: this module's options."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / f"s3-{self.port}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.s3_server", "--port", str(self.port), *args],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.counts()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the S3 server exited:\n{self.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError("the S3 server did not start in 60 s")
                time.sleep(0.2)

    def counts(self, reset: bool = False) -> dict:
        request = urllib.request.Request(f"{self.url}/_counts", method="DELETE" if reset else "GET")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def main() -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-conditional-writes", action="store_true")
    args = parser.parse_args()
    app = Counted(DomainDispatcherApplication(create_backend_app), not args.no_conditional_writes)
    make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


if __name__ == "__main__":
    main()
