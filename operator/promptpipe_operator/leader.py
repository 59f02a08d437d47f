"""Leader election on a coordination.k8s.io Lease, so several operator replicas are safe.

Only the replica holding the Lease runs kopf at all; the others wait, watching the
Lease. A leader that cannot renew in time stops and exits non-zero (its pod restarts
as a follower), as controller-runtime's managers do; one that is stopped releases
the Lease, so a follower takes over at once rather than after the lease expires.
Uses the official client's LeaderElection, with our Lease lock (`leaselock.py`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable

from kubernetes import client
from kubernetes.leaderelection import electionconfig, leaderelection

from promptpipe_operator.leaselock import LeaseLock
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
    lock = LeaseLock(settings.lease_name, settings.lease_namespace, identity)
    stop, lost = threading.Event(), threading.Event()
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
    election.acquire()
    LEADER.set(1)
    log.info("leading", extra={"lease": settings.lease_name, "identity": identity})

    def renew() -> None:
        if not _renew_until(election, settings, stop):
            log.error("lost the lease; stopping", extra={"lease": settings.lease_name})
            lost.set()
            os.kill(os.getpid(), signal.SIGTERM)

    renewer = threading.Thread(target=renew, name="lease-renewer", daemon=True)
    renewer.start()
    try:
        run()
    finally:
        stop.set()
        renewer.join(timeout=settings.lease_retry_seconds * 2 + 1)
        LEADER.set(0)
        if not lost.is_set():
            _release(settings, identity)
    return 1 if lost.is_set() else 0


def _renew_until(election: leaderelection.LeaderElection, settings: OperatorSettings, stop: threading.Event) -> bool:
    """Renew every retry period until `stop` (True) or until a renewal fails for renew_deadline (False).

    The client's own renew_loop (kubernetes 36) cannot be stopped from outside."""
    last_renewed = time.monotonic()
    while not stop.wait(settings.lease_retry_seconds):
        if election.try_acquire_or_renew():
            last_renewed = time.monotonic()
        elif time.monotonic() - last_renewed > settings.lease_renew_deadline_seconds:
            return False
    return True


def _release(settings: OperatorSettings, identity: str) -> None:
    """Hand the Lease over now instead of letting it expire."""
    api = client.CoordinationV1Api()
    try:
        lease = api.read_namespaced_lease(settings.lease_name, settings.lease_namespace)
        if lease.spec is not None and lease.spec.holder_identity == identity:
            lease.spec.holder_identity = None
            api.replace_namespaced_lease(settings.lease_name, settings.lease_namespace, lease)
            log.info("released the lease", extra={"lease": settings.lease_name})
    except client.ApiException as err:
        log.warning("could not release the lease: %s", err.reason)
