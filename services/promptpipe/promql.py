"""The one Prometheus HTTP API client: an instant query, bounded in time and in the bytes read.

Used by the operator's rollout analysis and by `promptpipe analyze --prometheus`. Standard library only
(over `bounded_http`: a total deadline, no redirect followed), so either deployable may import it. A
failure is a PrometheusError whose message says what went wrong without copying what the server sent,
except Prometheus' own short error string for a refused query.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from typing import Any

from promptpipe import bounded_http

# The most of an answer read: the vectors asked for are a few samples, a few hundred bytes each.
MAX_ANSWER_BYTES = 1 << 20
# The most of Prometheus' own error string told.
MAX_ERROR_CHARS = 200


class PrometheusError(Exception):
    pass


def instant_query(url: str, promql: str, timeout: float) -> list[dict[str, Any]]:
    """The result vector of `promql` at `url` (the server's base URL): each sample's `metric` and `value`."""
    target = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        answer = bounded_http.request(target, deadline_seconds=timeout, max_bytes=MAX_ANSWER_BYTES)
    except bounded_http.HttpFailure as e:
        raise PrometheusError(f"Prometheus at {url} could not be queried: {e}") from None
    data = _json_object(answer.body)  # a bad query is refused with 400 and a JSON error, read the same
    result = data.get("data", {}).get("result") if data.get("status") == "success" else None
    if not isinstance(result, list):
        # Prometheus' own refusal ({"status": "error", "errorType": ..., "error": ...}) is told, shortened;
        # anything else is not repeated.
        error = data.get("error")
        told = f"not a Prometheus API answer (HTTP {answer.status})"
        if data.get("status") == "error" and "errorType" in data and isinstance(error, str):
            told = error[:MAX_ERROR_CHARS]
        raise PrometheusError(f"Prometheus refused the query {promql!r}: {told}")
    return result


def vector(url: str, promql: str, timeout: float, label: str = "") -> dict[str, float]:
    """An instant query's samples by their `label` ("" for one without it); NaN (no data) is left out."""
    out = {}
    for row in instant_query(url, promql, timeout):
        value = float(row["value"][1])
        if not math.isnan(value):
            out[row["metric"].get(label, "")] = value
    return out


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
