"""The backend's replicas on a cluster: the ready pods behind its Service, from the Service's EndpointSlices,
watched so a pod that comes or goes is in or out of the ring within a second.

EndpointSlices rather than DNS A records of a headless Service: a watch sends each change as it happens,
while DNS answers are cached (kubeadm's CoreDNS caches them 30 s), and the blue-green switch, which moves the
backend Service's selector from one color's pods to the other's, must move every call at once, not 30 s
later. A slice also says which pods are ready; a terminating one leaves before it stops. The price is one
read-only Role (list and watch EndpointSlices in the pipeline's namespace) for the inference pods. Only the
slices the EndpointSlice controller wrote count: a look-alike slice labelled with the Service's name is not
a replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import client, config, watch

from promptpipe.contract.runtime_config import BackendPods

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Which controller wrote a slice. Anyone who may create EndpointSlices in the namespace can label one with
# the backend Service's name and point the inference stage's calls (and the prompts in them) at a pod of
# their own: only the slices Kubernetes' own controller wrote for the Service are its replicas.
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
ENDPOINTSLICE_CONTROLLER = "endpointslice-controller.k8s.io"
WATCH_SECONDS = 240  # a watch is renewed this often (and on any error), listing afresh
RETRY_SECONDS = 2.0
REQUEST_TIMEOUT_SECONDS = 10.0


def replica_urls(slices: Iterable[Mapping[str, Any]], port_name: str, scheme: str) -> list[str]:
    """Each ready address, with the port of that name, as a URL; sorted, each once. `ready` left unset
    means ready (the API's own rule)."""
    urls: set[str] = set()
    for piece in slices:
        port = next((p.get("port") for p in piece.get("ports") or [] if p.get("name") == port_name), None)
        if port is None:
            continue
        for endpoint in piece.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if ":" in address else address
                urls.add(f"{scheme}://{host}:{port}")
    return sorted(urls)


class EndpointSliceWatch:
    """Lists and watches one Service's EndpointSlices on a thread (the official client is synchronous), and
    hands each new set of replica URLs to `on_change` on the event loop."""

    def __init__(self, source: BackendPods, on_change: Callable[[list[str]], None]) -> None:
        self._source = source
        self._on_change = on_change
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: list[str] | None = None
        self._watch: Any = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._run, name="endpointslices", daemon=True).start()

    async def close(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _publish(self, slices: Mapping[str, Mapping[str, Any]]) -> None:
        urls = replica_urls(slices.values(), self._source.port, self._source.scheme)
        if urls != self._last and self._loop is not None and not self._stop.is_set():
            self._last = urls
            self._loop.call_soon_threadsafe(self._on_change, urls)

    def _run(self) -> None:
        source = self._source
        selector = f"{SERVICE_NAME_LABEL}={source.service},{MANAGED_BY_LABEL}={ENDPOINTSLICE_CONTROLLER}"
        while not self._stop.is_set():
            try:
                config.load_config()  # in a pod, its service account; elsewhere, KUBECONFIG
                api = client.DiscoveryV1Api()
                plain = client.ApiClient().sanitize_for_serialization
                listed = api.list_namespaced_endpoint_slice(
                    source.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT_SECONDS
                )
                slices = {item.metadata.name: plain(item) for item in listed.items}
                self._publish(slices)
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    api.list_namespaced_endpoint_slice,
                    source.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=WATCH_SECONDS,
                    _request_timeout=WATCH_SECONDS + REQUEST_TIMEOUT_SECONDS,
                ):
                    if self._stop.is_set():
                        return
                    kind, item = event["type"], event["object"]
                    if kind == "ERROR":  # expired: list afresh
                        break
                    name = item.metadata.name
                    if kind == "DELETED":
                        slices.pop(name, None)
                    else:
                        slices[name] = plain(item)
                    self._publish(slices)
            except Exception as err:  # noqa: BLE001 - keep watching; the replicas known so far still serve
                log.warning("watching the %s Service's EndpointSlices: %s", source.service, err)
                self._stop.wait(RETRY_SECONDS)
