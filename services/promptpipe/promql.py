"""The one Prometheus HTTP API client: an instant query, bounded in time and in the bytes read.

Used by the operator's rollout analysis and by `promptpipe analyze --prometheus`. Standard library only,
so either deployable may import it. A failure is a PrometheusError whose message says what went wrong
without copying what the server sent, except Prometheus' own short error string for a refused query.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

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
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - the named Prometheus
            data = _json_object(response.read(MAX_ANSWER_BYTES))
    except urllib.error.HTTPError as e:  # Prometheus answers a bad query with 400 and a JSON error
        data = _json_object(e.read(MAX_ANSWER_BYTES)) or {"error": f"HTTP {e.code}, not a Prometheus API answer"}
    except (OSError, ValueError) as e:
        raise PrometheusError(f"Prometheus at {url} could not be queried: {type(e).__name__}") from None
    result = data.get("data", {}).get("result") if data.get("status") == "success" else None
    if not isinstance(result, list):
        error = data.get("error")
        told = error[:MAX_ERROR_CHARS] if isinstance(error, str) else "not a Prometheus API answer"
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
