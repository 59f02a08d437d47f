"""A stage run as worker processes on one port (`stages.<stage>.workers`): real processes, real sockets.

The post stage runs 2 workers under a supervisor that holds its one admission queue; the limits hold for
the stage as a whole, both workers serve, /metrics is the stage's, and the stage stops whole. The gateway
runs 2 workers too: a tenant's quota holds across them, on gRPC and HTTP, and all three of its ports are
shared.
"""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptpipe.contract.spec import StageName
from promptpipe.localproc import alive, exits
from promptpipe.waiting import wait_until
from tests.support.calls import Outcome, collect, stats
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

pytestmark = pytest.mark.processes

# 16 tokens at 20 tokens/s: each call holds its post slot for about 0.8 s.
SLOW = {"model": {"synthetic": {"tokensPerSecond": 20}}, "generation": {"maxNewTokens": 16}}
POST_CALLS = ("promptpipe_stage_duration_seconds_count", {"pipeline": "t", "stage": "post", "code": "OK"})


def two_post_workers() -> dict[str, object]:
    return synthetic_pipeline(
        **SLOW,
        stages={
            "post": {"workers": 2, "queue": {"capacity": 2, "concurrency": 2, "shedPolicy": "reject-new"}},
            "inference": {"queue": {"capacity": 64, "concurrency": 64}},
        },
    )


