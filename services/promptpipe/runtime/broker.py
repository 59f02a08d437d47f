"""One admission queue for a stage's worker processes (`stages.<stage>.workers`).

The supervising process holds the stage's one `AdmissionQueue` and lends its slots over a Unix socket;
each worker asks through a `BrokeredQueue`, which admits as an `AdmissionQueue` does. So `concurrency`
and `capacity` bound the stage as a whole, however the kernel spreads connections over the workers, and
the queue's order and shed policies are the same code. A worker that dies gives its slots back (its
connection closes). What it costs: a round trip on the socket to admit a call and a message to release
it, both outside the token path.

Messages are JSON arrays, one per line: worker to broker `["a", id, timeout, flow, weight, priority]`
(admit), `["c", id]` (gave up), `["r", id]` (release), `["s", id]` (stats); broker to worker
`["g", id, waited]` (granted), `["x", id, reason, retry_after, message]` (shed), `["d", id]` (deadline
passed while queued), `["s", id, stats]`.
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
from promptpipe.runtime.admission import ONE_FLOW, AdmissionCounters, AdmissionQueue, Flow
from promptpipe.runtime.errors import DeadlineExceeded, Shed, Unavailable

log = logging.getLogger(__name__)

# A line is one small message; a worker sending more is broken.
MAX_LINE_BYTES = 64 * 1024


def _line(*fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


class AdmissionBroker:
    """The supervisor's side: the stage's queue, lent to the workers connected on `path`."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue = queue
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.StreamWriter] = set()

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
        except (ConnectionError, ValueError) as exc:  # a broken worker: its calls end below
            log.warning("admission broker: a worker's link failed: %s", exc)
        finally:
            # The worker is gone (it exited or crashed): whatever it held or waited for is given back.
            for task in list(holds.values()):
                task.cancel()
            self._links.discard(writer)
            writer.close()

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


class BrokeredQueue:
    """A worker's side: admission as `AdmissionQueue.slot` gives it, from the supervisor's queue.

    `depth`, `in_flight` and `counters` are this worker's own share (the stage's are the broker's:
    `stats()`); `capacity`, `concurrency` and the policy are the stage's."""

    def __init__(self, spec: QueueSpec) -> None:
        self.capacity = spec.capacity
        self.concurrency = spec.concurrency
        self.policy = spec.shed_policy
        self.retry_after = spec.retry_after_seconds
        self.depth = 0
        self.in_flight = 0
        self.counters = AdmissionCounters()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._receiving: asyncio.Task[None] | None = None

    async def connect(self, path: str, lost: Callable[[], None] | None = None) -> None:
        """Link to the broker at `path`; `lost` is called if the link ends (the supervisor is gone)."""
        self._reader, self._writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
        self._receiving = asyncio.create_task(self._receive(self._reader))
        if lost is not None:
            self._receiving.add_done_callback(lambda task: None if task.cancelled() else lost())

    async def close(self) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
        if self._writer is not None:
            self._writer.close()

    def _send(self, *fields: Any) -> None:
        if self._writer is None or self._writer.is_closing():
            raise Unavailable("the stage's admission broker is gone")
        self._writer.write(_line(*fields))

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                op, call, *args = json.loads(line)
                fut = self._pending.pop(call, None)
                if fut is None or fut.done():
                    continue
                if op == "g":
                    fut.set_result(args[0])
                elif op == "x":
                    reason, retry_after, message = args
                    fut.set_exception(Shed(message, retry_after, reason))
                elif op == "d":
                    fut.set_exception(DeadlineExceeded("deadline passed while queued"))
                elif op == "s":
                    fut.set_result(args[0])
        finally:
            # The supervisor is gone: nothing more will be admitted here.
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(Unavailable("the stage's admission broker is gone"))
            self._pending.clear()
            if self._writer is not None:
                self._writer.close()

    def _ask(self, *fields: Any) -> tuple[int, asyncio.Future[Any]]:
        call = next(self._ids)
        fut = self._pending[call] = asyncio.get_running_loop().create_future()
        self._send(fields[0], call, *fields[1:])
        return call, fut

    @contextlib.asynccontextmanager
    async def slot(self, timeout: float | None, flow: Flow = ONE_FLOW) -> AsyncIterator[float]:
        """Hold one of the stage's work slots for the body; yields the seconds spent waiting for it."""
        call, fut = self._ask("a", timeout, flow.name, flow.weight, flow.priority)
        self.depth += 1
        try:
            waited: float = await fut
        except asyncio.CancelledError:
            self._pending.pop(call, None)
            with contextlib.suppress(Unavailable):
                self._send("c", call)  # the broker drops the wait, or frees a slot granted meanwhile
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
            yield waited
        finally:
            self.in_flight -= 1
            self.counters.completed += 1
            with contextlib.suppress(Unavailable):
                self._send("r", call)

    async def stats(self) -> dict[str, int]:
        """The stage's queue as the broker sees it (all workers): depth, in_flight and the counters."""
        _, fut = self._ask("s")
        result: dict[str, int] = await fut
        return result
