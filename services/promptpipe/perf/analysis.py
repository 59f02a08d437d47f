"""`promptpipe analyze` over a bench result: each level's summary, its TTFT and TPOT split at each
percentile, the bottleneck with its knob, the SLO's verdicts and the sweep's knee."""

from __future__ import annotations

from dataclasses import dataclass, field

from promptpipe.contract.spec import PipelineSpec
from promptpipe.perf.advice import knob
from promptpipe.perf.breakdown import (
    NETWORK,
    CallSplit,
    LevelSummary,
    PercentileSplit,
    Slo,
    at_percentiles,
    knee,
    split,
    summarize,
)
from promptpipe.perf.records import BenchResult


def slo_of(spec: PipelineSpec | None) -> Slo:
    if spec is None or spec.slo is None:
        return Slo()
    s = spec.slo
    return Slo(
        ttft_p95=s.ttft_p95_milliseconds / 1000 if s.ttft_p95_milliseconds is not None else None,
        tpot_p95=s.tpot_p95_milliseconds / 1000 if s.tpot_p95_milliseconds is not None else None,
        error_rate=s.error_rate,
    )


def part_label(part: str) -> str:
    """How a part reads in a sentence: "inference queue wait", "rag work", "network and serialization"."""
    if part == NETWORK:
        return "network and serialization"
    return part + " wait" if part.endswith(" queue") else part


@dataclass(frozen=True)
class Finding:
    metric: str  # "TTFT" | "TPOT"
    percentile: int
    part: str
    share: float
    level: str
    advice: str

    def sentence(self) -> str:
        return (
            f"{part_label(self.part)} is {self.share:.0%} of p{self.percentile} {self.metric} at {self.level}: "
            f"{self.advice}"
        )


@dataclass(frozen=True)
class LevelAnalysis:
    summary: LevelSummary
    splits: list[CallSplit]
    ttft: list[PercentileSplit]
    tpot: list[PercentileSplit]
    findings: list[Finding]
    # End to end: what a source without first tokens (traces) can split.
    e2e: list[PercentileSplit] = field(default_factory=list)


@dataclass(frozen=True)
class Analysis:
    result: BenchResult
    slo: Slo
    levels: list[LevelAnalysis]
    knee: int | None

    def sum_errors(self) -> list[float]:
        """For every call with timings: |sum of its parts - its end-to-end time| / its end-to-end time."""
        return [abs(s.e2e_sum - s.call.e2e) / s.call.e2e for lv in self.levels for s in lv.splits if s.call.e2e]


def analyze(result: BenchResult, spec: PipelineSpec | None = None, slo: Slo | None = None) -> Analysis:
    slo = slo if slo is not None else slo_of(spec)
    levels = []
    for index, level in enumerate(result.levels):
        summary = summarize(result, index, slo)
        splits = [s for c in result.calls_of(index) if (s := split(c)) is not None]
        ttft, tpot = at_percentiles(splits, "ttft"), at_percentiles(splits, "tpot")
        e2e = [] if ttft else at_percentiles(splits, "e2e")
        metrics = (("TTFT", ttft), ("TPOT", tpot), ("end-to-end time", e2e))
        findings = [_finding(metric, rows, level.label, spec) for metric, rows in metrics if rows]
        levels.append(LevelAnalysis(summary, splits, ttft, tpot, findings, e2e))
    return Analysis(result, slo, levels, knee([lv.summary for lv in levels], slo))


def _finding(metric: str, rows: list[PercentileSplit], level: str, spec: PipelineSpec | None) -> Finding:
    """The dominant part at p95 (the SLO's percentile), and its knob."""
    row = next((r for r in rows if r.percentile == 95), rows[-1])
    part, share = row.dominant()
    return Finding(metric, row.percentile, part, share, level, knob(part, "tpot" if metric == "TPOT" else "ttft", spec))
