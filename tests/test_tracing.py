"""OpenTelemetry: one span per stage, linked into one trace across the five processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from promptpipe.waiting import wait_until_async
from tests.support.calls import collect
from tests.support.pipelines import running_pipeline, synthetic_pipeline

pytestmark = pytest.mark.processes

STAGE_SPANS = {"stream", "rag", "assemble", "post", "infer"}  # the inference stage's span is `infer`


def spans_in(log: str) -> list[dict[str, Any]]:
    """The spans a stage has finished writing; a line still being written (no newline yet) waits for the next look."""
    text = Path(log).read_text()
    out = []
    for line in text[: text.rfind("\n") + 1].splitlines():
        if line.startswith("{") and '"trace_id"' in line:
            out.append(json.loads(line))
    return out


async def test_one_trace_holds_a_span_for_every_stage(tmp_path: Path) -> None:
    with running_pipeline(synthetic_pipeline(), tmp_path, otel_exporter="console") as p:
        out = await collect(p.gateway, "trace me")
        assert out.summary is not None
        logs = [proc.log for proc in p.run.stages.values()]

        def stage_spans() -> dict[str, dict[str, Any]]:
            return {s["name"]: s for log in logs for s in spans_in(log) if s["name"] in STAGE_SPANS}

        await wait_until_async(lambda: set(stage_spans()) == STAGE_SPANS, what="a span from every stage")
        spans = stage_spans()
        all_spans = {s["context"]["span_id"]: s for log in logs for s in spans_in(log)}
    assert len({s["context"]["trace_id"] for s in spans.values()}) == 1, "one trace across all processes"
    # Each stage span hangs below the gRPC server span of the call that reached it.
    for name in ("rag", "assemble", "post", "infer"):
        parent = all_spans[spans[name]["parent_id"]]
        assert parent["kind"] == "SpanKind.SERVER" and parent["name"].startswith("/promptpipe.v1.Stage/")
