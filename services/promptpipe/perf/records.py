"""What a bench run records: one row per call (with each stage's share of it), the load levels it ran,
and the result file that holds them (JSON, with a CSV of the calls beside it)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The stages in the order a call meets them before its first token: the gateway, then the stages it calls.
STAGES = ("stream", "rag", "assemble", "post", "inference")
RESULT_VERSION = 1


@dataclass(frozen=True)
class StageShare:
    """One stage's own share of a call, in seconds (the gateway's GenerateSummary timings)."""

    stage: str
    queue: float
    work: float
    first: float  # the part of `work` before the first token
    hop: float  # the transport around the call to this stage, as its caller timed it
    hop_first: float
    failovers: int = 0  # times the stage carried the call on elsewhere after what served it failed


@dataclass(frozen=True)
class CallRecord:
    """One call as the client saw it; times in seconds, `start` from the start of the run."""

    level: int  # which load level of the run
    start: float
    status: str  # "OK" or a gRPC status name (an HTTP status maps onto the same names)
    ttft: float | None = None  # client-measured: request sent to first token received
    e2e: float | None = None  # client-measured: request sent to the call's end (its status or summary)
    output_tokens: int = 0
    prompt_tokens: int = 0
    server_ttft: float | None = None  # the gateway's own figures, from its summary
    server_total: float | None = None
    session: str = ""
    turn: int = 0
    stages: tuple[StageShare, ...] = ()
    # Gaps between the chunks of this call, in seconds (inter-token latency as the client saw it).
    itl: tuple[float, ...] = ()
    error: str = ""  # the status's message, for a call that did not end OK

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Level:
    """One load level of a run: fixed concurrency or a fixed rate of Poisson arrivals."""

    kind: str  # "concurrency" | "rate" | "traced" (calls read back from a tracing backend, no load of ours)
    value: float

    @property
    def label(self) -> str:
        if self.kind == "traced":
            return f"{self.value:g} traced call" + ("" if self.value == 1 else "s")
        return f"{self.value:g} concurrent" if self.kind == "concurrency" else f"{self.value:g} req/s"


@dataclass
class BenchResult:
    target: str
    transport: str
    levels: list[Level]
    calls: list[CallRecord] = field(default_factory=list)
    # When each level ran, in seconds from the start of the run: [start, end).
    windows: list[tuple[float, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def calls_of(self, level: int) -> list[CallRecord]:
        return [c for c in self.calls if c.level == level]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RESULT_VERSION,
            "target": self.target,
            "transport": self.transport,
            "meta": self.meta,
            "levels": [asdict(lv) for lv in self.levels],
            "windows": [list(w) for w in self.windows],
            "calls": [asdict(c) for c in self.calls],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        if data.get("version") != RESULT_VERSION:
            raise ValueError(f"not a promptpipe bench result of version {RESULT_VERSION}")
        calls = [
            CallRecord(
                **{k: v for k, v in c.items() if k not in ("stages", "itl")},
                stages=tuple(StageShare(**s) for s in c.get("stages", ())),
                itl=tuple(c.get("itl", ())),
            )
            for c in data["calls"]
        ]
        return cls(
            target=data["target"],
            transport=data["transport"],
            levels=[Level(**lv) for lv in data["levels"]],
            calls=calls,
            windows=[(w[0], w[1]) for w in data.get("windows", [])],
            meta=data.get("meta", {}),
        )


def save(result: BenchResult, path: Path) -> Path:
    """Write the result as JSON at `path`, and its calls as CSV beside it (same name, .csv). Returns the CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
    csv_path = path.with_suffix(".csv")
    columns = ["level", "load", "start", "status", "ttft", "e2e", "tpot", "output_tokens", "prompt_tokens"]
    columns += ["server_ttft", "server_total", "session", "turn", "error"]
    columns += [f"{s}_{part}" for s in STAGES for part in ("queue", "work", "first", "hop", "hop_first")]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for c in result.calls:
            row: dict[str, Any] = {k: getattr(c, k) for k in columns if hasattr(c, k)}
            row["load"] = result.levels[c.level].label
            for share in c.stages:
                for part in ("queue", "work", "first", "hop", "hop_first"):
                    row[f"{share.stage}_{part}"] = getattr(share, part)
            writer.writerow(row)
    return csv_path


def load(path: Path) -> BenchResult:
    return BenchResult.from_json(json.loads(path.read_text()))
