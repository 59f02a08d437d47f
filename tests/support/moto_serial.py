"""moto's standalone server, with DynamoDB's transaction isolation.

moto applies a TransactWriteItems one item at a time and, when a condition fails, puts back a copy of
the whole table taken when the transaction began: a transaction committed by another thread in between
is wiped. DynamoDB serializes conflicting transactions, so here DynamoDB requests take turns (S3 stays
concurrent). Run as `python moto_serial.py HOST PORT`.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def dynamodb_in_turn(app: Wsgi) -> Wsgi:
    lock = threading.Lock()

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not str(environ.get("HTTP_X_AMZ_TARGET", "")).startswith("DynamoDB_"):
            return app(environ, start_response)
        with lock:  # the whole answer is made inside the turn
            return list(app(environ, start_response))

    return serve


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))  # as moto.server does: moto builds some URLs with it
    app = dynamodb_in_turn(DomainDispatcherApplication(create_backend_app))
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
