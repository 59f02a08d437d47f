"""`promptpipe-operator`: run the operator (kopf) with its settings from the environment."""

from __future__ import annotations

import kopf

from promptpipe_operator.settings import OperatorSettings


def main() -> None:
    settings = OperatorSettings()
    kopf.configure(log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    import promptpipe_operator.handlers  # noqa: F401, PLC0415 - registers the handlers with kopf

    # Standalone: one replica acts; running two safely is the chart's business (peering).
    kopf.run(clusterwide=not settings.namespaces, namespaces=settings.namespaces, standalone=True,
             liveness_endpoint=settings.liveness_endpoint or None)


if __name__ == "__main__":
    main()
