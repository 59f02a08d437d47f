"""The tenants' buckets kept in a Redis (or Valkey) that every replica of the gateway shares
(`auth.quotaStore`), so a tenant's quota is the tenant's: with each pod keeping its own buckets, N gateway
pods give a tenant N times its quota, and KEDA moves N with load.

Why a store and not each bucket divided among the ready pods: a division holds only while the Service
spreads a tenant's calls evenly over the pods (one long-lived HTTP/2 connection puts them all on one pod,
which then refuses at 1/N of the quota), and it needs every pod to know how many pods are ready, which
changes while they scale. A store is exact whatever the spread, for one round trip per call
(`python -m bench.quota_store`, redis-server on loopback: a charge 231 µs p50 against 1.2 µs in the
process, TTFT p50 9.70 against 9.13 ms on the synthetic backend).

One call is one script run on the server (atomic there, on the server's clock, so the pods' clocks do not
matter): refill both buckets for the time since they were last touched, take the tokens this pod's calls
used since it last asked, then charge the call or say which bucket refuses it and for how long. The
tokens a call uses while it streams are summed in the pod and sent at most every FLUSH_SECONDS, or with
the tenant's next call, whichever comes first: one round trip per flush, not per chunk.

When the store cannot be reached (an error, or no answer within `timeoutMilliseconds`), it is not asked
again for RETRY_SECONDS, and calls meanwhile go as `onUnreachable` says: `open` (the default, as Envoy's
rate limit service fails open) charges this pod's own buckets, which follow this pod's calls all along,
so a tenant gets at most its quota per pod until the store is back; `closed` refuses every call that has a
quota with UNAVAILABLE (503). Tokens used meanwhile are kept, a count per tenant, and sent once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from promptpipe.contract.spec import AuthSpec, QuotaSpec, QuotaStoreSpec
from promptpipe.runtime.admission import AdmissionQueue, Flow
from promptpipe.runtime.errors import QuotaExceeded, Unavailable
from promptpipe.runtime.metrics import QuotaStoreMetrics
from promptpipe.runtime.quotas import LocalTenancy, tenant_flow

log = logging.getLogger(__name__)

# Tokens used while calls stream go to the store at most this often (and with the tenant's next call).
FLUSH_SECONDS = 0.25
# After the store failed to answer, calls go as onUnreachable says for this long before it is asked again.
RETRY_SECONDS = 1.0
# Connections to the store per gateway process: a script run takes well under a millisecond there.
MAX_CONNECTIONS = 16

# KEYS[1]: the tenant's buckets (a hash). ARGV: requests per minute and tokens per minute (0: no limit),
# tokens used since this pod last told, and 1 to charge a call (0 only to record the tokens).
# Returns {refused, retry_after}: refused is "" (admitted), "tokens" or "requests"; retry_after in seconds,
# as a string (the server would cut a Lua number to an integer).
BUCKET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local used, charge = tonumber(ARGV[3]), ARGV[4] == '1'
local held = redis.call('HMGET', KEYS[1], 'r', 't', 's')
local elapsed = math.max(0, now - (tonumber(held[3]) or now))
local r = 0
if rpm > 0 then r = math.min(rpm, (tonumber(held[1]) or rpm) + elapsed * rpm / 60) end
local tk = 0
if tpm > 0 then tk = math.min(tpm, (tonumber(held[2]) or tpm) + elapsed * tpm / 60) - used end
local refused, wait = '', 0
if charge then
  if tpm > 0 and tk <= 0 then
    refused, wait = 'tokens', math.max(-tk, 1) / (tpm / 60)
  elseif rpm > 0 and r < 1 then
    refused, wait = 'requests', (1 - r) / (rpm / 60)
  elseif rpm > 0 then
    r = r - 1
  end
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(tk), 's', tostring(now))
-- Untouched for a minute, a bucket is full again: the key may go, unless a debt takes longer to repay.
local ttl = 120
if tpm > 0 and tk < 0 then ttl = math.ceil(120 + -tk / (tpm / 60)) end
redis.call('EXPIRE', KEYS[1], ttl)
return {refused, tostring(wait)}
"""


class QuotaStoreUnreachable(Unavailable):
    """The shared quota store does not answer and `onUnreachable` is closed."""


