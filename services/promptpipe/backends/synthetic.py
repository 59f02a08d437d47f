"""A backend that streams filler tokens as fast as asked: the benchmark's yardstick."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.contract.spec import SyntheticSpec
from promptpipe.v1.common_pb2 import FINISH_REASON_LENGTH


class SyntheticBackend:
    name = "synthetic"

    def __init__(self, spec: SyntheticSpec) -> None:
        self._interval = 1.0 / spec.tokens_per_second if spec.tokens_per_second > 0 else 0.0
        self._text = spec.token_text
        self._first = spec.first_token_seconds

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def held_for(self) -> float:
        return 0.0  # a call holds nothing here beyond its admission slot

    def available(self) -> bool:
        return True

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        piece = Piece(self._text)
        if self._first:
            await asyncio.sleep(self._first)
        start = time.monotonic()
        for i in range(request.max_new_tokens):
            if self._interval:
                # Paced against the start, so timer slack does not add up.
                await asyncio.sleep(max(0.0, start + i * self._interval - time.monotonic()))
            else:
                await asyncio.sleep(0)  # let readers run; "as fast as asked" is as fast as they read
            yield piece
        yield Outcome(FINISH_REASON_LENGTH, request.max_new_tokens)
