"""A coordination.k8s.io Lease as the resource lock of the official client's LeaderElection.

kubernetes 36.x (pinned: 37 needs a python-dateutil that botocore refuses) ships only
a ConfigMap lock. This one keeps the same three-method interface (get/create/update)
and uses the Lease's resourceVersion, so two candidates can never both win an update.
"""

from __future__ import annotations

import datetime as dt
import json

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

from promptpipe.contract.timestamps import parse_time


def _time(text: str | None) -> dt.datetime | None:
    # The elector writes str(datetime.fromtimestamp(...)): local, naive.
    return parse_time(text)


def _text(value: dt.datetime | None) -> str | None:
    return str(value.astimezone().replace(tzinfo=None)) if value else None


def _failure(status: int, reason: str) -> ApiException:
    """A failed read as the elector reads it: it parses the body as JSON for its `code` (404: create the
    Lease), which a proxy's HTML page or a reset connection would not give it."""
    err = ApiException(status=status, reason=reason)
    err.body = json.dumps({"code": status, "message": reason})
    return err


class LeaseLock:
    """Every call is bounded by `timeout_seconds`, and any failure (a refusal, a reset or stalled
    connection, an answer that is not JSON) is a failed attempt, never an exception out of the elector."""

    def __init__(self, name: str, namespace: str, identity: str, timeout_seconds: float) -> None:
        self.name, self.namespace, self.identity = name, namespace, identity
        self._api = client.CoordinationV1Api()
        self._lease: client.V1Lease | None = None
        self._timeout = (timeout_seconds, timeout_seconds)

    def get(self, name: str, namespace: str) -> tuple[bool, LeaderElectionRecord | ApiException | None]:
        try:
            self._lease = self._api.read_namespaced_lease(name, namespace, _request_timeout=self._timeout)
        except ApiException as e:
            return False, _failure(e.status or 0, str(e.reason))
        except Exception as e:  # noqa: BLE001 - the elector takes (False, error) as "try again"
            return False, _failure(0, f"{type(e).__name__}: {e}")
        spec = self._lease.spec
        if spec is None:
            return True, None
        duration = str(spec.lease_duration_seconds) if spec.lease_duration_seconds else None
        return True, LeaderElectionRecord(
            spec.holder_identity, duration, _text(spec.acquire_time), _text(spec.renew_time)
        )

    def _spec(self, record: LeaderElectionRecord, transitions: int) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=record.holder_identity,
            lease_duration_seconds=int(record.lease_duration),
            acquire_time=_time(record.acquire_time),
            renew_time=_time(record.renew_time),
            lease_transitions=transitions,
        )

    def create(self, name: str, namespace: str, election_record: LeaderElectionRecord) -> bool:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace), spec=self._spec(election_record, 0)
        )
        try:
            self._lease = self._api.create_namespaced_lease(namespace, body, _request_timeout=self._timeout)
        except Exception:  # noqa: BLE001 - not created, whatever the reason: the elector tries again
            return False
        return True

    def update(self, name: str, namespace: str, updated_record: LeaderElectionRecord) -> bool:
        if self._lease is None:
            return False
        old = self._lease.spec
        transitions = (old.lease_transitions or 0) if old else 0
        if old is None or old.holder_identity != updated_record.holder_identity:
            transitions += 1
        self._lease.spec = self._spec(updated_record, transitions)
        try:  # carries the resourceVersion read by get(): a concurrent writer makes this a 409
            self._lease = self._api.replace_namespaced_lease(
                name, namespace, self._lease, _request_timeout=self._timeout
            )
        except Exception:  # noqa: BLE001 - not renewed, whatever the reason: the elector tries again
            return False
        return True
