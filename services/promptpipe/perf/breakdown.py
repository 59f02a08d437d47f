"""Where a call's time went: each call's TTFT and time per output token split across the stages'
queue waits and work and the unaccounted rest (network and serialization), the split at each
percentile, the dominant part and the knob that moves it. Pure functions over bench records."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from promptpipe.perf.records import STAGES, BenchResult, CallRecord, Level

PERCENTILES = (50, 90, 95, 99)
# A refusal by a stage's wait cap, as the stage words it (runtime/admission.py); group 1: the stage.
WAIT_CAPPED = re.compile(r"stage (\w+): (?:expected wait \d+ ms is over|waited \d+ ms,) queue\.maxWaitMilliseconds")
NETWORK = "network"  # the unaccounted rest: every hop between processes, the client's included
# A call's parts in the order it meets them, each "<stage> queue" or "<stage> work", then the rest.
PARTS = (*(f"{s} {kind}" for s in STAGES for kind in ("queue", "work")), NETWORK)


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank percentile `p` (0-100) of `values`; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass(frozen=True)
class CallSplit:
    """One call's TTFT and end-to-end time as parts (seconds, by PARTS name), and the client's figures they
    are checked against: the stages report their own shares, so the parts add up to the measured time
    only if every stage's accounting is right."""

    call: CallRecord
    ttft: dict[str, float]
    e2e: dict[str, float]

    @property
    def ttft_sum(self) -> float:
        return sum(self.ttft.values())

    @property
    def e2e_sum(self) -> float:
        return sum(self.e2e.values())

    def tpot(self) -> dict[str, float]:
        """Time per output token after the first, by part: what each part spent after the first token,
        over the tokens that followed it."""
        n = self.call.output_tokens - 1
        return {k: max(0.0, self.e2e[k] - self.ttft.get(k, 0.0)) / n for k in self.e2e} if n > 0 else {}


def split(call: CallRecord) -> CallSplit | None:
    """The call's parts, or None for a call without them (failed, or from a gateway that sent no timings)."""
    if not call.ok or call.e2e is None or call.server_total is None or not call.stages:
        return None
    ttft = dict.fromkeys(PARTS, 0.0)
    e2e = dict.fromkeys(PARTS, 0.0)
    for s in call.stages:
        ttft[f"{s.stage} queue"] = e2e[f"{s.stage} queue"] = s.queue
        ttft[f"{s.stage} work"] = s.first
        e2e[f"{s.stage} work"] = s.work
        ttft[NETWORK] += s.hop_first
        e2e[NETWORK] += s.hop
    # The client's own hop: what it measured beyond what the gateway did.
    e2e[NETWORK] += max(0.0, call.e2e - call.server_total)
    if call.ttft is None:  # a source without first tokens (traces): the end-to-end split only
        return CallSplit(call, {}, e2e)
    server_ttft = call.server_ttft if call.server_ttft is not None else call.server_total
    ttft[NETWORK] += max(0.0, call.ttft - server_ttft)
    return CallSplit(call, ttft, e2e)


@dataclass(frozen=True)
class PercentileSplit:
    percentile: int
    value: float  # the metric's percentile over the level's calls, seconds
    parts: dict[str, float]  # the mean parts of the calls around that percentile, scaled to `value`
    calls: int  # how many calls that mean is over

    def dominant(self) -> tuple[str, float]:
        """The biggest part and its share of the value."""
        name = max(self.parts, key=lambda k: self.parts[k])
        return name, (self.parts[name] / self.value if self.value > 0 else 0.0)


def at_percentiles(
    splits: list[CallSplit], metric: str, percentiles: tuple[int, ...] = PERCENTILES, band: float = 2.5
) -> list[PercentileSplit]:
    """How `metric` ("ttft", "tpot" or "e2e") splits at each percentile: the parts of the calls whose value ranks
    within `band` percentage points of it (at least the one call at it), averaged and scaled to the value."""
    rows = [(v, parts) for s in splits if (v := _value(s, metric)) is not None and (parts := _parts(s, metric))]
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    n = len(rows)
    out = []
    for p in percentiles:
        at = min(n - 1, round(p / 100 * (n - 1)))
        low = max(0, min(at, round((p - band) / 100 * (n - 1))))
        high = min(n - 1, max(at, round((p + band) / 100 * (n - 1))))
        near = rows[low : high + 1]
        mean = {k: sum(parts[k] for _, parts in near) / len(near) for k in PARTS}
        total = sum(mean.values())
        value = rows[at][0]
        scale = value / total if total > 0 else 0.0
        out.append(PercentileSplit(p, value, {k: v * scale for k, v in mean.items()}, len(near)))
    return out


def _value(s: CallSplit, metric: str) -> float | None:
    return {"ttft": s.call.ttft, "tpot": s.call.tpot, "e2e": s.call.e2e}[metric]


