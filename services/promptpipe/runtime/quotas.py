"""Per-tenant quotas, as token buckets, and each tenant's flow in the gateway's fair admission queue.

Requests per minute: a call takes one token from its tenant's bucket, or is refused until one refills.
Tokens per minute: a call's size is not known before it runs, so a call is admitted while its tenant's
bucket is not empty and pays for its prompt and generated tokens when it ends; a bucket driven below zero
refuses the tenant's calls until it refills above it. Each bucket holds at most a minute's worth.

The gateway charges its calls through a `Tenancy`: the buckets kept in its own process (`LocalTenancy`),
or in a store its replicas share (`promptpipe.gateway.quota_store`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry

from promptpipe.contract.spec import AuthSpec, PriorityClass, QuotaSpec
from promptpipe.runtime.admission import ONE_FLOW, AdmissionQueue, Flow
from promptpipe.runtime.errors import QuotaExceeded
from promptpipe.runtime.metrics import TenantMetrics

PRIORITIES = {PriorityClass.HIGH: 1, PriorityClass.NORMAL: 0, PriorityClass.LOW: -1}


def tenant_flow(name: str, quota: QuotaSpec) -> Flow:
    return Flow(name, quota.weight, PRIORITIES[quota.priority])


class TenantFlows:
    """Each tenant's flow (its share and priority) from the pipeline's `auth`, for the stages behind the
    gateway: a call's tenant travels in its work item's `tenant` metadata, which the gateway sets, and
    every stage that queues admits by it, so one tenant's flood cannot fill a stage's queue and have the
    others' calls shed there. No tenant (an open gateway): one flow for all."""

    def __init__(self, auth: AuthSpec) -> None:
        self._auth = auth
        self._listed = {t.name: tenant_flow(t.name, t) for t in auth.tenants}

    def of(self, tenant: str) -> Flow:
        if not tenant:
            return ONE_FLOW
        flow = self._listed.get(tenant)
        # An unlisted tenant's flow is made for each call: the queue keeps none past its last waiter.
        return flow if flow is not None else tenant_flow(tenant, self._auth.default_quota)


class TokenBucket:
    __slots__ = ("level", "per_minute", "rate", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.stamp = now

    def refill(self, now: float) -> float:
        self.level = min(float(self.per_minute), self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.level


class _Tenant:
    __slots__ = ("flow", "requests", "tokens")

    def __init__(self, name: str, quota: QuotaSpec, now: float) -> None:
        self.flow = tenant_flow(name, quota)
        rpm, tpm = quota.requests_per_minute, quota.tokens_per_minute
        self.requests = TokenBucket(rpm, now) if rpm is not None else None
        self.tokens = TokenBucket(tpm, now) if tpm is not None else None


class Quotas:
    def __init__(self, auth: AuthSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self._auth = auth
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}  # bounded by the tenants the key file names

    def admit(self, tenant: str) -> Flow:
        """Charge one call to `tenant`'s quota, and its flow in the admission queue; QuotaExceeded if used up."""
        t = self._tenant(tenant)
        if t.tokens is None and t.requests is None:
            return t.flow
        now = self._clock()
        if t.tokens is not None and t.tokens.refill(now) <= 0:
            wait = max(-t.tokens.level, 1.0) / t.tokens.rate
            raise QuotaExceeded(
                tenant,
                "tokens",
                f"tenant {tenant}: tokens per minute used up ({t.tokens.per_minute}); retry in {wait:.1f}s",
                wait,
            )
        if t.requests is not None:
            if t.requests.refill(now) < 1:
                wait = (1 - t.requests.level) / t.requests.rate
                raise QuotaExceeded(
                    tenant,
                    "requests",
                    f"tenant {tenant}: requests per minute used up ({t.requests.per_minute}); retry in {wait:.1f}s",
                    wait,
                )
            t.requests.level -= 1
        return t.flow

    def used(self, tenant: str, tokens: int) -> None:
        """A call of `tenant` used `tokens` more (its prompt, or chunks it was sent)."""
        t = self._tenant(tenant)
        if t.tokens is not None and tokens:
            t.tokens.refill(self._clock())
            t.tokens.level -= tokens

    def _tenant(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant(name, self._auth.quota_of(name), self._clock())
        return t


class Tenancy(Protocol):
    """How the gateway charges its calls to their tenants."""

    async def charge(self, tenant: str) -> Flow:
        """One call to `tenant`'s quota (QuotaExceeded if used up), and its flow in the admission queue."""

    def used(self, tenant: str, tokens: int) -> None:
        """A call of `tenant` used `tokens` more (its prompt, or chunks it was sent)."""

    async def close(self) -> None:
        """Settle what is owed (the gateway is stopping)."""


class LocalTenancy:
    """The tenants' quotas and per-tenant metrics, kept in this process."""

    def __init__(self, quotas: Quotas, metrics: TenantMetrics) -> None:
        self.quotas = quotas
        self.metrics = metrics

    @classmethod
    def create(cls, auth: AuthSpec, registry: CollectorRegistry, pipeline: str, queue: AdmissionQueue) -> LocalTenancy:
        """The gateway's tenants, kept in this process: their quotas from `auth`, their metrics (including
        each one's waiters in `queue`, the gateway's admission queue) in `registry`."""
        return cls(Quotas(auth), TenantMetrics(registry, pipeline, queue))

    def charge_now(self, tenant: str) -> Flow:
        try:
            flow = self.quotas.admit(tenant)
        except QuotaExceeded as exc:
            self.metrics.call(tenant, f"over_{exc.limit}_quota")
            raise
        self.metrics.call(tenant, "admitted")
        return flow

    async def charge(self, tenant: str) -> Flow:
        return self.charge_now(tenant)

    def used(self, tenant: str, tokens: int) -> None:
        self.quotas.used(tenant, tokens)
        self.metrics.tokens(tenant, tokens)

    async def close(self) -> None:
        pass
