"""Whether a stage process is stuck: a call has held a work slot, or the model, longer than any call may.

A call's deadline is capped by its stage's `timeoutSeconds`, and the watchdog ends a handler
WATCHDOG_SLACK_SECONDS past it, so no call holds anything longer than that, plus the time a decode thread
takes to notice its call has ended (a prompt being read cannot stop midway). One that has is stuck where no
cancel reaches (a thread that never returns, a lock never given back). Then the stage says NOT_SERVING on
its health service and on its liveness service, so callers route around it and Kubernetes restarts it;
`promptpipe_stage_stuck` and a log line say what is held, and for how long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from promptpipe.contract.spec import StageSpec
from promptpipe.runtime.metrics import LivenessMetrics
from promptpipe.runtime.stage import WATCHDOG_SLACK_SECONDS

log = logging.getLogger(__name__)

# At least this much beyond a call's longest life before its holder is called stuck.
STUCK_MARGIN_SECONDS = 5.0


def stuck_after(spec: StageSpec) -> float:
    """The longest a call of a stage with `spec` may hold anything: its timeout, the watchdog's slack, and a
    margin as long as the timeout (at least STUCK_MARGIN_SECONDS) for a decode thread to notice."""
    return spec.timeout_seconds + WATCHDOG_SLACK_SECONDS + max(STUCK_MARGIN_SECONDS, spec.timeout_seconds)


@dataclass(frozen=True)
class Held:
    stage: str
    what: str  # `slot` or `model` (the HELD label)
    seconds: float
    limit: float

    def __str__(self) -> str:
        thing = "a work slot" if self.what == "slot" else "the model"
        return (
            f"stage {self.stage} is stuck: {thing} held by one call for {self.seconds:.0f}s,"
            f" longer than any call may hold it ({self.limit:.0f}s)"
        )


class Liveness:
    """The things a stage process's calls hold, each with its limit; `stuck()` names one held past it."""

    def __init__(self, registry: CollectorRegistry, pipeline: str) -> None:
        self._watched: list[tuple[str, str, Callable[[], float], float]] = []
        self._metrics = LivenessMetrics(registry, pipeline)
        self._reported: Held | None = None

    def watch(self, stage: str, what: str, held_for: Callable[[], float], limit: float) -> None:
        """Watch how long `stage`'s `what` has been held (`held_for()` seconds, 0 when free), stuck past `limit`."""
        self._watched.append((stage, what, held_for, limit))
        self._metrics.held(stage, what, held_for)
        self._metrics.stuck(stage, lambda: self._stuck_in(stage))

    def _stuck_in(self, stage: str) -> bool:
        return any(s == stage and held_for() > limit for s, _, held_for, limit in self._watched)

    def stuck(self) -> Held | None:
        """The first thing held past its limit, if any; logged when it starts and when it ends."""
        found = None
        for stage, what, held_for, limit in self._watched:
            seconds = held_for()
            if seconds > limit:
                found = Held(stage, what, seconds, limit)
                break
        if (found is None) != (self._reported is None):
            if found is not None:
                log.error("%s; reporting NOT_SERVING, liveness included, until restarted", found)
            else:
                log.warning("stage no longer stuck: what was held has been given back")
        self._reported = found
        return found