def workers_of(supervisor: int) -> list[int]:
    """The supervisor's worker processes (its children)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def worker_metrics(pid: int) -> str:
    """One worker's own /metrics, at the port its port file names (the supervisor set it in its environment)."""
    environ = dict(
        entry.split("=", 1) for entry in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in entry
    )
    metrics_port = Path(environ["PROMPTPIPE_PORT_FILE"]).read_text().split()[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def sample(metrics: str, series: tuple[str, dict[str, str]]) -> float:
    """The sum of the samples named so whose labels include these."""
    name, labels = series
    return sum(
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


async def test_the_queue_limits_hold_for_the_stage_whichever_worker_takes_a_call(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p: RunningPipeline = start_pipeline(two_post_workers())
    supervisor = p.pid(StageName.POST)
    assert len(workers_of(supervisor)) == 2

    # Ten at once: two run and two wait in the stage's one queue; six are refused, whichever worker they reach.
    outcomes = await asyncio.gather(*(collect(p.gateway, f"call {i}") for i in range(10)))
    served = [o for o in outcomes if o.error is None]
    refused = [o for o in outcomes if o.error is not None]
    assert len(served) == 4, [o.error for o in outcomes]
    assert all(o.summary is not None and o.summary.usage.completion_tokens == 16 for o in served)
    assert all(o.error.code is grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused if o.error is not None)
    assert all("stage post: queue full" in o.error.message for o in refused if o.error is not None), [
        o.error for o in refused
    ]

    s = await stats(p.target(StageName.POST))  # from either worker: the stage's queue, kept by the supervisor
    assert (s.rejected_total, s.completed_total, s.in_flight, s.queue_depth) == (6, 4, 0, 0)
    assert p.metric(StageName.POST, "promptpipe_stage_shed_total", reason="rejected") == 6
    assert p.metric(StageName.POST, "promptpipe_stage_queue_capacity") == 2


async def test_both_workers_serve_and_the_stages_metrics_are_their_sum(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p: RunningPipeline = start_pipeline(
        synthetic_pipeline(stages={"post": {"workers": 2, "queue": {"capacity": 64, "concurrency": 64}}})
    )
    workers = workers_of(p.pid(StageName.POST))
    # The gateway keeps 8 connections to post (4 per worker); each call takes the next.
    for batch in range(5):
        outcomes = await asyncio.gather(*(collect(p.gateway, f"call {batch}.{i}") for i in range(8)))
        assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    # A call is counted as post's handler ends, a moment after its last event reached the client.
    wait_until(lambda: sample(p.metrics(StageName.POST), POST_CALLS) == 40, "the stage's /metrics to count 40 calls")
    each = [sample(worker_metrics(pid), POST_CALLS) for pid in workers]
    assert all(n > 0 for n in each), f"calls served per worker: {each}"
    assert sum(each) == 40, f"the stage's /metrics is the workers' sum: {each}"


def test_a_worker_that_dies_takes_the_stage_down(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p: RunningPipeline = start_pipeline(two_post_workers())
    supervisor = p.pid(StageName.POST)
    first, second = workers_of(supervisor)
    os.kill(first, signal.SIGKILL)
    assert exits(supervisor, 30), "the supervisor stops when a worker dies"
    wait_until(lambda: not alive(second), "the other worker to stop", 30)
    log = Path(p.run.stages[StageName.POST.value].log).read_text()
    assert "a worker of this stage exited" in log and "stopping the others" in log, log[-2000:]


def test_a_stopped_stage_drains_its_workers_and_leaves_none_behind(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p: RunningPipeline = start_pipeline(two_post_workers())
    supervisor = p.pid(StageName.POST)
    workers = workers_of(supervisor)
    os.kill(supervisor, signal.SIGTERM)
    assert exits(supervisor, 30)
    assert not [pid for pid in workers if alive(pid)], "every worker stopped with its supervisor"
    log = Path(p.run.stages[StageName.POST.value].log).read_text()
    assert log.count("stage post stopped\n") == 2 and "stage post stopped (2 workers)" in log, log[-2000:]


# The gateway as 2 workers: its tenants' quotas and per-tenant metrics are its supervisor's, as its queue is.
HELLO = [{"role": "user", "content": "hello there"}]
GATEWAY_CALLS = ("promptpipe_stage_duration_seconds_count", {"pipeline": "t", "stage": "stream", "code": "OK"})
TENANT_CALLS = "promptpipe_gateway_tenant_calls_total"


def two_gateway_workers(**spec: object) -> dict[str, object]:
    return synthetic_pipeline(stages={"stream": {"workers": 2}}, **spec)


def openai_call(p: RunningPipeline) -> str | None:
    """One chat completion on a connection of its own (so the kernel picks a worker for it); its text, or None
    if refused with 429."""
    with openai.OpenAI(base_url=p.openai_base_url, api_key="none", max_retries=0) as client:
        try:
            return client.chat.completions.create(model="synthetic", messages=HELLO).choices[0].message.content  # type: ignore[arg-type]
        except openai.RateLimitError:
            return None


def http_metrics(p: RunningPipeline) -> str:
    """/metrics on the gateway's OpenAI HTTP port, which one of its workers answers."""
    url = p.openai_base_url.removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_a_tenants_quota_holds_for_the_gateway_whichever_worker_takes_a_call(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p: RunningPipeline = start_pipeline(two_gateway_workers(auth={"defaultQuota": {"requestsPerMinute": 3}}))
    assert len(workers_of(p.pid(StageName.STREAM))) == 2

    async def grpc_calls() -> list[Outcome]:
        return list(await asyncio.gather(*(collect(p.gateway, f"call {i}") for i in range(6))))

    # Twelve calls, six on gRPC and six on HTTP, each on a connection of its own: one bucket of 3 a minute
    # (one more every 20 s) for the stage, so exactly 3 are served. (With a bucket per worker, up to 6.)
    on_grpc = asyncio.run(grpc_calls())
    on_http = [openai_call(p) for _ in range(6)]
    served = [o for o in on_grpc if o.error is None] + [text for text in on_http if text is not None]
    assert len(served) == 3, ([o.error for o in on_grpc], on_http)
    refused = [o.error for o in on_grpc if o.error is not None]
    assert all(
        e.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "requests per minute used up (3)" in e.message for e in refused
    )

    # The per-tenant counts are the stage's, kept by the supervisor: on its metrics port, and on the HTTP
    # port's /metrics, which a worker serves from its supervisor (a worker's own has none).
    for metrics in (p.metrics(StageName.STREAM), http_metrics(p)):
        assert sample(metrics, (TENANT_CALLS, {"outcome": "admitted"})) == 3
        assert sample(metrics, (TENANT_CALLS, {"outcome": "over_requests_quota"})) == 9
    for pid in workers_of(p.pid(StageName.STREAM)):
        assert TENANT_CALLS not in worker_metrics(pid)


def test_both_gateway_workers_serve_grpc_and_http_on_the_stages_ports(start_pipeline) -> None:  # type: ignore[no-untyped-def]
    p: RunningPipeline = start_pipeline(two_gateway_workers())
    workers = workers_of(p.pid(StageName.STREAM))

    def served_by_each() -> list[float]:
        return [sample(worker_metrics(pid), GATEWAY_CALLS) for pid in workers]

    async def grpc_calls() -> None:
        for i in range(20):  # each on a connection of its own
            outcome = await collect(p.gateway, f"call {i}")
            assert outcome.error is None, outcome.error

    asyncio.run(grpc_calls())
    wait_until(lambda: sum(served_by_each()) == 20, "20 gRPC calls counted")
    on_grpc = served_by_each()
    assert all(n > 0 for n in on_grpc), f"gRPC calls served per worker: {on_grpc}"

    assert all(openai_call(p) for _ in range(20))
    wait_until(lambda: sum(served_by_each()) == 40, "20 HTTP calls counted")
    on_http = [after - before for after, before in zip(served_by_each(), on_grpc, strict=True)]
    assert all(n > 0 for n in on_http), f"HTTP calls served per worker: {on_http}"

    # The internal Stage port is shared too: its Stats are the stage's queue, from whichever worker answers.
    s = asyncio.run(stats(p.stats_target(StageName.STREAM)))
    assert s.completed_total == 40 and s.in_flight == 0
    assert sample(p.metrics(StageName.STREAM), GATEWAY_CALLS) == 40
