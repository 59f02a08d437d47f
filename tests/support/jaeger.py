"""A real tracing backend (Jaeger v2, built by `make setup`) on loopback: OTLP in, its query API out."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from promptpipe.localproc import free_port
from tests.devcluster.build import Tools
from tests.support.pipelines import serving_process


@dataclass(frozen=True)
class Jaeger:
    otlp: str  # the OTLP/gRPC endpoint, http://host:port
    query: str  # the query API's base URL

    def traces(self, service: str, limit: int = 200) -> list[dict[str, Any]]:
        """Traces with a span of `service`, as the query API's /api/traces gives them."""
        params = urllib.parse.urlencode({"service": service, "limit": limit, "lookback": "1h"})
        with urllib.request.urlopen(f"{self.query}/api/traces?{params}", timeout=10) as response:
            return list(json.loads(response.read())["data"] or [])


@contextmanager
def jaeger(tools: Tools, folder: Path) -> Iterator[Jaeger]:
    if not tools.jaeger.exists():  # a failure, not a skip: these tests are part of the suite
        raise FileNotFoundError(f"{tools.jaeger} not built; run `make setup`")
    folder.mkdir(parents=True, exist_ok=True)
    otlp, query, query_grpc, health = free_port(), free_port(), free_port(), free_port()
    config = {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {
                "traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["jaeger_storage_exporter"]}
            },
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"127.0.0.1:{health}"}},
            "jaeger_query": {
                "storage": {"traces": "memory"},
                "http": {"endpoint": f"127.0.0.1:{query}"},
                "grpc": {"endpoint": f"127.0.0.1:{query_grpc}"},
            },
            "jaeger_storage": {"backends": {"memory": {"memory": {"max_traces": 100_000}}}},
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{otlp}"}}}},
        "processors": {"batch": {"timeout": "100ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory"}},
    }
    path = folder / "jaeger.yaml"
    path.write_text(yaml.safe_dump(config))
    with serving_process([str(tools.jaeger), "--config", str(path)], f"http://127.0.0.1:{health}/status", "jaeger"):
        yield Jaeger(f"http://127.0.0.1:{otlp}", f"http://127.0.0.1:{query}")
