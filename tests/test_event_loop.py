"""The event loop a stage process or the CLI runs on: uvloop unless PROMPTPIPE_EVENT_LOOP says asyncio."""

from __future__ import annotations

import asyncio

import pytest

from promptpipe import event_loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default_the_standard_loop_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.run(loop_module()).startswith("uvloop")
    monkeypatch.setenv(event_loop.ENV, "asyncio")
    assert event_loop.run(loop_module()).startswith("asyncio")
    assert event_loop.run(loop_module(), "uvloop").startswith("uvloop"), "a caller's choice wins"


def test_an_unknown_loop_is_refused_saying_which_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.ENV, "trio")
    with pytest.raises(ValueError, match="PROMPTPIPE_EVENT_LOOP='trio': must be one of uvloop, asyncio"):
        event_loop.chosen()
