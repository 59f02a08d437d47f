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

from promptpipe.contract.tracing import QUEUE_WAIT_ATTRIBUTE, STAGE_OF_SPAN, service_name
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


def config(host: str, otlp: int, query: int, health: int) -> dict[str, Any]:
    """Jaeger v2's configuration: OTLP/gRPC in on `otlp`, traces in memory, the query API on `query`."""
    return {
        "service": {
            "extensions": ["jaeger_storage", "jaeger_query", "healthcheckv2"],
            "pipelines": {
                "traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["jaeger_storage_exporter"]}
            },
            "telemetry": {"metrics": {"level": "none"}, "logs": {"level": "warn"}},
        },
        "extensions": {
            "healthcheckv2": {"use_v2": True, "http": {"endpoint": f"{host}:{health}"}},
            "jaeger_query": {
                "storage": {"traces": "memory"},
                "http": {"endpoint": f"{host}:{query}"},
                "grpc": {"endpoint": f"{host}:{free_port()}"},  # unused, but it listens somewhere
            },
            "jaeger_storage": {"backends": {"memory": {"memory": {"max_traces": 100_000}}}},
        },
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{host}:{otlp}"}}}},
        "processors": {"batch": {"timeout": "100ms"}},
        "exporters": {"jaeger_storage_exporter": {"trace_storage": "memory"}},
    }


@contextmanager
def jaeger(tools: Tools, folder: Path) -> Iterator[Jaeger]:
    built(tools)
    folder.mkdir(parents=True, exist_ok=True)
    otlp, query, health = free_port(), free_port(), free_port()
    path = folder / "jaeger.yaml"
    path.write_text(yaml.safe_dump(config("127.0.0.1", otlp, query, health)))
    with serving_process([str(tools.jaeger), "--config", str(path)], f"http://127.0.0.1:{health}/status", "jaeger"):
        yield Jaeger(f"http://127.0.0.1:{otlp}", f"http://127.0.0.1:{query}")


def built(tools: Tools) -> None:
    if not tools.jaeger.exists():  # a failure, not a skip: these tests are part of the suite
        raise FileNotFoundError(f"{tools.jaeger} not built; run `make setup`")


# ---- reading a call's trace

STAGES = ("stream", "rag", "assemble", "post", "inference")


def stage_spans(trace: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The trace's stage spans by stage (the inference stage's span is `infer`)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for span in trace["spans"]:
        if span["operationName"] in STAGE_OF_SPAN:
            out.setdefault(STAGE_OF_SPAN[span["operationName"]], []).append(span)
    return out


def whole(trace: dict[str, Any], remote_parents: int = 0) -> bool:
    """Every stage's span in, and every span's parent: spans leave each process in batches. A trace a caller
    began (its `traceparent`) has `remote_parents` parents of the caller's own, which never reach Jaeger."""
    ids = {s["spanID"] for s in trace["spans"]}
    parents = {r["spanID"] for s in trace["spans"] for r in s["references"] if r["refType"] == "CHILD_OF"}
    return stage_spans(trace).keys() == set(STAGES) and len(parents - ids) <= remote_parents


def ancestors(trace: dict[str, Any], span: dict[str, Any]) -> list[dict[str, Any]]:
    """The span's parents up to the root (or a caller's span, which is not in the trace), nearest first."""
    by_id = {s["spanID"]: s for s in trace["spans"]}
    out = []
    while (parents := [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]) and parents[0] in by_id:
        span = by_id[parents[0]]
        out.append(span)
    return out


def assert_one_call(trace: dict[str, Any], pipeline: str, *secrets: str) -> dict[str, dict[str, Any]]:
    """A call's trace as the stages must leave it: one span per stage, each from its own process under its
    own service name; the gateway's the root of the stages, rag, assemble and post under it, inference under
    post (through the gRPC client and server spans of each hop); the queue wait on each; no text of `secrets`
    (a prompt's) in any attribute, log or process tag. Returns the stage spans by stage."""
    spans = stage_spans(trace)
    assert {name: len(s) for name, s in spans.items()} == dict.fromkeys(STAGES, 1), "one span per stage"
    one = {name: s[0] for name, s in spans.items()}
    for name, span in one.items():
        assert trace["processes"][span["processID"]]["serviceName"] == service_name(pipeline, name)
    assert not [a for a in ancestors(trace, one["stream"]) if a["operationName"] in STAGE_OF_SPAN]
    for name in ("rag", "assemble", "post"):
        above = [a["operationName"] for a in ancestors(trace, one[name]) if a["operationName"] in STAGE_OF_SPAN]
        assert above == ["stream"], name
    assert one["inference"]["operationName"] == "infer"
    above = [a["operationName"] for a in ancestors(trace, one["inference"]) if a["operationName"] in STAGE_OF_SPAN]
    assert above == ["post", "stream"]
    for name, span in one.items():
        tags = {t["key"]: t["value"] for t in span["tags"]}
        assert QUEUE_WAIT_ATTRIBUTE in tags and float(tags[QUEUE_WAIT_ATTRIBUTE]) >= 0, name
    for span in trace["spans"]:
        values = [str(t["value"]) for t in span["tags"]]
        values += [str(f["value"]) for log in span.get("logs", []) for f in log["fields"]]
        assert not [v for v in values if any(x in v for x in secrets)], span["operationName"]
    for process in trace["processes"].values():
        assert not [t for t in process["tags"] if any(x in str(t["value"]) for x in secrets)]
    return one
