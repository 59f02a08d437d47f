"""A call that times out leaves the embedded model free (issue 32), through real processes.

The quickstart's five stage processes on SmolLM2. A call whose deadline passes while the model is still
reading its long prompt ends with its deadline status, over the OpenAI HTTP API and over gRPC; the call
after it is answered. Before the fix the first such call kept the model taken for good: the inference
stage's cleanup awaited the decode thread before giving the model back, and the second cancel a deadline
brings (the caller's and the server's, then the watchdog's) landed on that await.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support.calls import collect
from tests.support.pipelines import RunningPipeline

pytestmark = [pytest.mark.processes, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "deploy" / "examples" / "quickstart.yaml"
# About 700 prompt tokens: the model reads them for a good part of a second before its first token,
# and a deadline of DEADLINE seconds passes while it does.
LONG_QUESTION = "Summarise this list, then count the words in it: " + " ".join(
    f"item{i} is a small {'red' if i % 2 else 'blue'} box" for i in range(90)
)
DEADLINE = 0.4
MODEL = "smollm2-135m-instruct"
# Long enough for an answer on a busy 2-core machine; a frozen model never answers within it.
ANSWER_WITHIN = 60.0


def quickstart() -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(yaml.safe_load(QUICKSTART.read_text()))
    doc["spec"]["rag"]["corpus"]["path"] = str(QUICKSTART.parent / "corpus")
    return doc


def chat(p: RunningPipeline, question: str, max_tokens: int, timeout_header: float | None) -> tuple[int, Any]:
    body = json.dumps(
        {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]}
    ).encode()
    headers = {"Content-Type": "application/json"}
    if timeout_header is not None:
        headers["X-Request-Timeout"] = str(timeout_header)
    request = urllib.request.Request(p.openai_base_url + "/chat/completions", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=ANSWER_WITHIN) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_timed_out_http_call_then_a_normal_call_is_answered(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p = start_pipeline(quickstart())
    for _ in range(3):
        status, body = chat(p, LONG_QUESTION, 96, timeout_header=DEADLINE)
        assert status == 504, body
        assert "deadline" in body["error"]["message"]
        started = time.monotonic()
        status, body = chat(p, "When was the Eiffel Tower built?", 8, timeout_header=None)
        assert status == 200, f"the call after a timed-out one is answered, not {status}: {body}"
        assert body["choices"][0]["message"]["content"].strip()
        assert time.monotonic() - started < ANSWER_WITHIN


async def test_a_timed_out_grpc_call_then_a_normal_call_is_answered(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p = start_pipeline(quickstart())
    for _ in range(3):
        out = await collect(p.gateway, LONG_QUESTION, max_new_tokens=96, timeout=DEADLINE)
        assert out.error is not None and out.error.code is grpc.StatusCode.DEADLINE_EXCEEDED, out.error
        out = await collect(p.gateway, "When was the Eiffel Tower built?", max_new_tokens=8, timeout=ANSWER_WITHIN)
        assert out.error is None, f"the call after a timed-out one is answered: {out.error}"
        assert out.summary is not None and out.summary.usage.completion_tokens > 0
