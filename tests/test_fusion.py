"""Stage fusion (`spec.fuse`): fused stages run in their host's process, answer as five services do, and
keep their own queues, refusals and metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from promptpipe.contract.spec import StageName
from promptpipe.waiting import wait_until_async
from tests.support.calls import Outcome, collect
from tests.support.cli import promptpipe
from tests.support.pipelines import synthetic_pipeline

pytestmark = pytest.mark.processes

# Every token carries an address, which post redacts.
FILTERED = {
    "model": {"synthetic": {"tokenText": " write to bob@example.com"}},
    "generation": {"maxNewTokens": 12},
    "post": {"redact": {"email": True}, "stopSequences": ["<|im_end|>"]},
}
ALL_FUSED = ["rag", "assemble", "post"]


async def test_a_fused_pipeline_runs_two_processes_and_answers_as_five_services_do(
    start_pipeline, tmp_path: Path
) -> None:
    five = start_pipeline(synthetic_pipeline("five", **FILTERED))
    two = start_pipeline(synthetic_pipeline("two", fuse=ALL_FUSED, **FILTERED))
    one = start_pipeline(synthetic_pipeline("one", fuse=[*ALL_FUSED, "inference"], **FILTERED))
    assert sorted(five.run.stages) == sorted(s.value for s in StageName)
    assert sorted(two.run.stages) == ["inference", "stream"]
    assert sorted(one.run.stages) == ["stream"]

    apart, fused = await collect(five.gateway, "hello"), await collect(two.gateway, "hello")
    alone = await collect(one.gateway, "hello")

    assert apart.error is None and fused.error is None and alone.error is None
    assert "bob@example.com" not in apart.text and "[REDACTED]" in apart.text, "post filtered the answer"
    assert fused.text == apart.text == alone.text
    assert apart.summary is not None and fused.summary is not None and alone.summary is not None
    assert fused.summary.finish_reason == apart.summary.finish_reason == alone.summary.finish_reason
    assert fused.summary.usage == apart.summary.usage == alone.summary.usage
    assert {t.stage for t in alone.summary.timings} == {s.value for s in StageName}
    # Every stage still reports its share (what its hop costs in-process is bench/profile.py's to say).
    assert {t.stage for t in fused.summary.timings} == {s.value for s in StageName}
    # The fused stages' metrics come from their host's /metrics, under their own stage label.
    assert two.metric(StageName.STREAM, "promptpipe_stage_duration_seconds_count", stage="assemble", code="OK") == 1
    # post's call ends once its final event is out: the client may read the summary a moment before.
    await wait_until_async(
        lambda: (
            two.metric(StageName.INFERENCE, "promptpipe_stage_duration_seconds_count", stage="post", code="OK") == 1
        ),
        what="post's call counted in the inference process's metrics",
    )
    # `promptpipe status` names what each process runs.
    status = promptpipe("status", "--name", "two", home=tmp_path / "home")
    assert status.returncode == 0, status.stderr
    rows = [line.split()[0] for line in status.stdout.splitlines() if "SERVING" in line]
    assert rows == ["stream+rag+assemble", "inference+post"], status.stdout
    status = promptpipe("status", "--name", "one", home=tmp_path / "home")
    assert [line.split()[0] for line in status.stdout.splitlines() if "SERVING" in line] == [
        "stream+rag+assemble+inference+post"
    ], status.stdout


async def test_a_fused_stage_keeps_its_queue_and_its_refusal_names_its_limits(start_pipeline) -> None:
    # post, fused into inference, runs one call and queues none; each call streams for about a second.
    doc = synthetic_pipeline(
        fuse=["post"],
        model={"synthetic": {"tokensPerSecond": 40}},
        generation={"maxNewTokens": 40},
        stages={"post": {"queue": {"capacity": 0, "concurrency": 1, "retryAfterSeconds": 0.5}}},
    )
    p = start_pipeline(doc)
    running = Outcome()
    first = asyncio.create_task(collect(p.gateway, "a", running))
    await asyncio.wait_for(running.first_chunk.wait(), 10)

    refused = await collect(p.gateway, "b")

    assert refused.error is not None and refused.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.error.message == "stage post: queue full (0 waiting, 1 running)"
    assert refused.error.retry_after == pytest.approx(0.5)
    assert not first.done(), "refused at once, not after the running call"
    done = await first
    assert done.error is None and done.summary is not None and done.summary.usage.completion_tokens == 40
    assert p.metric(StageName.INFERENCE, "promptpipe_stage_shed_total", stage="post", reason="rejected") == 1