def _parts(s: CallSplit, metric: str) -> dict[str, float]:
    return {"ttft": s.ttft, "tpot": s.tpot() if s.ttft else {}, "e2e": s.e2e}[metric]


@dataclass(frozen=True)
class Slo:
    """The objective a run is checked against (spec.slo, in seconds here); None: not set."""

    ttft_p95: float | None = None
    tpot_p95: float | None = None
    error_rate: float | None = None

    def met_by(self, call: CallRecord) -> bool:
        """A call within the SLO's latencies (goodput counts them)."""
        if not call.ok:
            return False
        if self.ttft_p95 is not None and (call.ttft is None or call.ttft > self.ttft_p95):
            return False
        return not (self.tpot_p95 is not None and call.tpot is not None and call.tpot > self.tpot_p95)

    @property
    def set(self) -> bool:
        return any(v is not None for v in (self.ttft_p95, self.tpot_p95, self.error_rate))


@dataclass(frozen=True)
class LevelSummary:
    """What load tools report for one load level."""

    level: Level
    calls: int
    ok: int
    statuses: dict[str, int]  # every call's end: OK, or the status it got (sheds are RESOURCE_EXHAUSTED)
    seconds: float
    ttft: dict[int, float]
    tpot: dict[int, float]
    itl: dict[int, float]
    e2e: dict[int, float]
    output_tokens_per_second: float
    requests_per_second: float
    goodput: float | None  # share of calls within the SLO's latencies, None without one
    # Calls a stage's wait cap (queue.maxWaitMilliseconds) refused or ended, by stage.
    wait_capped: dict[str, int] = field(default_factory=dict)
    # Calls a stage carried on elsewhere mid-stream (spec.failover), by stage: (calls, failovers).
    failed_over: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return (self.calls - self.ok) / self.calls if self.calls else 0.0

    def slo_verdicts(self, slo: Slo) -> list[tuple[str, float, float, bool]]:
        """(objective, measured, target, met) for each objective set."""
        out = []
        if slo.ttft_p95 is not None:
            out.append(("TTFT p95", self.ttft[95], slo.ttft_p95, self.ttft[95] <= slo.ttft_p95))
        if slo.tpot_p95 is not None:
            out.append(("TPOT p95", self.tpot[95], slo.tpot_p95, self.tpot[95] <= slo.tpot_p95))
        if slo.error_rate is not None:
            out.append(("error rate", self.error_rate, slo.error_rate, self.error_rate <= slo.error_rate))
        return out


def summarize(result: BenchResult, index: int, slo: Slo) -> LevelSummary:
    calls = result.calls_of(index)
    ok = [c for c in calls if c.ok]
    start, end = result.windows[index] if index < len(result.windows) else (0.0, 0.0)
    seconds = max(end - start, 1e-9)

    def pcts(values: list[float]) -> dict[int, float]:
        return {p: percentile(values, p) for p in PERCENTILES}

    return LevelSummary(
        level=result.levels[index],
        calls=len(calls),
        ok=len(ok),
        statuses=dict(Counter(c.status for c in calls).most_common()),
        seconds=seconds,
        ttft=pcts([c.ttft for c in ok if c.ttft is not None]),
        tpot=pcts([t for c in ok if (t := c.tpot) is not None]),
        itl=pcts([gap for c in ok for gap in c.itl]),
        e2e=pcts([c.e2e for c in ok if c.e2e is not None]),
        output_tokens_per_second=sum(c.output_tokens for c in ok) / seconds,
        requests_per_second=len(ok) / seconds,
        goodput=(sum(slo.met_by(c) for c in calls) / len(calls) if calls else 0.0) if slo.set else None,
        wait_capped=dict(Counter(m.group(1) for c in calls if not c.ok and (m := WAIT_CAPPED.search(c.error)))),
        failed_over=failed_over(calls),
    )


def failed_over(calls: list[CallRecord]) -> dict[str, tuple[int, int]]:
    """By stage: how many calls it carried on elsewhere mid-stream, and how many times in all."""
    out: dict[str, tuple[int, int]] = {}
    for c in calls:
        for s in c.stages:
            if s.failovers:
                n, total = out.get(s.stage, (0, 0))
                out[s.stage] = (n + 1, total + s.failovers)
    return out


def knee(summaries: list[LevelSummary], slo: Slo, factor: float = 2.0) -> int | None:
    """The sweep's knee: the last level before TTFT p95 leaves the unloaded curve (more than `factor` times
    the lightest level's) or the SLO. None for a single level, or when no level leaves it."""
    if len(summaries) < 2:
        return None
    base = summaries[0].ttft[95]
    for i, s in enumerate(summaries[1:], 1):
        over_slo = slo.ttft_p95 is not None and s.ttft[95] > slo.ttft_p95
        if s.ttft[95] > factor * base or over_slo or s.error_rate > (slo.error_rate or 0.05):
            return i - 1
    return None
