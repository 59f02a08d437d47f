"""Blue-green rollouts of the backend: the decision, as a pure function of what was observed.

The state lives in the pipeline's status (so a restarted operator carries on) and
moves like this:

    Stable ──model changes──▶ Progressing ──green Ready + smoke OK──▶ Analyzing ──window passes──▶ Stable
                                  │ not Ready in time / smoke fails       │ errors or TTFT over threshold,
                                  ▼                                       ▼ or a manual rollback
                              RolledBack ◀────────────────────────────────┘ (traffic back on blue)

A rolled-back version is not tried again until the spec changes (a new generation).
The previous version keeps running for `keepPrevious` after a switch, for instant rollback.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Any

from promptpipe.contract.spec import NoVerdict, RolloutSpec
from promptpipe.contract.timestamps import format_time, parse_time
from promptpipe_operator.events import Event

BLUE, GREEN = "blue", "green"
STABLE, PROGRESSING, ANALYZING, ROLLED_BACK = "Stable", "Progressing", "Analyzing", "RolledBack"
HISTORY_LIMIT = 10


def other(color: str) -> str:
    return GREEN if color == BLUE else BLUE


def ts(when: dt.datetime) -> str:
    """Rollout times to the millisecond: an analysis interval can be a second."""
    return format_time(when, "milliseconds")


@dataclass(frozen=True)
class Slot:
    version: str
    color: str
    digest: str = ""  # the registry's digest of the version when it was chosen: the pods pull only that


@dataclass(frozen=True)
class State:
    active: Slot | None = None
    previous: Slot | None = None  # still running, for instant rollback
    previous_until: str = ""  # when the previous one is removed ("" while analyzing)
    phase: str = STABLE
    target: Slot | None = None  # being brought up (Progressing)
    started_at: str = ""
    switched_at: str = ""
    last_analysis_at: str = ""
    baseline: dict[str, Any] | None = None  # gateway counters at the switch (analysis from scrapes)
    failed_version: str = ""
    failed_generation: int = 0
    reason: str = ""
    message: str = ""
    rollback_handled: str = ""
    history: tuple[dict[str, str], ...] = ()
    judged: bool = False  # an analysis of this rollout had calls enough to judge (and found it healthy)

    def deployed(self) -> list[Slot]:
        """Backend colors that should run now."""
        return [s for s in (self.active, self.target, self.previous) if s is not None]

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phase": self.phase}
        for key, slot in (("active", self.active), ("previous", self.previous), ("target", self.target)):
            if slot is not None:
                out[key] = {
                    "version": slot.version,
                    "color": slot.color,
                    **({"digest": slot.digest} if slot.digest else {}),
                }
        for key, value in (
            ("previousUntil", self.previous_until),
            ("startedAt", self.started_at),
            ("switchedAt", self.switched_at),
            ("lastAnalysisAt", self.last_analysis_at),
            ("failedVersion", self.failed_version),
            ("reason", self.reason),
            ("message", self.message),
            ("rollbackHandled", self.rollback_handled),
        ):
            if value:
                out[key] = value
        if self.failed_generation:
            out["failedGeneration"] = self.failed_generation
        if self.judged:
            out["judged"] = True
        if self.baseline is not None:
            out["baseline"] = self.baseline
        out["history"] = list(self.history)
        return out

    @staticmethod
    def from_status(status: dict[str, Any] | None) -> State:
        s = status or {}

        def slot(key: str) -> Slot | None:
            v = s.get(key)
            return Slot(str(v["version"]), str(v["color"]), str(v.get("digest", ""))) if isinstance(v, dict) else None

        return State(
            active=slot("active"),
            previous=slot("previous"),
            previous_until=s.get("previousUntil", ""),
            phase=s.get("phase", STABLE),
            target=slot("target"),
            started_at=s.get("startedAt", ""),
            switched_at=s.get("switchedAt", ""),
            last_analysis_at=s.get("lastAnalysisAt", ""),
            baseline=s.get("baseline"),
            failed_version=s.get("failedVersion", ""),
            failed_generation=int(s.get("failedGeneration", 0)),
            reason=s.get("reason", ""),
            message=s.get("message", ""),
            rollback_handled=s.get("rollbackHandled", ""),
            history=tuple(s.get("history") or ()),
            judged=bool(s.get("judged", False)),
        )


@dataclass(frozen=True)
class Observed:
    desired: str | None  # the version the spec names now (resolved alias); None: could not be resolved
    generation: int
    now: dt.datetime
    target_ready: bool = False
    target_failed: str = ""  # the target Deployment's own failure (progress deadline), if any
    smoke: tuple[bool, str] | None = None  # run only when asked (wants_smoke)
    verdict: tuple[bool | None, str] | None = None  # (ok, why); ok None: not enough data yet
    rollback_request: str = ""  # the `promptpipe.io/rollback` annotation
    target_pods: str = ""  # why the target's pods do not serve, from their status (e.g. the model fetch failed)
    target_gave_up: str = ""  # a target pod's container that keeps failing: it will not serve
    desired_digest: str = ""  # the registry's digest of `desired`, when it comes from the registry


@dataclass(frozen=True)
class Decision:
    state: State
    events: list[Event] = field(default_factory=list)
    switched: bool = False  # the inference Service now selects another color


def wants_smoke(state: State, target_ready: bool) -> bool:
    return state.phase == PROGRESSING and target_ready


def wants_analysis(state: State, cfg: RolloutSpec, now: dt.datetime) -> bool:
    if state.phase != ANALYZING:
        return False
    last = parse_time(state.last_analysis_at) or parse_time(state.switched_at)
    return last is None or (now - last).total_seconds() >= cfg.analysis.interval - 0.05


def _history(state: State, version: str, result: str, reason: str, now: dt.datetime) -> tuple[dict[str, str], ...]:
    entry = {"version": version, "result": result, "reason": reason, "at": ts(now)}
    return (*state.history, entry)[-HISTORY_LIMIT:]


def _roll_back(state: State, obs: Observed, bad: Slot, restore: Slot, reason: str, message: str) -> Decision:
    """Traffic to `restore`, `bad` removed and not retried until the spec changes."""
    switched = state.active is not None and state.active != restore
    new = replace(
        state,
        active=restore,
        previous=None,
        previous_until="",
        target=None,
        phase=ROLLED_BACK,
        started_at="",
        switched_at="",
        last_analysis_at="",
        baseline=None,
        failed_version=bad.version,
        failed_generation=obs.generation,
        reason=reason,
        message=message,
        history=_history(state, bad.version, ROLLED_BACK, reason, obs.now),
    )
    return Decision(
        new,
        [
            Event(
                "Warning",
                "RolledBack",
                f"rolled back {bad.version} ({bad.color}) to {restore.version} ({restore.color}): {reason}: {message}",
            )
        ],
        switched,
    )


def only_pinned(state: State, desired: str | None, unresolved: str, no_digest: str) -> tuple[str | None, str]:
    """The version to decide on, and why it is unresolved: a version not running yet starts only pinned to
    its content, so while its digest cannot be read (`no_digest` says why) the rollout stays where it is."""
    running = {slot.version for slot in (state.active, state.target) if slot is not None}
    if no_digest and desired is not None and desired not in running:
        return None, no_digest
    return desired, unresolved


def decide(state: State, obs: Observed, cfg: RolloutSpec) -> Decision:
    now = obs.now
    events: list[Event] = []
    # A manual rollback request is handled once.
    if obs.rollback_request and obs.rollback_request != state.rollback_handled:
        state = replace(state, rollback_handled=obs.rollback_request)
        if state.phase == PROGRESSING and state.target is not None and state.active is not None:
            return _roll_back(state, obs, state.target, state.active, "ManualRollback", "rollback requested")
        if state.previous is not None and state.active is not None:
            return _roll_back(state, obs, state.active, state.previous, "ManualRollback", "rollback requested")
        events.append(
            Event(
                "Warning", "RollbackUnavailable", "rollback requested, but no previous version is running to go back to"
            )
        )

    desired = obs.desired
    if state.active is None:
        if desired is None:
            return Decision(state, events)
        first = replace(
            state,
            active=Slot(desired, BLUE, obs.desired_digest),
            phase=STABLE,
            history=_history(state, desired, "Deployed", "Initial", now),
        )
        return Decision(first, [*events, Event("Normal", "Deployed", f"serving {desired} (blue)")], switched=True)
    active = state.active

    if state.phase == PROGRESSING and state.target is not None:
        target = state.target
        if desired is not None and desired != target.version:
            if desired == active.version:  # the change was undone: stop bringing up green
                cancelled = replace(
                    state,
                    target=None,
                    phase=STABLE,
                    started_at="",
                    reason="",
                    message="",
                    history=_history(state, target.version, "Cancelled", "SpecChanged", now),
                )
                return Decision(
                    cancelled, [*events, Event("Normal", "RolloutCancelled", f"{target.version} is no longer wanted")]
                )
            state = replace(
                state,
                target=Slot(desired, target.color, obs.desired_digest),
                started_at=ts(now),
                reason="",
                message="",
            )  # retarget the same color
            return Decision(
                state,
                [
                    *events,
                    Event(
                        "Normal",
                        "RolloutStarted",
                        f"rolling out {desired} ({target.color}), replacing {target.version}",
                    ),
                ],
            )
        started = parse_time(state.started_at) or now
        if obs.target_failed:
            return _roll_back(state, obs, target, active, "ProgressDeadlineExceeded", obs.target_failed)
        if obs.target_gave_up:
            why = f"{target.version} keeps failing: {obs.target_gave_up}"
            return _roll_back(state, obs, target, active, "TargetFailing", why)
        if obs.smoke is not None:
            passed, detail = obs.smoke
            if not passed:
                return _roll_back(state, obs, target, active, "SmokeTestFailed", detail)
            switched = replace(
                state,
                active=target,
                previous=active,
                previous_until="",
                target=None,
                phase=ANALYZING if cfg.analysis.window > 0 else STABLE,
                switched_at=ts(now),
                last_analysis_at="",
                baseline=None,
                reason="",
                message="",
            )
            if cfg.analysis.window <= 0:
                switched = replace(
                    switched,
                    previous_until=ts(now + dt.timedelta(seconds=cfg.keep_previous)),
                    history=_history(state, target.version, "Succeeded", "NoAnalysis", now),
                )
            return Decision(
                switched,
                [
                    *events,
                    Event(
                        "Normal",
                        "Switched",
                        (
                            f"traffic on {target.version} ({target.color}); {active.version} ({active.color}) "
                            f"kept for rollback"
                        ),
                    ),
                ],
                switched=True,
            )
        if (now - started).total_seconds() > cfg.progress_deadline:
            why = f": {obs.target_pods}" if obs.target_pods else ""
            return _roll_back(
                state,
                obs,
                target,
                active,
                "ProgressDeadlineExceeded",
                f"{target.version} not Ready and smoke-tested within {cfg.progress_deadline:g}s{why}",
            )
        return Decision(replace(state, message=obs.target_pods), events)

    if state.phase == ANALYZING and (previous := state.previous) is not None:
        if obs.verdict is not None:
            healthy, why = obs.verdict
            if healthy is False:
                return _roll_back(state, obs, active, previous, "AnalysisFailed", why)
            state = replace(state, last_analysis_at=ts(now), message=why, judged=state.judged or healthy is True)
        switched_at = parse_time(state.switched_at) or now
        window_over = (now - switched_at).total_seconds() >= cfg.analysis.window
        superseded = desired is not None and desired != active.version
        unjudged = state.message
        on_no_verdict = cfg.analysis.on_no_verdict
        if window_over and not state.judged and not superseded and on_no_verdict is not NoVerdict.PROMOTE:
            if on_no_verdict is NoVerdict.ROLLBACK:
                return _roll_back(state, obs, active, previous, "AnalysisInconclusive", f"no verdict: {unjudged}")
            # Hold: traffic stays, the previous version keeps running, the analysis goes on until a verdict.
            if state.reason == "AnalysisHeld" and obs.verdict is None:
                return Decision(state, events)  # held already; nothing analysed since
            if state.reason != "AnalysisHeld":
                events.append(
                    Event(
                        "Warning",
                        "RolloutHeld",
                        f"{active.version} held after the analysis window without a verdict ({unjudged});"
                        f" {previous.version} keeps running: `promptpipe rollback` to go back",
                    )
                )
            held = replace(state, reason="AnalysisHeld", message=f"held without a verdict: {unjudged}")
            return Decision(held, events)
        if window_over or superseded:
            # Promoted with a verdict, on `onNoVerdict: promote`, or because another version is wanted; never
            # silently without a verdict: the status, the history and a Warning event say so, and why.
            reason = "AnalysisPassed" if state.judged else "AnalysisInconclusive"
            state = replace(
                state,
                phase=STABLE,
                previous_until=ts(now + dt.timedelta(seconds=cfg.keep_previous)),
                last_analysis_at="",
                baseline=None,
                reason="" if state.judged else reason,
                message=state.message if state.judged else f"promoted without a verdict: {unjudged}",
                judged=False,
                history=_history(state, active.version, "Succeeded", reason, now),
            )
            kept = f"{state.previous.version} kept until {state.previous_until}" if state.previous else ""
            if reason == "AnalysisPassed":
                events.append(Event("Normal", "RolloutSucceeded", f"{active.version} passed analysis; {kept}"))
            else:
                events.append(
                    Event(
                        "Warning",
                        "RolloutInconclusive",
                        f"{active.version} promoted without a verdict ({unjudged}); {kept}",
                    )
                )
        else:
            return Decision(state, events)

    # Stable or RolledBack: expire the previous version, start a rollout if the spec asks for another.
    until = parse_time(state.previous_until)
    if state.previous is not None and until is not None and now >= until:
        state = replace(state, previous=None, previous_until="")
    if desired is None or desired == active.version:
        return Decision(state, events)
    if desired == state.failed_version and obs.generation == state.failed_generation:
        return Decision(state, events)  # rolled back; waits for the spec to change
    color = other(active.color)
    starting = replace(
        state,
        target=Slot(desired, color, obs.desired_digest),
        previous=None,
        previous_until="",
        phase=PROGRESSING,
        started_at=ts(now),
        reason="",
        message="",
    )
    return Decision(
        starting,
        [
            *events,
            Event(
                "Normal", "RolloutStarted", f"rolling out {desired} ({color}) next to {active.version} ({active.color})"
            ),
        ],
    )


# While the target comes up, its pods are looked at this often: their restarts reach no watch of ours.
TARGET_PODS_POLL_SECONDS = 5.0


def wake_in(state: State, cfg: RolloutSpec, now: dt.datetime) -> float | None:
    """Seconds until a time-driven step is due (deadline, analysis, expiry, a look at the target's pods);
    None if nothing is."""
    due: list[dt.datetime] = []
    if state.phase == PROGRESSING and (started := parse_time(state.started_at)):
        due.append(started + dt.timedelta(seconds=cfg.progress_deadline))
        due.append(now + dt.timedelta(seconds=TARGET_PODS_POLL_SECONDS))
    if state.phase == ANALYZING and (switched := parse_time(state.switched_at)):
        last = parse_time(state.last_analysis_at) or switched
        due.append(last + dt.timedelta(seconds=cfg.analysis.interval))
        if (window_end := switched + dt.timedelta(seconds=cfg.analysis.window)) > now:  # past it: held
            due.append(window_end)
    if state.previous is not None and (until := parse_time(state.previous_until)):
        due.append(until)
    if not due:
        return None
    return max(0.05, (min(due) - now).total_seconds())
