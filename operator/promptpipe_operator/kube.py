"""The operator's calls to the API server, and nothing else (blocking; called from a worker thread)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError, UnprocessibleEntityError
from kubernetes.dynamic.resource import Resource
from urllib3.util.retry import Retry

from promptpipe.contract.labels import MANAGER
from promptpipe.contract.spec import API_VERSION, KIND
from promptpipe_operator import pods
from promptpipe_operator.render import KubeObject

# What a pipeline owns, as (apiVersion, kind): listed to find children and strays.
CHILD_KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("policy/v1", "PodDisruptionBudget"),
)
ChildKey = tuple[str, str]  # (kind, name)


# How long the cluster's service-account keys are taken as they were (every pipeline's resync copies them).
ISSUER_KEYS_SECONDS = 60.0


class KindNotServed(Exception):
    """The API server does not serve a kind the pipeline needs (KEDA's CRDs not installed)."""

    def __init__(self, api_version: str, kind: str) -> None:
        super().__init__(f"the API server does not serve {kind} ({api_version})")
        self.api_version, self.kind = api_version, kind


def api_client() -> client.ApiClient:
    """The client of the loaded configuration, whose calls end within their timeout: urllib3 retries a
    timed-out read three times by default, so a stalled API server held a call four timeouts long. A
    connection that fails to open is still retried; a reconcile that fails is requeued."""
    configuration = client.Configuration.get_default_copy()
    configuration.retries = Retry(total=3, connect=3, read=0, redirect=0, status=0, other=0)
    return client.ApiClient(configuration)


class Kube:
    def __init__(
        self,
        api: client.ApiClient,
        workers: int = 4,
        timeout_seconds: float = 10.0,
        may_write: Callable[[], None] = lambda: None,
    ) -> None:
        # A discovery cache of our own: the shared default in /tmp may describe another cluster.
        fd, self._cache = tempfile.mkstemp(prefix="promptpipe-discovery-", suffix=".json")
        os.close(fd)
        os.unlink(self._cache)
        self._dyn = DynamicClient(api, cache_file=self._cache)
        self._issuer_keys: tuple[float, str] | None = None
        self._api_server: tuple[float, list[tuple[str, int]]] | None = None
        # Children are applied a few at a time: each apply is a round trip the API server can overlap.
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="apply")
        # (connect, read): a stalled connection fails its call instead of holding a thread for ever.
        self._timeout = (timeout_seconds, timeout_seconds)
        self._may_write = may_write  # raises when this replica must not write (leader/write_fence.py)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if os.path.exists(self._cache):
            os.unlink(self._cache)

    def _resource(self, api_version: str, kind: str) -> Resource:
        try:
            found: Resource = self._dyn.resources.get(api_version=api_version, kind=kind)
            return found
        except ResourceNotFoundError:
            # Installed since we last looked? Ask again once before giving up.
            self._dyn.resources.invalidate_cache()
            try:
                again: Resource = self._dyn.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                raise KindNotServed(api_version, kind) from None
            return again

    def issuer_keys(self) -> str:
        """The cluster's service-account issuer and its public keys, as the stages read them
        ({"issuer": ..., "keys": [JWK, ...]}); asked again at most once a minute."""
        now = time.monotonic()
        if self._issuer_keys is not None and now - self._issuer_keys[0] < ISSUER_KEYS_SECONDS:
            return self._issuer_keys[1]
        # Raw JSON (the typed clients hand back a Python repr of these); failures are DynamicApiErrors.
        config = self._dyn.request("GET", "/.well-known/openid-configuration", serialize=False, **self._timeouts())
        jwks = self._dyn.request(
            "GET",
            "/openid/v1/jwks",
            serialize=False,
            header_params={"Accept": "application/jwk-set+json"},  # the one representation it serves
            **self._timeouts(),
        )
        issuer, keys = json.loads(config.data)["issuer"], json.loads(jwks.data)["keys"]
        document = json.dumps({"issuer": issuer, "keys": keys}, sort_keys=True)
        self._issuer_keys = (now, document)
        return document

    def api_server(self) -> list[tuple[str, int]]:
        """The API server's endpoints (address, port) as its `kubernetes` Service in `default` leads to
        them, which the API server itself keeps; asked again at most once a minute."""
        now = time.monotonic()
        if self._api_server is not None and now - self._api_server[0] < ISSUER_KEYS_SECONDS:
            return self._api_server[1]
        # The slice kept for the API server's own Service: read by name (the operator may `get` no other).
        # None (a control plane without the controller that mirrors it): no address to open.
        try:
            item = (
                self._resource("discovery.k8s.io/v1", "EndpointSlice")
                .get(name="kubernetes", namespace="default", **self._timeouts())
                .to_dict()
            )
        except NotFoundError:
            item = {}
        found = sorted(
            {
                (address, int(port["port"]))
                for endpoint in item.get("endpoints") or []
                for address in endpoint.get("addresses") or []
                for port in item.get("ports") or []
                if port.get("port")
            }
        )
        self._api_server = (now, found)
        return found

    def _timeouts(self) -> dict[str, Any]:
        return {"_request_timeout": self._timeout}

    def get_pipeline(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = (
                self._resource(API_VERSION, KIND)
                .get(name=name, namespace=namespace, _request_timeout=self._timeout)
                .to_dict()
            )
        except NotFoundError:
            return None
        return obj

    def patch_pipeline_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> dict[str, Any]:
        """Merge-patch the status; with `resource_version`, only if the pipeline is still that version (409
        otherwise: someone wrote since it was read, and the status would describe what is no longer so)."""
        self._may_write()
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        written: dict[str, Any] = (
            self._resource(API_VERSION, KIND)
            .status.patch(
                body=body,
                name=name,
                namespace=namespace,
                content_type="application/merge-patch+json",
                _request_timeout=self._timeout,
            )
            .to_dict()
        )
        return written

    def apply(self, obj: KubeObject) -> dict[str, Any]:
        """Server-side apply, taking back fields someone else changed (drift is repaired, not merged)."""
        meta = obj["metadata"]
        res = self._resource(obj["apiVersion"], obj["kind"])

        def apply() -> dict[str, Any]:
            self._may_write()
            done: dict[str, Any] = self._dyn.server_side_apply(
                res,
                body=obj,
                name=meta["name"],
                namespace=meta["namespace"],
                field_manager=MANAGER,
                force_conflicts=True,
                _request_timeout=self._timeout,
            ).to_dict()
            return done

        try:
            return apply()
        except UnprocessibleEntityError as err:
            if obj["kind"] != "Service" or "spec.clusterIP" not in str(err.body):
                raise
        # A Service's clusterIP cannot change in place (a stage's ClusterIP Service from before the stages
        # called each other through headless ones): replace it.
        self.delete(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return apply()

    def apply_each(self, objects: list[KubeObject]) -> list[dict[str, Any] | Exception]:
        """`apply` each, concurrently; in order, each one's result or what it failed with."""
        for obj in objects:  # discovery once, before the threads share its cache
            self._resource(obj["apiVersion"], obj["kind"])

        def attempt(obj: KubeObject) -> dict[str, Any] | Exception:
            try:
                return self.apply(obj)
            except Exception as err:  # noqa: BLE001 - handed back with the others' results
                return err

        return list(self._pool.map(attempt, objects))

    def owned(self, namespace: str, owner_uid: str, selector: str) -> dict[ChildKey, dict[str, Any]]:
        """The children, by kind and name, of the owner with this uid (among objects matching `selector`)."""
        out: dict[ChildKey, dict[str, Any]] = {}
        for api_version, kind in CHILD_KINDS:
            try:
                items = (
                    self._resource(api_version, kind)
                    .get(namespace=namespace, label_selector=selector, _request_timeout=self._timeout)
                    .items
                )
            except KindNotServed:
                continue
            for item in items:
                obj = item.to_dict()
                refs = obj["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == owner_uid and r.get("controller") for r in refs):
                    out[(kind, obj["metadata"]["name"])] = obj
        return out

    def strangers(self, namespace: str, owner_uid: str, objects: list[KubeObject]) -> list[ChildKey]:
        """Of `objects`, the ones that exist already without the owner's controller reference: another's
        objects of the same name, which an apply would take over."""

        def taken(obj: KubeObject) -> bool:
            # Listed by name rather than read: the operator may list its kinds, not get them one by one.
            res = self._resource(obj["apiVersion"], obj["kind"])
            named = f"metadata.name={obj['metadata']['name']}"
            found = res.get(namespace=namespace, field_selector=named, _request_timeout=self._timeout).items
            if not found:
                return False
            refs = found[0].to_dict()["metadata"].get("ownerReferences") or []
            return not any(r.get("uid") == owner_uid and r.get("controller") for r in refs)

        for obj in objects:  # discovery once, before the threads share its cache
            self._resource(obj["apiVersion"], obj["kind"])
        return [
            (o["kind"], o["metadata"]["name"])
            for o, t in zip(objects, self._pool.map(taken, objects), strict=True)
            if t
        ]

    def _listed(self, api_version: str, kind: str, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        return [
            item.to_dict()
            for item in self._resource(api_version, kind)
            .get(namespace=namespace, label_selector=selector, _request_timeout=self._timeout)
            .items
        ]

    def pods_of(self, namespace: str, deployment: dict[str, Any]) -> list[dict[str, Any]]:
        """A Deployment's pods by ownership (Deployment → ReplicaSet → Pod), not by its labels, which anyone
        who may create pods in the namespace can copy onto a pod of their own."""
        labels = deployment["spec"]["selector"]["matchLabels"]
        sets = pods.controlled_by(
            self._listed("apps/v1", "ReplicaSet", namespace, labels), {deployment["metadata"]["uid"]}
        )
        return pods.controlled_by(self._listed("v1", "Pod", namespace, labels), {rs["metadata"]["uid"] for rs in sets})

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self._may_write()
        with contextlib.suppress(NotFoundError):  # gone already: what we wanted
            self._resource(api_version, kind).delete(name=name, namespace=namespace, _request_timeout=self._timeout)
