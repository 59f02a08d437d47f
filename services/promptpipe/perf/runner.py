"""Runs a bench: each load level in turn, each bounded by a count of calls and a time, every call
recorded with its per-stage timings. A level ends when its calls have all ended (each within its
timeout), so the next level starts on an idle pipeline."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from promptpipe.perf.load import closed_loop, poisson_arrivals
from promptpipe.perf.prompts import Conversation, Prompt, synthetic
from promptpipe.perf.records import BenchResult, CallRecord, Level
from promptpipe.perf.transports import Transport

# Called after each call with its level's index and the record.
Progress = Callable[[int, CallRecord], None]


@dataclass(frozen=True)
class Plan:
    levels: list[Level]
    requests: int  # per level, at most (rounded up to whole sessions)
    seconds: float  # per level, at most: no session starts after it
    prompts: Callable[[random.Random], Prompt]
    turns: int = 1  # >1: multi-turn sessions, each turn carrying the conversation so far
    timeout: float = 60.0
    seed: int = 0
    # Calls sent one at a time before the first level and not recorded: connections, caches and a model's
    # first prompt warm up outside the figures.
    warmup: int = 0


async def run(plan: Plan, transport: Transport, result: BenchResult, progress: Progress | None = None) -> BenchResult:
    """Run every level of `plan` through `transport`, appending to `result` (its calls and windows)."""
    rng = random.Random(plan.seed)  # noqa: S311 - load shapes and filler text, reproducible by seed
    for _ in range(plan.warmup):
        await transport.call(plan.prompts(rng), "", plan.timeout)
    origin = time.perf_counter()
    for index, level in enumerate(plan.levels):
        level_run = _LevelRun(plan, transport, result, index, origin, rng, progress)
        start = time.perf_counter() - origin
        if level.kind == "concurrency":
            await closed_loop(int(level.value), level_run.session)
        else:
            await level_run.open_loop(level.value)
        result.windows.append((start, time.perf_counter() - origin))
    return result


class _LevelRun:
    def __init__(
        self,
        plan: Plan,
        transport: Transport,
        result: BenchResult,
        index: int,
        origin: float,
        rng: random.Random,
        progress: Progress | None,
    ) -> None:
        self.plan, self.transport, self.result, self.index = plan, transport, result, index
        self.origin, self.rng, self.progress = origin, rng, progress
        self.started = time.perf_counter()
        self.claimed = 0

    def _claim(self) -> bool:
        """One more session, if the level's count and time allow it: a session is sent whole, so a level
        of multi-turn sessions sends its count rounded up to whole sessions."""
        if self.claimed >= self.plan.requests or time.perf_counter() - self.started >= self.plan.seconds:
            return False
        self.claimed += self.plan.turns
        return True

    async def open_loop(self, rate: float) -> None:
        """Fixed rate: sessions start at Poisson arrival times whether or not earlier calls have ended."""
        sessions = -(-self.plan.requests // self.plan.turns)
        arrivals = poisson_arrivals(rate, self.plan.seconds, sessions, self.rng)
        tasks = []
        for at in arrivals:
            delay = self.started + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.session()))
        await asyncio.gather(*tasks)

    async def session(self) -> bool:
        """One session of `plan.turns` calls in sequence (one call when single-turn). False: none was sent."""
        if not self._claim():
            return False
        turns = self.plan.turns
        conversation = Conversation(uuid.uuid4().hex[:12], turns) if turns > 1 else None
        for turn in range(turns):
            prompt = self.plan.prompts(self.rng)
            if conversation is not None:
                prompt = conversation.next(prompt)
            session = conversation.session if conversation else ""
            start = time.perf_counter() - self.origin
            outcome = await self.transport.call(prompt, session, self.plan.timeout)
            record = CallRecord(
                level=self.index,
                start=start,
                status=outcome.status,
                ttft=outcome.ttft,
                e2e=outcome.e2e,
                output_tokens=outcome.output_tokens,
                prompt_tokens=outcome.prompt_tokens,
                server_ttft=outcome.server_ttft,
                server_total=outcome.server_total,
                session=session,
                turn=turn,
                stages=outcome.stages,
                itl=tuple(outcome.itl),
                error=outcome.message,
            )
            self.result.calls.append(record)
            if self.progress is not None:
                self.progress(self.index, record)
            if conversation is None:
                break
            if not record.ok:  # a session whose turn failed does not go on without its answer
                break
            conversation.answered(outcome.text)
        return True


def prompt_source(
    fixed: list[Prompt] | None, input_tokens: int, output_tokens: int
) -> Callable[[random.Random], Prompt]:
    """The prompts of a run: a file's in turn (cycling), or synthetic ones of the set lengths."""
    if fixed:
        cycle = itertools.cycle(fixed)
        return lambda _rng: next(cycle)
    return lambda rng: synthetic(input_tokens, output_tokens, rng)
