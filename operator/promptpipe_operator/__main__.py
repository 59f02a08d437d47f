"""`promptpipe-operator`: run the operator (kopf) with its settings from the environment."""

from __future__ import annotations

import argparse
import importlib
import json
import socket
import sys
from typing import Any, cast

import kopf
from kubernetes import config
from prometheus_client import start_http_server

from promptpipe import __version__
from promptpipe.registry.settings import RegistrySettings
from promptpipe_operator.metrics import LEADER
from promptpipe_operator.settings import OperatorSettings


def run_kopf(settings: OperatorSettings) -> None:
    importlib.import_module("promptpipe_operator.handlers")  # registers the handlers with kopf

    # Standalone: kopf's peering is not used; with several replicas, leader election decides.
    kopf.run(
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=True,
        liveness_endpoint=settings.liveness_endpoint or None,
        # Named here: kopf would ask getpass, which fails for a uid without a passwd entry (our images' 10001).
        identity=cast(Any, socket.gethostname()),  # kopf's Identity is a NewType of str it does not export
    )


def _arguments() -> argparse.Namespace:
    fields = "\n".join(
        f"  PROMPTPIPE_OPERATOR_{name.upper()}: {info.description or ''}".rstrip()
        for name, info in OperatorSettings.model_fields.items()
    )
    parser = argparse.ArgumentParser(
        prog="promptpipe-operator",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reconciles PromptPipelines into stage Deployments, Services, ScaledObjects and TGI backends.",
        epilog=f"Settings come from the environment:\n{fields}\n  PROMPTPIPE_REGISTRY_*: the model registry",
    )
    parser.add_argument("--version", action="version", version=f"promptpipe-operator {__version__}")
    parser.add_argument(
        "--check", action="store_true", help="import the handlers, read the settings, print them as JSON and exit"
    )
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    settings = OperatorSettings()
    if args.check:
        importlib.import_module("promptpipe_operator.handlers")
        print(
            json.dumps(
                {"operator": settings.model_dump(mode="json"), "registry": RegistrySettings().model_dump(mode="json")}
            )
        )
        return
    kopf.configure(log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    # Served by followers too: they are alive, and say they do not lead.
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    if not settings.leader_election:
        LEADER.set(1)
        run_kopf(settings)
        return
    from promptpipe_operator.leader.election import lead  # noqa: PLC0415 - kubernetes' leader election only when used

    config.load_config()
    sys.exit(lead(settings, lambda: run_kopf(settings)))


if __name__ == "__main__":
    main()
