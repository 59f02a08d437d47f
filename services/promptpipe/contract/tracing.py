"""What the stages' traces carry, for whoever reads them back (`promptpipe analyze --jaeger`, the tests):
one span per stage call (`SPAN_NAMES`), from its work slot to the call's end, with its queue wait."""

from __future__ import annotations

from typing import Literal, get_args

# What a stage process may export its spans with (PROMPTPIPE_OTEL_EXPORTER, `promptpipe up --otel-exporter`).
Exporter = Literal["none", "console", "otlp"]
EXPORTERS: tuple[str, ...] = get_args(Exporter)

# Each stage's span, by stage: `rag`, `assemble`, `infer`, `post`, `stream`.
SPAN_NAMES = {"stream": "stream", "rag": "rag", "assemble": "assemble", "inference": "infer", "post": "post"}
STAGE_OF_SPAN = {span: stage for stage, span in SPAN_NAMES.items()}

# The gRPC methods that carry a call, the only ones traced: a health probe, reflection or a scaler's
# Stats poll is no call, and traced it would start a trace of its own (at the sample ratio) in every
# stage it reaches, on a cluster every few seconds per pod.
TRACED_METHODS = frozenset(
    {"/promptpipe.v1.Gateway/Generate", "/promptpipe.v1.Stage/Process", "/promptpipe.v1.Stage/Run"}
)

# The stage span's attribute: how long the call waited for a work slot, in seconds.
QUEUE_WAIT_ATTRIBUTE = "promptpipe.queue_wait_seconds"


def service_name(pipeline: str, stage: str) -> str:
    """A stage process's service name, as tracing backends list it."""
    return f"promptpipe-{pipeline}-{stage}"
