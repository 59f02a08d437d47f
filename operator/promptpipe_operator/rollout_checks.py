"""What a rollout looks at outside the API server: the smoke generation, the gateways' metrics,
Prometheus, and the registry. Thin I/O; every failure comes back as a value, never raised."""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from promptpipe import bounded_http, promql
from promptpipe.contract.spec import PipelineSpec
from promptpipe.registry import errors as registry_errors
from promptpipe.registry.refs import ModelRef
from promptpipe.registry.store import Registry
from promptpipe_operator.analysis import Counts, parse_gateway, prometheus_queries, quantile, since, verdict

log = logging.getLogger("promptpipe.operator")


def smoke(base_url: str, spec: PipelineSpec, most_seconds: float) -> tuple[bool, str]:
    """One generation through TGI's /generate; it passes if TGI answers 200 with generated text. It takes
    at most `spec.rollout.smoke.timeout`, and never more than `most_seconds` (what the reconcile that runs
    it leaves: a smoke check may not outlast the reconcile's bound and fail the operator's liveness)."""
    cfg = spec.rollout.smoke
    deadline = min(cfg.timeout, most_seconds)
    body = json.dumps({"inputs": cfg.prompt, "parameters": {"max_new_tokens": cfg.max_new_tokens}}).encode()
    try:
        got = bounded_http.request(
            f"{base_url}/generate",
            deadline_seconds=deadline,
            max_bytes=MAX_SMOKE_BYTES,
            method="POST",
            body=body,
            headers={"Content-Type": "application/json"},
        )
    except bounded_http.HttpFailure as e:
        return False, f"POST {base_url}/generate failed: {e}"
    # What the pod sent is never told (it goes into status and Events): a status code and a reason are enough.
    if got.status != 200:
        return False, f"POST {base_url}/generate answered HTTP {got.status}"
    try:
        answer = json.loads(got.body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("generated_text"), str):
        return False, f"POST {base_url}/generate answered without generated_text"
    return True, f"generated {len(answer['generated_text'])} characters"


# A smoke generation's answer: a few tokens of text; the metrics of one gateway pod: a few hundred series.
MAX_SMOKE_BYTES = 64 * 1024
MAX_METRICS_BYTES = 4 * 1024 * 1024


def scrape(urls: dict[str, str], pipeline: str, timeout: float = 3.0) -> dict[str, Counts]:
    """Each gateway pod's counters, keyed by pod; pods that do not answer (within `timeout` in all, with at
    most MAX_METRICS_BYTES, no redirect followed) are left out."""
    out: dict[str, Counts] = {}
    for pod, url in urls.items():
        try:
            got = bounded_http.request(url, deadline_seconds=timeout, max_bytes=MAX_METRICS_BYTES)
            if got.status != 200:
                raise bounded_http.HttpFailure(f"HTTP {got.status}")
            out[pod] = parse_gateway(got.body.decode(errors="replace"), pipeline)
        except (bounded_http.HttpFailure, ValueError) as e:
            log.warning("could not scrape a gateway", extra={"pod": pod, "url": url, "error": str(e)})
    return out


def analyse_scrapes(
    current: dict[str, Counts], baseline: dict[str, Any] | None, spec: PipelineSpec
) -> tuple[bool | None, str]:
    base = {pod: Counts.from_json(c) for pod, c in (baseline or {}).items()}
    delta = since(current, base)
    return verdict(delta.requests, delta.errors, quantile(0.95, delta.ttft_buckets), spec.rollout.analysis)


def analyse_prometheus(
    namespace: str, pipeline: str, since_switch: float, spec: PipelineSpec
) -> tuple[bool | None, str]:
    """The calls since the switch, from the Prometheus the spec names (spec.rollout.analysis.prometheus)."""
    source = spec.rollout.analysis.prometheus
    if source is None:
        return None, "spec.rollout.analysis.prometheus is not set"
    url = source.url
    seconds = max(since_switch, 0.0) + source.scrape_interval
    values: dict[str, float | None] = {}
    for key, query in prometheus_queries(namespace, pipeline, seconds).items():
        try:
            result = promql.instant_query(url, query, PROMETHEUS_TIMEOUT_SECONDS)
        except promql.PrometheusError as e:
            return None, str(e)
        raw = float(result[0]["value"][1]) if result else None
        values[key] = None if raw is None or raw != raw else raw  # NaN: no data
    return verdict(values["requests"] or 0.0, values["errors"] or 0.0, values["ttft_p95"], spec.rollout.analysis)


PROMETHEUS_TIMEOUT_SECONDS = 5.0


def resolve_version(registry: Registry | None, spec: PipelineSpec) -> tuple[str | None, str]:
    """The version the spec names now, and why not if it cannot be told."""
    model = spec.model
    if not model.from_registry:
        tgi = model.tgi
        return (tgi.model_id if tgi and tgi.model_id else model.name), ""
    if model.version and registry is None:
        return model.version, ""
    if registry is None:
        return None, "spec.model.alias needs the registry; the operator has no PROMPTPIPE_REGISTRY_* settings"
    try:
        ref = ModelRef(model.name, version=model.version or None, alias=model.alias or None)
        return registry.version_of(ref), ""
    except registry_errors.RegistryError as e:
        return None, str(e)


def digest_of(registry: Registry | None, spec: PipelineSpec, version: str | None) -> tuple[str, str]:
    """(the registry's digest of `version`, which the pods that pull it are pinned to, ''), ('', '') when the
    model is not the registry's, or ('', why) when the digest cannot be read now."""
    if registry is None or version is None or not spec.model.from_registry:
        return "", ""
    try:
        return registry.digest_of(spec.model.name, version), ""
    except registry_errors.RegistryError as e:
        return "", f"the digest of {spec.model.name}:{version} cannot be read now ({e}): not rolled out unpinned"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
