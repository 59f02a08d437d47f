"""`promptpipe-operator`: run the operator (kopf) with its settings from the environment."""

from __future__ import annotations

import sys

import kopf
from kubernetes import config
from prometheus_client import start_http_server

from promptpipe_operator.metrics import LEADER
from promptpipe_operator.settings import OperatorSettings


def run_kopf(settings: OperatorSettings) -> None:
    import promptpipe_operator.handlers  # noqa: F401, PLC0415 - registers the handlers with kopf

    # Standalone: kopf's peering is not used; with several replicas, leader election decides.
    kopf.run(clusterwide=not settings.namespaces, namespaces=settings.namespaces, standalone=True,
             liveness_endpoint=settings.liveness_endpoint or None)


def main() -> None:
    settings = OperatorSettings()
    kopf.configure(log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    # Served by followers too: they are alive, and say they do not lead.
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    if not settings.leader_election:
        LEADER.set(1)
        run_kopf(settings)
        return
    from promptpipe_operator.leader import lead  # noqa: PLC0415

    config.load_config()
    sys.exit(lead(settings, lambda: run_kopf(settings)))


if __name__ == "__main__":
    main()
