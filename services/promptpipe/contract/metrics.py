"""Metric names and their labels: one source for the stages that export them, the KEDA
trigger that scales on one, the rollout analysis that reads others, and the dashboard.

Names follow `promptpipe_<subsystem>_<name>_<unit>`. The subsystem says where it is
measured: `stage` (every stage's queue and calls), `gateway` (the public API, at the
stream stage), `backend` (the inference stage's model backend). Labels are bounded.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Label(str, enum.Enum):
    PIPELINE = "pipeline"
    STAGE = "stage"
    CODE = "code"  # a gRPC status code name: OK, UNAVAILABLE, ...
    REASON = "reason"
    BACKEND = "backend"
    TO = "to"  # the stage a call goes to
    REPLICA = "replica"  # a backend replica's address; bounded by the replicas there are
    TENANT = "tenant"  # an API key's tenant; the first TENANT_LABELS_MAX seen, the rest `other`
    OUTCOME = "outcome"
    OBJECTIVE = "objective"  # one of spec.slo's: ttft_p95_seconds, tpot_p95_seconds, error_rate
    HELD = "held"  # what a call holds: `slot` (a stage's work slot) or `model` (the embedded model)


# Most distinct tenant label values a gateway exports; tenants past them share the value `other`.
TENANT_LABELS_MAX = 64


class Kind(str, enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    help: str
    labels: tuple[Label, ...]

    @property
    def label_names(self) -> list[str]:
        return [label.value for label in self.labels]


_STAGE = (Label.PIPELINE, Label.STAGE)
_BACKEND = (Label.PIPELINE, Label.BACKEND)

STAGE_QUEUE_DEPTH = Metric("promptpipe_stage_queue_depth", Kind.GAUGE, "Requests waiting for a work slot.", _STAGE)
STAGE_QUEUE_CAPACITY = Metric("promptpipe_stage_queue_capacity", Kind.GAUGE, "Most requests that may wait.", _STAGE)
STAGE_IN_FLIGHT = Metric("promptpipe_stage_in_flight", Kind.GAUGE, "Requests holding a work slot.", _STAGE)
STAGE_NEXT_CALL_SECONDS = Metric(
    "promptpipe_stage_next_call_seconds_total",
    Kind.COUNTER,
    "Seconds calls from this stage to the stage `to` have been open (waiting for it to be up, queued or running"
    " there), open calls included: its rate is the mean number of calls open, what `to` scales on.",
    (*_STAGE, Label.TO),
)
STAGE_CONCURRENCY = Metric("promptpipe_stage_concurrency", Kind.GAUGE, "Work slots.", _STAGE)
STAGE_QUEUE_WAIT = Metric(
    "promptpipe_stage_queue_wait_seconds", Kind.HISTOGRAM, "Time spent waiting for a work slot.", _STAGE
)
STAGE_DURATION = Metric(
    "promptpipe_stage_duration_seconds",
    Kind.HISTOGRAM,
    "Time from slot to end of call, by status.",
    (*_STAGE, Label.CODE),
)
STAGE_SERVING = Metric(
    "promptpipe_stage_serving",
    Kind.GAUGE,
    "1 while the stage's health is SERVING, 0 while NOT_SERVING (loading, draining, every backend circuit open).",
    _STAGE,
)
STAGE_CALLER_DEADLINES = Metric(
    "promptpipe_stage_caller_deadline_exceeded_total",
    Kind.COUNTER,
    "Calls among the DEADLINE_EXCEEDED ones whose deadline the caller chose, shorter than the stage's"
    " timeoutSeconds: the caller's choice, not the stage's failure (rollout analysis does not count them).",
    _STAGE,
)
STAGE_SHED = Metric(
    "promptpipe_stage_shed_total", Kind.COUNTER, "Requests shed by the queue, by reason.", (*_STAGE, Label.REASON)
)
STAGE_CALLERS_REFUSED = Metric(
    "promptpipe_stage_callers_refused_total",
    Kind.COUNTER,
    "Calls refused before their request was read because their identity token named no process of the pipeline"
    " that may call this stage, by code (UNAUTHENTICATED: none, bad, expired or foreign; PERMISSION_DENIED).",
    (*_STAGE, Label.CODE),
)
STAGE_HELD = Metric(
    "promptpipe_stage_held_seconds",
    Kind.GAUGE,
    "How long the longest-held work slot (held=slot) or the embedded model (held=model) has been held by one"
    " call; 0 when free. Past the stage's stuck limit the stage is stuck (promptpipe_stage_stuck).",
    (*_STAGE, Label.HELD),
)
STAGE_STUCK = Metric(
    "promptpipe_stage_stuck",
    Kind.GAUGE,
    "1 while a call has held a work slot or the model longer than any call may (its timeout, the watchdog's"
    " slack and a margin): the stage reports NOT_SERVING and fails its liveness probe until it is restarted.",
    _STAGE,
)

GATEWAY_TTFT = Metric(
    "promptpipe_gateway_time_to_first_token_seconds",
    Kind.HISTOGRAM,
    "Time from request to first chunk sent.",
    (Label.PIPELINE,),
)
GATEWAY_TPOT = Metric(
    "promptpipe_gateway_time_per_output_token_seconds",
    Kind.HISTOGRAM,
    "Mean time per output token after the first, per request.",
    (Label.PIPELINE,),
)
GATEWAY_OUTPUT_TOKENS = Metric(
    "promptpipe_gateway_output_tokens_total", Kind.COUNTER, "Output tokens streamed to clients.", (Label.PIPELINE,)
)

GATEWAY_SLO_OBJECTIVE = Metric(
    "promptpipe_gateway_slo_objective",
    Kind.GAUGE,
    "The pipeline's spec.slo, one series per objective set (seconds, or a share for error_rate): what the"
    " chart's alerts compare against.",
    (Label.PIPELINE, Label.OBJECTIVE),
)
GATEWAY_SLOW_FIRST_TOKENS = Metric(
    "promptpipe_gateway_first_tokens_over_slo_total",
    Kind.COUNTER,
    "Calls whose first token came later than spec.slo.ttftP95Milliseconds (none counted without it): the"
    " TTFT objective's bad events, out of promptpipe_gateway_time_to_first_token_seconds_count.",
    (Label.PIPELINE,),
)
GATEWAY_TENANT_CALLS = Metric(
    "promptpipe_gateway_tenant_calls_total",
    Kind.COUNTER,
    "Calls of each tenant, by outcome: admitted (past its quota; it may still be shed for overload),"
    " over_requests_quota or over_tokens_quota (refused, 429), quota_store_unreachable (refused, 503:"
    " auth.quotaStore.onUnreachable is closed).",
    (Label.PIPELINE, Label.TENANT, Label.OUTCOME),
)
GATEWAY_TENANT_TOKENS = Metric(
    "promptpipe_gateway_tenant_tokens_total",
    Kind.COUNTER,
    "Prompt plus generated tokens charged to each tenant's tokens-per-minute quota.",
    (Label.PIPELINE, Label.TENANT),
)
GATEWAY_QUOTA_STORE_UP = Metric(
    "promptpipe_gateway_quota_store_up",
    Kind.GAUGE,
    "1 while the shared quota store (auth.quotaStore) answers, 0 while calls go as its onUnreachable says.",
    (Label.PIPELINE,),
)
GATEWAY_QUOTA_STORE_FAILURES = Metric(
    "promptpipe_gateway_quota_store_failures_total",
    Kind.COUNTER,
    "Calls to the shared quota store that failed or outlasted its timeoutMilliseconds.",
    (Label.PIPELINE,),
)
GATEWAY_TENANT_QUEUE_DEPTH = Metric(
    "promptpipe_gateway_tenant_queue_depth",
    Kind.GAUGE,
    "Calls of each tenant waiting in the gateway's admission queue.",
    (Label.PIPELINE, Label.TENANT),
)

BACKEND_GENERATED_TOKENS = Metric(
    "promptpipe_backend_generated_tokens_total", Kind.COUNTER, "Tokens received from the backend.", _BACKEND
)
BACKEND_CANCELLED = Metric(
    "promptpipe_backend_generations_cancelled_total",
    Kind.COUNTER,
    "Generations stopped early because the caller went away or its deadline passed.",
    _BACKEND,
)
BACKEND_ACTIVE = Metric("promptpipe_backend_active_generations", Kind.GAUGE, "Generations running now.", _BACKEND)
BACKEND_DECODED_TOKENS = Metric(
    "promptpipe_backend_decoded_tokens_total",
    Kind.COUNTER,
    "Tokens the embedded llama.cpp decoded (llamacpp backend only).",
    _BACKEND,
)
BACKEND_CIRCUIT_OPEN = Metric(
    "promptpipe_backend_circuit_open", Kind.GAUGE, "1 while the circuit breaker is open.", _BACKEND
)
BACKEND_ROUTED = Metric(
    "promptpipe_backend_routed_total",
    Kind.COUNTER,
    "Calls routed to a backend replica, by why that one: home, overflow (home over its bounded load), "
    "circuit (home's circuit open), balanced (least-loaded, round-robin).",
    (*_BACKEND, Label.REASON),
)
BACKEND_REPLICA_IN_FLIGHT = Metric(
    "promptpipe_backend_replica_in_flight",
    Kind.GAUGE,
    "Calls this stage has open on each backend replica it knows.",
    (*_BACKEND, Label.REPLICA),
)
BACKEND_AFFINITY_RATIO = Metric(
    "promptpipe_backend_affinity_ratio",
    Kind.GAUGE,
    "Share of the calls routed so far that went to their home replica (prefix routing).",
    _BACKEND,
)
FAILOVERS = Metric(
    "promptpipe_failovers_total",
    Kind.COUNTER,
    "Calls this stage carried on elsewhere after what served them failed mid-stream, by why: reset "
    "(connection lost), error (an error status), stall (no token within the read timeout).",
    (Label.PIPELINE, Label.STAGE, Label.REASON),
)
# Every reason a failover may give, each series there from the start.
FAILOVER_REASONS = ("reset", "error", "stall")

ALL: tuple[Metric, ...] = (
    STAGE_QUEUE_DEPTH,
    STAGE_QUEUE_CAPACITY,
    STAGE_IN_FLIGHT,
    STAGE_NEXT_CALL_SECONDS,
    STAGE_CONCURRENCY,
    STAGE_QUEUE_WAIT,
    STAGE_DURATION,
    STAGE_CALLER_DEADLINES,
    STAGE_SHED,
    STAGE_CALLERS_REFUSED,
    STAGE_SERVING,
    STAGE_HELD,
    STAGE_STUCK,
    GATEWAY_TTFT,
    GATEWAY_TPOT,
    GATEWAY_OUTPUT_TOKENS,
    GATEWAY_SLO_OBJECTIVE,
    GATEWAY_SLOW_FIRST_TOKENS,
    GATEWAY_TENANT_CALLS,
    GATEWAY_TENANT_TOKENS,
    GATEWAY_TENANT_QUEUE_DEPTH,
    GATEWAY_QUOTA_STORE_UP,
    GATEWAY_QUOTA_STORE_FAILURES,
    BACKEND_GENERATED_TOKENS,
    BACKEND_CANCELLED,
    BACKEND_ACTIVE,
    BACKEND_DECODED_TOKENS,
    BACKEND_CIRCUIT_OPEN,
    BACKEND_ROUTED,
    BACKEND_REPLICA_IN_FLIGHT,
    BACKEND_AFFINITY_RATIO,
    FAILOVERS,
)


def series(metric: Metric, suffix: str = "") -> str:
    """A series name as Prometheus stores it: `_count`, `_bucket` or `_sum` for a histogram."""
    if suffix and metric.kind is not Kind.HISTOGRAM:
        raise ValueError(f"{metric.name} is a {metric.kind.value}: no {suffix} series")
    return metric.name + suffix


def selector(**labels: str) -> str:
    """`{a="x",b="y"}` for PromQL, labels in the order given."""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
