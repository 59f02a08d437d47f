"""Logs a cluster can use (issue 33): JSON lines from every stage process, a call's request id on the lines
of its work, and one access line per call at the gateway, never with the prompt or the answer."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from promptpipe.runtime import logs
from tests.support.calls import collect
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

SECRET_PROMPT = "the-prompt-text-4711 my card is 4111 1111 1111 1111"


async def test_a_calls_lines_carry_its_request_id_and_tenant_and_other_tasks_lines_do_not() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", "p", "stream")
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    log = logging.getLogger("promptpipe.test")

    async def call(request_id: str) -> None:
        logs.in_call(request_id=request_id, tenant="alice")
        await asyncio.sleep(0)
        log.warning("working")

    try:
        await asyncio.gather(call("r1"), call("r2"))
        log.info("between calls")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x.get("request_id"), x.get("tenant"), x["message"]) for x in lines] == [
        ("r1", "alice", "working"),
        ("r2", "alice", "working"),
        (None, None, "between calls"),
    ]
    assert all(x["pipeline"] == "p" and x["stage"] == "stream" and x["level"] for x in lines)


def json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{path.name}:{number} is not JSON: {line!r}") from None
    return out


@pytest.mark.processes
async def test_a_local_pipeline_logs_json_lines_and_one_access_line_per_call(
    start_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMPTPIPE_LOG_FORMAT", "json")
    p: RunningPipeline = start_pipeline(synthetic_pipeline("jsonlogs"))
    served = await collect(p.gateway, SECRET_PROMPT, max_new_tokens=4)
    assert served.summary is not None
    refused = await collect(p.gateway, SECRET_PROMPT, temperature=7.0)
    assert refused.error is not None

    body = json.dumps({"model": "synthetic", "max_tokens": 3, "messages": [{"role": "user", "content": SECRET_PROMPT}]})
    request = urllib.request.Request(
        p.openai_base_url + "/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        http_id = resp.headers["x-request-id"]

    folder = Path(p.run.folder)
    stream_log = folder / "stream.log"
    for _ in range(50):  # the access line is written as the call ends, after its last response went out
        if stream_log.read_text().count('"access"') >= 3:
            break
        await asyncio.sleep(0.1)
    for stage in ("stream", "rag", "assemble", "inference", "post"):
        path = folder / f"{stage}.log"
        lines = json_lines(path)
        assert lines, f"{stage} logged nothing"
        assert all(x["stage"] == stage and x["pipeline"] == "jsonlogs" for x in lines)
        assert "the-prompt-text-4711" not in path.read_text(), f"{stage} logged the prompt"
    access = [x["access"] for x in json_lines(stream_log) if "access" in x]
    by_id = {a["request_id"]: a for a in access}
    assert len(access) == 3 and len(by_id) == 3, access
    ok = by_id[served.summary.request_id]
    assert ok["status"] == "OK" and ok["transport"] == "grpc" and ok["tokens_out"] == 4 and ok["tokens_in"] > 0
    assert ok["ttft_ms"] is not None and ok["duration_ms"] >= ok["ttft_ms"]
    assert by_id[http_id]["status"] == "OK" and by_id[http_id]["transport"] == "http"
    (bad,) = [a for a in access if a["status"] == "INVALID_ARGUMENT"]
    assert bad["transport"] == "grpc" and bad["tokens_out"] == 0
