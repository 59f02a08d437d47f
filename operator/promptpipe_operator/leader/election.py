"""Leader election on a coordination.k8s.io Lease, so several operator replicas are safe.

Only the replica holding the Lease runs kopf at all; the others wait, watching the
Lease. A leader that cannot renew in time stops and exits non-zero (its pod restarts
as a follower), as controller-runtime's managers do: any failure to renew counts (a
refusal, a reset or stalled connection: every call has a timeout), its writes stop at
once (`write_fence.py`: each write checks that the last renewal is within the renew
deadline), and if kopf does not stop within the lease's duration the process exits
regardless. One that is stopped releases the Lease, so a follower takes over at once
rather than after the lease expires. Uses the official client's LeaderElection, with
our Lease lock (`lease_lock.py`).
"""

from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable

from kubernetes import client
from kubernetes.leaderelection import electionconfig, leaderelection

from promptpipe_operator.leader.lease_lock import LeaseLock
from promptpipe_operator.leader.write_fence import LEADERSHIP
from promptpipe_operator.metrics import LEADER
from promptpipe_operator.settings import OperatorSettings

log = logging.getLogger("promptpipe.operator")


def lead(settings: OperatorSettings, run: Callable[[], None]) -> int:
    """Wait for the Lease, then `run()` while renewing it. 0 after a normal stop, 1 if the Lease was lost.

    `run` must return on SIGTERM (kopf does): losing the Lease stops it that way, because a
    thread-based stop flag would leave kopf's executor waiting on it at shutdown."""
    # The library logs every unsuccessful attempt at INFO: a follower would log every retry period.
    logging.getLogger("leaderelection").setLevel(logging.WARNING)
    identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    # A renewal attempt may take at most a retry period: a stalled one must not outlast the deadline.
    lock = LeaseLock(settings.lease_name, settings.lease_namespace, identity, settings.lease_retry_seconds)
    stop, lost, stopped = threading.Event(), threading.Event(), threading.Event()
    election = leaderelection.LeaderElection(
        electionconfig.Config(
            lock,
            lease_duration=settings.lease_seconds,
            renew_deadline=settings.lease_renew_deadline_seconds,
            retry_period=settings.lease_retry_seconds,
            onstarted_leading=lambda: None,
            onstopped_leading=lambda: None,
        )
    )
    log.info("waiting to lead", extra={"lease": settings.lease_name, "identity": identity})
    # While following, kopf does not run, so neither does its liveness endpoint: answer it here.
    follower = _follower_liveness(settings.liveness_endpoint)
    election.acquire()
    if follower is not None:
        follower.shutdown()
        follower.server_close()
    LEADERSHIP.elect(settings.lease_renew_deadline_seconds)
    LEADERSHIP.renewed()
    LEADER.set(1)
    log.info("leading", extra={"lease": settings.lease_name, "identity": identity})

    def renew() -> None:
        if not _renew_until(election, settings, stop):
            LEADERSHIP.lose()  # no write leaves this process from now on
            log.error("lost the lease; stopping", extra={"lease": settings.lease_name})
            lost.set()
            os.kill(os.getpid(), signal.SIGTERM)
            # kopf stops on SIGTERM; if something holds it (a call on a stalled connection), exit anyway.
            if not stopped.wait(settings.lease_seconds):
                log.error("did not stop within the lease's duration; exiting", extra={"lease": settings.lease_name})
                os._exit(1)

    renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        run()
    finally:
        stopped.set()
        stop.set()
        renewer.join(timeout=settings.lease_retry_seconds * 2 + 1)
        LEADER.set(0)
        if not lost.is_set():
            _release(settings, identity)
    return 1 if lost.is_set() else 0


def _follower_liveness(endpoint: str) -> http.server.HTTPServer | None:
    """Serve `endpoint` with 200 while this replica follows (kopf serves it once it leads)."""
    if not endpoint:
        return None
    parts = urllib.parse.urlsplit(endpoint)

    class Following(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == (parts.path or "/")
            self.send_response(200 if found else 404)
            self.end_headers()
            if found:
                self.wfile.write(b'{"following": true}')

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer((parts.hostname or "0.0.0.0", parts.port or 80), Following)  # noqa: S104
    threading.Thread(target=server.serve_forever, name="follower-liveness", daemon=True).start()
    return server


def _renew_until(election: leaderelection.LeaderElection, settings: OperatorSettings, stop: threading.Event) -> bool:
    """Renew every retry period until `stop` (True) or until a renewal fails for renew_deadline (False).

    The client's own renew_loop (kubernetes 36) cannot be stopped from outside."""
    last_renewed = time.monotonic()
    while not stop.wait(settings.lease_retry_seconds):
        try:
            renewed = election.try_acquire_or_renew()
        except Exception:  # any failure is a failed renewal, never the end of this thread
            log.warning("renewing the lease failed", exc_info=True, extra={"lease": settings.lease_name})
            renewed = False
        if renewed:
            last_renewed = time.monotonic()
            LEADERSHIP.renewed()
        elif time.monotonic() - last_renewed > settings.lease_renew_deadline_seconds:
            return False
    return True


def _release(settings: OperatorSettings, identity: str) -> None:
    """Hand the Lease over now instead of letting it expire."""
    api = client.CoordinationV1Api()
    timeout = (settings.lease_retry_seconds, settings.lease_retry_seconds)
    try:
        lease = api.read_namespaced_lease(settings.lease_name, settings.lease_namespace, _request_timeout=timeout)
        if lease.spec is not None and lease.spec.holder_identity == identity:
            lease.spec.holder_identity = None
            api.replace_namespaced_lease(settings.lease_name, settings.lease_namespace, lease, _request_timeout=timeout)
            log.info("released the lease", extra={"lease": settings.lease_name})
    except Exception as err:  # noqa: BLE001 - it expires on its own
        log.warning("could not release the lease: %s", err)
