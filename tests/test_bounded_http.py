"""Requests to servers a pipeline's author controls: a total deadline however the server drips, a cap on
what is read, no redirect followed, and nothing the server sent told back (the operator's rollout checks
put their reasons into status and Events). Against a real HTTP server on loopback, hostile in each way."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from promptpipe import bounded_http, promql
from promptpipe.contract.spec import PipelineSpec
from promptpipe_operator import rollout_checks

SECRET = b"TOKEN-FROM-THE-POD"


def serve(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A server that reads a request's head and answers with `answer`, for every connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            with contextlib.suppress(OSError):
                answer(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def drips(conn: socket.socket) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + SECRET * 10:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def floods(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # no length: read until the server closes, which it never does
    block = SECRET * 4096
    for _ in range(1 << 20):  # 72 GiB, were it all read
        conn.sendall(block)


def redirects(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: http://10.6.6.6/steal\r\nContent-Length: 18\r\n\r\n" + SECRET)


def fails_loudly(conn: socket.socket) -> None:
    body = b'{"error": "' + SECRET + b'"}'
    conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


@pytest.fixture(params=[drips, floods, redirects, fails_loudly], ids=lambda f: f.__name__)
def hostile(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from serve(request.param)


def test_a_request_ends_within_its_deadline_and_reads_at_most_its_cap(hostile: str) -> None:
    started = time.monotonic()
    try:
        answer = bounded_http.request(hostile, deadline_seconds=1.0, max_bytes=1 << 20)
    except bounded_http.HttpFailure as failure:
        assert SECRET.decode() not in str(failure)
    else:
        assert answer.status in (302, 500), "a redirect or an error is an answer, never followed"
    assert time.monotonic() - started < 2.0


def test_the_smoke_check_fails_within_its_timeout_and_tells_nothing_the_pod_sent(hostile: str) -> None:
    spec = PipelineSpec.model_validate(
        {"model": {"name": "m", "backend": "tgi", "tgi": {"gpus": 0}}, "rollout": {"smoke": {"timeout": 1}}}
    )
    started = time.monotonic()
    passed, why = rollout_checks.smoke(hostile, spec, most_seconds=60)
    assert not passed and SECRET.decode() not in why and "10.6.6.6" not in why
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("hostile", [drips], indirect=True, ids=["drips"])
def test_the_smoke_check_never_outlasts_what_the_reconcile_leaves_it(hostile: str) -> None:
    spec = PipelineSpec.model_validate(
        {"model": {"name": "m", "backend": "tgi", "tgi": {"gpus": 0}}, "rollout": {"smoke": {"timeout": 600}}}
    )
    started = time.monotonic()
    passed, why = rollout_checks.smoke(hostile, spec, most_seconds=1.0)
    assert not passed and "within 1 s" in why
    assert time.monotonic() - started < 2.0


def test_a_scrape_leaves_out_a_pod_that_drips_floods_or_redirects(hostile: str) -> None:
    started = time.monotonic()
    assert rollout_checks.scrape({"pod-a": f"{hostile}/metrics"}, "p", timeout=1.0) == {}
    assert time.monotonic() - started < 2.0


def test_a_prometheus_that_misbehaves_is_an_error_naming_no_byte_of_it(hostile: str) -> None:
    with pytest.raises(promql.PrometheusError) as err:
        promql.instant_query(hostile, "up", timeout=1.0)
    assert SECRET.decode() not in str(err.value)