class SharedTenancy:
    """The tenants' quotas in the shared store, this process's own buckets as the fallback, and the
    per-tenant metrics (a Tenancy, as LocalTenancy is)."""

    def __init__(
        self,
        client: aioredis.Redis,
        key_prefix: str,
        auth: AuthSpec,
        store: QuotaStoreSpec,
        own: LocalTenancy,
        store_metrics: QuotaStoreMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._script = client.register_script(BUCKET_SCRIPT)
        self._prefix = key_prefix
        self._auth = auth
        self._store = store
        self._timeout = store.timeout_milliseconds / 1000
        # This pod's buckets, following its calls all along: what `open` charges while the store is away.
        self._own = own
        self._metrics = own.metrics
        self._store_metrics = store_metrics
        self._clock = clock
        self._unused: dict[str, int] = {}  # tokens used, by tenant, not yet sent to the store
        # Each tenant's quota and flow, looked up once (auth lists up to 256): bounded as the key file is.
        self._tenants: dict[str, tuple[QuotaSpec, Flow]] = {}
        self._down_until = 0.0
        self._down = False
        self._flushing: asyncio.Task[None] | None = None

    @classmethod
    def create(
        cls,
        url: str,
        pipeline_key: str,
        auth: AuthSpec,
        registry: CollectorRegistry,
        pipeline: str,
        queue: AdmissionQueue,
    ) -> SharedTenancy:
        """The gateway's tenants in the store at `url`, under keys of `pipeline_key` (namespace/name: two
        pipelines sharing a store keep apart)."""
        store = auth.quota_store or QuotaStoreSpec()
        seconds = store.timeout_milliseconds / 1000
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=seconds,
            socket_timeout=seconds,
            socket_connect_timeout=seconds,
        )
        client = aioredis.Redis(connection_pool=pool)
        return cls(
            client,
            f"promptpipe:quota:{{{pipeline_key}}}:",
            auth,
            store,
            LocalTenancy.create(auth, registry, pipeline, queue),
            QuotaStoreMetrics(registry, pipeline),
        )

    async def charge(self, tenant: str) -> Flow:
        quota, flow = self._tenant(tenant)
        if quota.requests_per_minute is None and quota.tokens_per_minute is None:
            self._metrics.call(tenant, "admitted")
            return flow
        answer = await self._ask(tenant, self._args(quota, self._unused.pop(tenant, 0), charge=True))
        if answer is None:  # unreachable: as onUnreachable says
            if self._store.on_unreachable == "closed":
                self._metrics.call(tenant, "quota_store_unreachable")
                raise QuotaStoreUnreachable(f"tenant {tenant}: the quota store is unreachable; retry later")
            return self._own.charge_now(tenant)
        refused, retry_after = answer
        if refused:
            self._metrics.call(tenant, f"over_{refused}_quota")
            per_minute = quota.tokens_per_minute if refused == "tokens" else quota.requests_per_minute
            raise QuotaExceeded(
                tenant,
                refused,
                f"tenant {tenant}: {refused} per minute used up ({per_minute}); retry in {retry_after:.1f}s",
                retry_after,
            )
        # This pod's buckets follow its calls too, so that a fallback starts from where this pod stands.
        with contextlib.suppress(QuotaExceeded):
            self._own.quotas.admit(tenant)
        self._metrics.call(tenant, "admitted")
        return flow

    def used(self, tenant: str, tokens: int) -> None:
        if not tokens:
            return
        self._own.used(tenant, tokens)  # and counted in the tenant's metrics
        if self._tenant(tenant)[0].tokens_per_minute is None:
            return
        self._unused[tenant] = self._unused.get(tenant, 0) + tokens
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_soon())

    async def close(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
        await self.flush()  # what the last calls used is not forgiven on a rollout
        await self._client.aclose()

    async def flush(self) -> None:
        """Send the tokens used since the last flush, one round trip for all tenants."""
        unused, self._unused = self._unused, {}
        if not unused or self._clock() < self._down_until:
            self._keep(unused)
            return
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    for tenant, tokens in unused.items():
                        args = self._args(self._tenant(tenant)[0], tokens, charge=False)
                        await self._script(keys=[self._key(tenant)], args=args, client=pipe)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._keep(unused)
            self._failed(exc)
        else:
            self._answered()

    async def _ask(self, tenant: str, args: tuple[int, int, int, int]) -> tuple[str, float] | None:
        """The store's answer for one call of `tenant` (None: unreachable); `args` as BUCKET_SCRIPT's ARGV."""
        used = args[2]
        if self._clock() < self._down_until:
            self._keep({tenant: used})
            return None
        try:
            async with asyncio.timeout(self._timeout):
                refused, retry_after = await self._script(keys=[self._key(tenant)], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._keep({tenant: used})
            self._failed(exc)
            return None
        self._answered()
        return refused.decode(), float(retry_after)

    def _tenant(self, name: str) -> tuple[QuotaSpec, Flow]:
        known = self._tenants.get(name)
        if known is None:
            quota = self._auth.quota_of(name)
            known = self._tenants[name] = (quota, tenant_flow(name, quota))
        return known

    @staticmethod
    def _args(quota: QuotaSpec, tokens: int, charge: bool) -> tuple[int, int, int, int]:
        return (quota.requests_per_minute or 0, quota.tokens_per_minute or 0, tokens, 1 if charge else 0)

    def _key(self, tenant: str) -> str:
        return self._prefix + tenant

    def _keep(self, unused: dict[str, int]) -> None:
        for tenant, tokens in unused.items():
            if tokens:
                self._unused[tenant] = self._unused.get(tenant, 0) + tokens

    def _answered(self) -> None:
        if self._down:
            self._down = False
            log.warning("quota store answers again: the tenants' quotas are shared again")
        self._store_metrics.answered()

    def _failed(self, exc: BaseException) -> None:
        if not self._down:  # said once per outage, not per call
            self._down = True
            how = "this pod's own buckets" if self._store.on_unreachable == "open" else "calls with a quota refused"
            log.warning("quota store unreachable (%s: %s); %s until it answers", type(exc).__name__, exc, how)
        self._down_until = self._clock() + RETRY_SECONDS
        self._store_metrics.failed()

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()
