"""An S3 API on 127.0.0.1 for `make s3-test`: moto's server application, served as `moto_server` serves it, in its own
process, with a count of the object reads it answers (``GET /_counts``; ``DELETE /_counts`` starts a new count).

``--no-conditional-writes`` makes it a service that ignores ``If-Match`` and ``If-None-Match``, as some S3-compatible
services do: the store must refuse it.
"""

from __future__ import annotations

import argparse
import json
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

COUNTS = "/_counts"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-conditional-writes", action="store_true")
    args = parser.parse_args()
    app = Counted(DomainDispatcherApplication(create_backend_app), not args.no_conditional_writes)
    make_server("127.0.0.1", args.port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


if __name__ == "__main__":
    main()
