"""A stage process's logs: text for a terminal, or one JSON object per line for a cluster's log store
(`PROMPTPIPE_LOG_FORMAT=json`, the images' and the chart's default).

Every line carries the process's pipeline and stage; a line logged while a call is worked on carries its
request id too and, at the gateway, its tenant. Never the prompt or the answer: messages are the code's
own, and no call's text is passed to a logger.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
from typing import Any, Literal

LogFormat = Literal["text", "json"]

# The call a task is working on: `request_id`, and at the gateway `tenant`. Set once per call's task (a
# gRPC handler and an HTTP request each run in a task of their own), so it never needs resetting.
_CALL: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("promptpipe_call", default={})  # noqa: B039 - never mutated: replaced whole

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def in_call(**fields: str) -> None:
    """From here on, this task's log lines carry `fields` (request_id, tenant) as well."""
    _CALL.set({**_CALL.get(), **{k: v for k, v in fields.items() if v}})


def call_fields() -> dict[str, str]:
    return _CALL.get()


class _CallFields(logging.Filter):
    def __init__(self, process: dict[str, str]) -> None:
        super().__init__()
        self._process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.promptpipe = {**self._process, **_CALL.get()}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the process's and the call's
    fields, an `access` object for an access-log line, and the exception's traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "promptpipe", {}),
        }
        access = getattr(record, "access", None)
        if access is not None:
            line["access"] = access
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, fmt: LogFormat, pipeline: str, stage: str) -> None:
    """The root logger of a stage process: `fmt` lines to stderr, each with the process's fields."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_CallFields({"pipeline": pipeline, "stage": stage}))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
