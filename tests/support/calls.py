"""Small helpers for driving the gateway from tests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc


@dataclass
class Outcome:
    text: str = ""
    chunks: int = 0
    summary: gateway_pb2.GenerateSummary | None = None
    error: GenerationError | None = None
    first_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float = 0.0


async def collect(target: str, prompt: str, outcome: Outcome | None = None, **kwargs: object) -> Outcome:
    outcome = outcome or Outcome()
    async with PipelineClient(target) as client:
        try:
            async for r in client.generate(prompt, **kwargs):  # type: ignore[arg-type]
                if r.HasField("chunk"):
                    outcome.text += r.chunk.text
                    outcome.chunks += 1
                    outcome.first_chunk.set()
                else:
                    outcome.summary = r.summary
        except GenerationError as e:
            outcome.error = e
    outcome.ended_at = time.monotonic()
    return outcome


async def stats(target: str) -> stage_pb2.StageStats:
    async with grpc.aio.insecure_channel(target) as channel:
        result: stage_pb2.StageStats = await stage_pb2_grpc.StageStub(channel).Stats(
            stage_pb2.StatsRequest(), timeout=5
        )
        return result


async def queue_depth(target: str) -> int:
    return (await stats(target)).queue_depth
