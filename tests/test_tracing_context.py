"""A stage span closed from another task's context (grpc drops a handler whose client left at a `yield`;
the loop's finalizer closes it later) ends without OpenTelemetry's "Failed to detach context" error in the
stage's log, and that logger's other errors still show."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from promptpipe.runtime.tracing import DETACH_FAILED, quiet_foreign_detach, tracer


async def spanned() -> AsyncIterator[int]:
    with tracer().start_as_current_span("post"):
        yield 1
        yield 2


async def closed_from_another_task() -> None:
    events = spanned()
    await asyncio.create_task(anext(events))  # entered in one task's context
    await asyncio.create_task(events.aclose())  # closed in another's


async def test_a_span_closed_from_another_tasks_context_logs_no_detach_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        await closed_from_another_task()
    assert DETACH_FAILED in caplog.text, "without the filter OpenTelemetry logs it: the case is real"
    caplog.clear()

    logger = logging.getLogger("opentelemetry.context")
    quiet_foreign_detach()
    quiet_foreign_detach()  # once per process, however often tracing is set up
    try:
        assert len(logger.filters) == 1
        with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
            await closed_from_another_task()
            logger.error("some other failure")
        assert DETACH_FAILED not in caplog.text
        assert "some other failure" in caplog.text
    finally:
        logger.filters.clear()
