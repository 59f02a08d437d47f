"""The inference backend interface: a prompt in, text pieces out, then an outcome."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from promptpipe.v1 import common_pb2


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    session_id: str
    deadline: float  # time.monotonic() clock
    request_id: str = ""
    # Which replica's cache this call wants (`routing.routing_key`); empty: the session id.
    routing_key: str = ""

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Piece:
    text: str
    tokens: int = 1


@dataclass(frozen=True)
class Outcome:
    finish_reason: common_pb2.FinishReason
    completion_tokens: int
    # Times the call was carried on on another replica after one failed mid-stream.
    failovers: int = 0


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        """Yield pieces as they are generated, then exactly one Outcome.

        Closing the iterator early (caller gone, deadline) must stop the generation.
        """
        ...

    async def close(self) -> None: ...

    def available(self) -> bool:
        """Whether a call could be served now (false while every endpoint's circuit is open)."""
        ...

    def held_for(self) -> float:
        """Seconds the backend has been held by one call beyond that call's own slot (the embedded model,
        taken until its decode thread ends); 0 when it holds nothing of its own."""
        ...
