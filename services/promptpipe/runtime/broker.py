"""What a stage's worker processes share (`stages.<stage>.workers`), kept by their supervisor.

The supervising process holds the stage's one `AdmissionQueue` and, for the gateway, its tenants' quotas
and per-tenant metrics (`quotas.LocalTenancy`), and lends them over a Unix socket. Each worker talks to
it through one `BrokerLink`: a `BrokeredQueue` admits as an `AdmissionQueue` does, a `BrokeredTenancy`
charges calls as `LocalTenancy` does. So `concurrency`, `capacity` and a tenant's requests and tokens per
minute bound the stage as a whole, however the kernel spreads connections over the workers, and the
queue's order, shed policies and token buckets are the same code. A worker that dies gives its slots
back (its connection closes). What it costs: a round trip on the socket to admit a call (and, on the
gateway, one to charge it) and a message to release it, all outside the token path.

Messages are JSON arrays, one per line. Worker to broker: `["a", id, timeout, flow, weight, priority]`
(admit), `["c", id]` (gave up), `["r", id]` (release), `["s", id]` (queue stats), `["q", id, tenant]`
(charge a call to a tenant), `["u", 0, tenant, tokens]` (a tenant's call used tokens), `["m", id]` (the
stage's metrics). Broker to worker: `["g", id, waited]` (granted), `["x", id, reason, retry_after,
message]` (shed), `["d", id]` (deadline passed while queued), `["s", id, stats]`, `["f", id, flow, weight,
priority]` (charged: the call's flow), `["e", id, tenant, limit, message, retry_after]` (quota used up),
`["m", id, exposition]` or `["n", id, reason]` (not rendered).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from promptpipe.contract.spec import QueueSpec
from promptpipe.runtime.admission import ONE_FLOW, AdmissionCounters, AdmissionQueue, Flow, Holds
from promptpipe.runtime.errors import DeadlineExceeded, QuotaExceeded, Shed, Unavailable
from promptpipe.runtime.quotas import LocalTenancy

log = logging.getLogger(__name__)

# A worker's message is small; a worker sending more is broken.
MAX_LINE_BYTES = 64 * 1024
# The broker's answers include the stage's metrics exposition, which grows with its tenants and series.
MAX_ANSWER_BYTES = 64 * 1024 * 1024


def _line(*fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


class StageBroker:
    """The supervisor's side: the stage's queue (and the gateway's tenancy), lent to the workers connected
    on `path`; `exposition` renders the stage's metrics (the workers', merged) for a worker that serves
    them (the gateway's HTTP /metrics)."""

    def __init__(
        self,
        queue: AdmissionQueue,
        tenancy: LocalTenancy | None = None,
        exposition: Callable[[], bytes] | None = None,
    ) -> None:
        self.queue = queue
        self.tenancy = tenancy
        self._exposition = exposition
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path, limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links.add(writer)
        holds: dict[int, asyncio.Task[None]] = {}
        releases: dict[int, asyncio.Event] = {}
        try:
            while line := await reader.readline():
                op, call, *args = json.loads(line)
                if op == "a":
                    timeout, name, weight, priority = args
                    release = releases[call] = asyncio.Event()
                    task = holds[call] = asyncio.create_task(
                        self._hold(call, timeout, Flow(name, weight, priority), release, writer)
                    )
                    task.add_done_callback(_forget(call, holds, releases))
                elif op == "r":
                    done = releases.get(call)
                    if done is not None:
                        done.set()
                elif op == "c":
                    waiting = holds.get(call)
                    if waiting is not None:
                        waiting.cancel()
                elif op == "s":
                    writer.write(_line("s", call, self.queue.snapshot()))
                elif op == "q":
                    writer.write(self._charge(call, args[0]))
                elif op == "u":
                    tenant, tokens = args
                    self._tenancy().used(tenant, tokens)
                elif op == "m":
                    self._spawn(self._expose(call, writer))
                else:
                    raise ValueError(f"unknown message {op!r}")
        except (ConnectionError, ValueError) as exc:  # a broken worker: its calls end below
            log.warning("stage broker: a worker's link failed: %s", exc)
        finally:
            # The worker is gone (it exited or crashed): whatever it held or waited for is given back.
            for task in list(holds.values()):
                task.cancel()
            self._links.discard(writer)
            writer.close()

    def _tenancy(self) -> LocalTenancy:
        if self.tenancy is None:
            raise ValueError("this stage keeps no tenants (only the gateway does)")
        return self.tenancy

    def _charge(self, call: int, tenant: str) -> bytes:
        try:
            flow = self._tenancy().charge_now(tenant)
        except QuotaExceeded as exc:
            return _line("e", call, exc.tenant, exc.limit, exc.message, exc.retry_after)
        return _line("f", call, flow.name, flow.weight, flow.priority)

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expose(self, call: int, writer: asyncio.StreamWriter) -> None:
        try:
            if self._exposition is None:
                raise LookupError("this stage's supervisor serves no metrics")
            # Off the loop: it reads every worker's /metrics, and the queue must not wait for that.
            answer = _line("m", call, (await asyncio.to_thread(self._exposition)).decode())
        except Exception as exc:  # the worker's request ends with the reason, never waits
            log.exception("stage metrics not rendered for a worker")
            answer = _line("n", call, f"the stage's metrics: {exc}")
        if not writer.is_closing():
            writer.write(answer)

    async def _hold(
        self, call: int, timeout: float | None, flow: Flow, release: asyncio.Event, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with self.queue.slot(timeout, flow) as waited:
                writer.write(_line("g", call, waited))
                await release.wait()
        except Shed as exc:
            writer.write(_line("x", call, exc.reason, exc.retry_after, exc.message))
        except DeadlineExceeded:
            writer.write(_line("d", call))


def _forget(
    call: int, holds: dict[int, asyncio.Task[None]], releases: dict[int, asyncio.Event]
) -> Callable[[asyncio.Task[None]], None]:
    def done(_: asyncio.Task[None]) -> None:
        holds.pop(call, None)
        releases.pop(call, None)

    return done


class BrokerLink:
    """A worker's one connection to its supervisor's broker: requests, and their answers matched by id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._receiving: asyncio.Task[None] | None = None

    async def connect(self, path: str, lost: Callable[[], None] | None = None) -> None:
        """Link to the broker at `path`; `lost` is called if the link ends (the supervisor is gone)."""
        reader, self._writer = await asyncio.open_unix_connection(path, limit=MAX_ANSWER_BYTES)
        self._receiving = asyncio.create_task(self._receive(reader))
        if lost is not None:
            self._receiving.add_done_callback(lambda task: None if task.cancelled() else lost())

    async def close(self) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
        if self._writer is not None:
            self._writer.close()

    def send(self, *fields: Any) -> None:
        if self._writer is None or self._writer.is_closing():
            raise Unavailable("the stage's broker is gone")
        self._writer.write(_line(*fields))

    def ask(self, op: str, *fields: Any) -> tuple[int, asyncio.Future[Any]]:
        """Send a request; its id, and the future its answer settles."""
        call = next(self._ids)
        fut = self._pending[call] = asyncio.get_running_loop().create_future()
        try:
            self.send(op, call, *fields)
        except Unavailable:
            del self._pending[call]
            raise
        return call, fut

    def forget(self, call: int) -> None:
        self._pending.pop(call, None)

    async def metrics(self) -> bytes:
        """The stage's metrics exposition (all its workers'), as its supervisor serves it."""
        _, fut = self.ask("m")
        text: str = await fut
        return text.encode()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                op, call, *args = json.loads(line)
                fut = self._pending.pop(call, None)
                if fut is None or fut.done():
                    continue
                if op in ("g", "s", "m"):
                    fut.set_result(args[0])
                elif op == "f":
                    fut.set_result(Flow(*args))
                elif op == "x":
                    reason, retry_after, message = args
                    fut.set_exception(Shed(message, retry_after, reason))
                elif op == "e":
                    tenant, limit, message, retry_after = args
                    fut.set_exception(QuotaExceeded(tenant, limit, message, retry_after))
                elif op == "d":
                    fut.set_exception(DeadlineExceeded("deadline passed while queued"))
                elif op == "n":
                    fut.set_exception(Unavailable(args[0]))
        finally:
            # The supervisor is gone: nothing more will be admitted here.
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(Unavailable("the stage's broker is gone"))
            self._pending.clear()
            if self._writer is not None:
                self._writer.close()


class BrokeredQueue:
    """A worker's admission: as `AdmissionQueue.slot` gives it, from the supervisor's queue.

    `depth`, `in_flight` and `counters` are this worker's own share (the stage's are the broker's:
    `stats()`); `capacity`, `concurrency` and the policy are the stage's."""

    def __init__(self, link: BrokerLink, spec: QueueSpec) -> None:
        self._link = link
        self.capacity = spec.capacity
        self.concurrency = spec.concurrency
        self.policy = spec.shed_policy
        self.retry_after = spec.retry_after_seconds
        self.depth = 0
        self.in_flight = 0
        self.counters = AdmissionCounters()
        self._holds = Holds()

    def held_for(self) -> float:
        return self._holds.longest()

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float | None, flow: Flow = ONE_FLOW) -> AsyncIterator[float]:
        """Hold one of the stage's work slots for the body; yields the seconds spent waiting for it."""
        call, fut = self._link.ask("a", timeout, flow.name, flow.weight, flow.priority)
        self.depth += 1
        try:
            waited: float = await fut
        except asyncio.CancelledError:
            self._link.forget(call)
            with contextlib.suppress(Unavailable):
                self._link.send("c", call)  # the broker drops the wait, or frees a slot granted meanwhile
            raise
        except Shed as exc:
            if exc.reason == "dropped":
                self.counters.dropped += 1
            else:
                self.counters.rejected += 1
            raise
        finally:
            self.depth -= 1
        self.in_flight += 1
        try:
            with self._holds.held():
                yield waited
        finally:
            self.in_flight -= 1
            self.counters.completed += 1
            with contextlib.suppress(Unavailable):
                self._link.send("r", call)

    async def stats(self) -> dict[str, int]:
        """The stage's queue as the broker sees it (all workers): depth, in_flight and the counters."""
        _, fut = self._link.ask("s")
        result: dict[str, int] = await fut
        return result


class BrokeredTenancy:
    """A gateway worker's tenants: each call charged to its tenant's quota in the supervisor, where the
    per-tenant metrics are kept too (`quotas.Tenancy`)."""

    def __init__(self, link: BrokerLink) -> None:
        self._link = link

    async def charge(self, tenant: str) -> Flow:
        call, fut = self._link.ask("q", tenant)
        try:
            flow: Flow = await fut
        except asyncio.CancelledError:
            self._link.forget(call)  # charged or not, the call's client is gone before it was admitted
            raise
        return flow

    def used(self, tenant: str, tokens: int) -> None:
        with contextlib.suppress(Unavailable):  # the supervisor is gone: the stage is stopping
            self._link.send("u", 0, tenant, tokens)
