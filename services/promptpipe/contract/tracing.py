"""What the stages' traces carry, for whoever reads them back (`promptpipe analyze --jaeger`, the tests):
one span per stage call named as the stage, from its work slot to the call's end, with its queue wait."""

from __future__ import annotations

# The stage span's attribute: how long the call waited for a work slot, in seconds.
QUEUE_WAIT_ATTRIBUTE = "promptpipe.queue_wait_seconds"


def service_name(pipeline: str, stage: str) -> str:
    """A stage process's service name, as tracing backends list it."""
    return f"promptpipe-{pipeline}-{stage}"
