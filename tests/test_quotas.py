"""Per-tenant quotas as token buckets, on a clock the test moves; how a refusal reads on each transport."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from promptpipe.contract.pipeline_file import PipelineFileError, parse_pipeline
from promptpipe.contract.spec import AuthSpec
from promptpipe.gateway import openai_api as api
from promptpipe.runtime.admission import Flow
from promptpipe.runtime.errors import QuotaExceeded, Shed, abort_with


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def quotas(**auth: Any) -> tuple[Any, Clock]:
    from promptpipe.runtime.quotas import Quotas

    clock = Clock()
    return Quotas(AuthSpec.model_validate(auth), clock), clock


def test_requests_per_minute_admits_a_minutes_worth_then_one_per_refill() -> None:
    q, clock = quotas(defaultQuota={"requestsPerMinute": 60})
    for _ in range(60):
        q.admit("team-a")
    with pytest.raises(QuotaExceeded) as err:
        q.admit("team-a")
    assert err.value.limit == "requests" and err.value.tenant == "team-a"
    assert err.value.retry_after == pytest.approx(1.0)
    assert "requests per minute used up (60)" in err.value.message
    clock.now += 1.0
    q.admit("team-a")
    with pytest.raises(QuotaExceeded):
        q.admit("team-a")


def test_tokens_per_minute_are_paid_when_the_call_ends_and_refill_over_time() -> None:
    q, clock = quotas(defaultQuota={"tokensPerMinute": 600})
    q.admit("team-a")
    q.used("team-a", 900)  # the call used more than was left: the bucket owes 300
    with pytest.raises(QuotaExceeded) as err:
        q.admit("team-a")
    assert err.value.limit == "tokens" and err.value.retry_after == pytest.approx(30.0)
    clock.now += 29.0
    with pytest.raises(QuotaExceeded):
        q.admit("team-a")
    clock.now += 1.5
    q.admit("team-a")


def test_each_tenant_has_its_own_buckets_and_listed_tenants_their_own_limits() -> None:
    q, _ = quotas(
        defaultQuota={"requestsPerMinute": 1},
        tenants=[{"name": "big", "requestsPerMinute": 100, "weight": 4, "priority": "high"}],
    )
    q.admit("small-1")
    q.admit("small-2")  # not charged to small-1's bucket
    with pytest.raises(QuotaExceeded):
        q.admit("small-1")
    for _ in range(100):
        assert q.admit("big") == Flow("big", weight=4, priority=1)


def test_without_limits_every_call_is_admitted_in_its_tenants_flow() -> None:
    q, _ = quotas(tenants=[{"name": "batch", "priority": "low"}])
    for _ in range(10_000):
        q.admit("anyone")
    assert q.admit("anyone") == Flow("anyone") and q.admit("batch") == Flow("batch", priority=-1)


def test_a_quota_refusal_is_429_with_retry_after_in_openais_rate_limit_shape() -> None:
    err = api.api_error(QuotaExceeded("team-a", "tokens", "tenant team-a: tokens per minute used up", 2.2))
    assert err.status == 429 and err.headers()["Retry-After"] == "3"
    assert err.body()["error"]["type"] == "tokens" and err.body()["error"]["code"] == "rate_limit_exceeded"
    # Overload stays 503: a client tells "slow down, you" from "the service is full".
    assert api.api_error(Shed("queue full", 0.5)).status == 503


class Context:
    status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise RuntimeError("aborted")


async def test_on_grpc_a_quota_refusal_carries_retry_info_and_a_quota_failure_naming_the_tenant() -> None:
    context: Any = Context()
    with pytest.raises(RuntimeError):
        await abort_with(context, QuotaExceeded("team-a", "requests", "used up", 1.5), "stream")
    status = context.status
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    details = status_pb2.Status.FromString(raw).details
    retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert details[0].Unpack(retry) and details[1].Unpack(failure)
    assert retry.retry_delay.seconds == 1 and retry.retry_delay.nanos == 500_000_000
    assert failure.violations[0].subject == "tenant:team-a"
    assert failure.violations[0].description == "requests per minute"


def pipeline(auth: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": "t"},
        "spec": {"model": {"name": "m", "backend": "synthetic"}, "auth": auth},
    }


@pytest.mark.parametrize(
    ("auth", "named"),
    [
        ({"tenants": [{"name": "a"}, {"name": "a"}]}, "spec.auth: tenants[1].name: 'a' is listed twice"),
        ({"tenants": [{"name": "Team A"}]}, "spec.auth.tenants.0.name"),
        ({"defaultQuota": {"requestsPerMinute": 0}}, "spec.auth.defaultQuota.requestsPerMinute"),
        ({"tenants": [{"name": "a", "weight": 101}]}, "spec.auth.tenants.0.weight"),
        ({"tenants": [{"name": "a", "priority": "urgent"}]}, "spec.auth.tenants.0.priority"),
        (
            {"open": True, "apiKeysSecret": {"name": "keys", "key": "keys.yaml"}},
            "spec.auth: open: cannot be true with apiKeysSecret set",
        ),
    ],
)
def test_a_malformed_auth_section_is_refused_naming_the_field(auth: dict[str, Any], named: str) -> None:
    with pytest.raises(PipelineFileError) as err:
        parse_pipeline(pipeline(auth))
    assert named in str(err.value)
