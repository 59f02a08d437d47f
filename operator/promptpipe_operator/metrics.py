"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("promptpipe_operator_reconciles_total", "Reconciles of a pipeline, by outcome.", ["outcome"])
RECONCILE_ERRORS = Counter(
    "promptpipe_operator_reconcile_errors_total", "Reconciles that could not converge, by reason.", ["reason"]
)
RECONCILE_SECONDS = Histogram(
    "promptpipe_operator_reconcile_duration_seconds",
    "Time of one reconcile.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CHILD_CHANGES = Counter(
    "promptpipe_operator_child_changes_total", "Children created, updated or deleted.", ["action", "kind"]
)
LEADER = Gauge("promptpipe_operator_leader", "1 while this replica holds the leader Lease (or runs without election).")
ROLLBACKS = Counter(
    "promptpipe_operator_rollbacks_total",
    "Rollouts rolled back, by pipeline and reason (AnalysisFailed, ManualRollback, ...).",
    # Not `namespace`: a scrape gives every series of the operator its pod's namespace under that name.
    ["pipeline_namespace", "pipeline", "reason"],
)
