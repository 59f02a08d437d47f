"""One HTTP request with a total deadline, a cap on the bytes read, and no redirect followed.

For the calls the operator (and the CLI) make to servers a pipeline's author controls: a backend's smoke
generation, a gateway pod's metrics, a Prometheus. urllib's `timeout` bounds each socket operation, not the
request, so a server that drips a byte a second holds its caller for ever; its opener follows redirects to
wherever they point, and reads whatever length it is sent. Here a timer closes the connection at the
deadline whatever it is blocked on, the body is read in pieces up to `max_bytes`, and a 3xx is an answer
like any other. Standard library only: both deployables import it.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
import urllib.parse
from dataclasses import dataclass

CHUNK_BYTES = 64 * 1024


class HttpFailure(Exception):
    """The request did not get a whole answer: the message says why, never what the server sent."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def request(
    url: str,
    *,
    deadline_seconds: float,
    max_bytes: int,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """The status and whole body of one request to `url` (http or https), within `deadline_seconds` from now."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpFailure(f"not an http(s) URL: {url}")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=deadline_seconds)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(2)  # wakes a blocked read or write at once
        connection.close()

    timer = threading.Timer(deadline_seconds, cut)
    timer.daemon = True
    started = time.monotonic()
    timer.start()
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise HttpFailure(f"the answer is larger than {max_bytes} bytes")
        pieces: list[bytes] = []
        size = 0
        while piece := response.read(CHUNK_BYTES):
            size += len(piece)
            if size > max_bytes:
                raise HttpFailure(f"the answer is larger than {max_bytes} bytes")
            pieces.append(piece)
        if expired.is_set():
            raise HttpFailure(f"no whole answer within {deadline_seconds:g} s")
        return Answer(response.status, b"".join(pieces))
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or time.monotonic() - started >= deadline_seconds:
            raise HttpFailure(f"no whole answer within {deadline_seconds:g} s") from None
        # An OSError says what the socket met (refused, reset); an HTTPException may quote the server's bytes.
        why = str(exc) if isinstance(exc, OSError) else f"not an HTTP answer ({type(exc).__name__})"
        raise HttpFailure(why) from None
    finally:
        timer.cancel()
        connection.close()
