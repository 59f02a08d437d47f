"""`promptpipe analyze --report DIR`: the pictures (PNG), the data each one draws (series.json) and a
self-contained index.html that embeds them with the tables, to open from disk or attach to a ticket."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from promptpipe.perf.analysis import Analysis, part_label
from promptpipe.perf.breakdown import PARTS, PERCENTILES
from promptpipe.perf.records import STAGES

FIGURES = ("ttft_composition", "latency_vs_load", "waterfall", "ttft_histogram", "tpot_histogram")
_STAGE_COLOURS = dict(zip(STAGES, ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#dd8452"), strict=True))
_SLOWEST = 12


def _colour(part: str) -> tuple[str, str | None]:
    """A stage's colour for its parts; its queue wait hatched, the network grey."""
    if part.endswith(" queue"):
        return _STAGE_COLOURS[part.split(maxsplit=1)[0]], "///"
    if part.endswith(" work"):
        return _STAGE_COLOURS[part.split(maxsplit=1)[0]], None
    return "#9a9a9a", None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def series(analysis: Analysis) -> dict[str, Any]:
    """The data of every figure, in milliseconds: what the PNGs draw, for tests and for other tools."""
    levels = analysis.levels
    # A source without first tokens (traces) splits the end-to-end time instead.
    first_tokens = any(lv.ttft for lv in levels) or not any(lv.e2e for lv in levels)
    composition = {
        lv.summary.level.label: {
            f"p{row.percentile}": {part: _ms(v) for part, v in row.parts.items()}
            for row in (lv.ttft if first_tokens else lv.e2e)
            if row.percentile in (50, 95, 99)
        }
        for lv in levels
    }
    knee = analysis.knee
    load = {
        "kind": analysis.result.levels[0].kind if analysis.result.levels else "",
        "load": [lv.summary.level.value for lv in levels],
        "requests_per_second": [round(lv.summary.requests_per_second, 3) for lv in levels],
        "ttft_p50": [_ms(lv.summary.ttft[50]) for lv in levels],
        "ttft_p95": [_ms(lv.summary.ttft[95]) for lv in levels],
        "ttft_p99": [_ms(lv.summary.ttft[99]) for lv in levels],
        "slo_ttft_p95": _ms(analysis.slo.ttft_p95) if analysis.slo.ttft_p95 is not None else None,
        "knee": levels[knee].summary.level.value if knee is not None else None,
    }
    splits = [s for lv in levels for s in lv.splits]
    slowest = sorted(splits, key=lambda s: s.call.e2e or 0.0, reverse=True)[:_SLOWEST]
    waterfall = {
        "calls": [
            {
                "level": analysis.result.levels[s.call.level].label,
                "start": round(s.call.start, 4),
                "e2e": _ms(s.call.e2e or 0.0),
                "parts": {part: _ms(s.e2e[part]) for part in PARTS},
            }
            for s in slowest
        ]
    }
    ttft = {lv.summary.level.label: [_ms(s.call.ttft) for s in lv.splits if s.call.ttft is not None] for lv in levels}
    tpot = {lv.summary.level.label: [_ms(t) for s in lv.splits if (t := s.call.tpot) is not None] for lv in levels}
    return {
        "ttft_composition": composition,
        "composition_of": "time to first token" if first_tokens else "end-to-end time",
        "latency_vs_load": load,
        "waterfall": waterfall,
        "ttft_histogram": _histogram(ttft),
        "tpot_histogram": _histogram(tpot),
    }


def _histogram(by_level: dict[str, list[float]], bins: int = 30) -> dict[str, Any]:
    """Counts per level over bins shared by all levels, so their shapes compare."""
    values = [v for vs in by_level.values() for v in vs]
    if not values:
        return {"values": 0, "edges": [], "counts": {}}
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = {}
    for level, vs in by_level.items():
        row = [0] * bins
        for v in vs:
            row[min(bins - 1, int((v - low) / width))] += 1
        counts[level] = row
    return {"values": len(values), "edges": [round(low + i * width, 3) for i in range(bins + 1)], "counts": counts}


def _composition_figure(data: dict[str, Any], what: str) -> Figure:
    labels, stacks = [], []
    for level, rows in data.items():
        for p, parts in rows.items():
            labels.append(f"{p}\n{level}")
            stacks.append(parts)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 3), 4.8))
    bottom = [0.0] * len(stacks)
    for part in PARTS:
        heights = [s.get(part, 0.0) for s in stacks]
        if not any(heights):
            continue
        colour, hatch = _colour(part)
        ax.bar(labels, heights, bottom=bottom, color=colour, hatch=hatch, edgecolor="white", label=part_label(part))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel(f"{what} (ms)")
    ax.set_title(f"What the {what} is made of")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _load_figure(data: dict[str, Any]) -> Figure:
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    x = data["load"]
    for key, style in (("ttft_p50", "o-"), ("ttft_p95", "s-"), ("ttft_p99", "^--")):
        ax.plot(x, data[key], style, label=f"TTFT {key.split('_')[1]}")
    if data["slo_ttft_p95"] is not None:
        ax.axhline(data["slo_ttft_p95"], color="#c44e52", linestyle=":", label="SLO: TTFT p95")
    if data["knee"] is not None:
        ax.axvline(data["knee"], color="#555555", linestyle="--", linewidth=1)
        ax.annotate("knee", (data["knee"], max(data["ttft_p95"])), textcoords="offset points", xytext=(4, -12))
    ax.set_xlabel("concurrent calls" if data["kind"] == "concurrency" else "offered load (requests/s)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Latency against load")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def _waterfall_figure(data: dict[str, Any]) -> Figure:
    calls = data["calls"]
    fig, ax = plt.subplots(figsize=(9.0, 0.42 * max(4, len(calls)) + 2.2))
    rows = list(range(len(calls)))  # positions, not names: two calls may read alike
    left = [0.0] * len(calls)
    for part in PARTS:
        widths = [c["parts"].get(part, 0.0) for c in calls]
        if not any(widths):
            continue
        colour, hatch = _colour(part)
        ax.barh(rows, widths, left=left, color=colour, hatch=hatch, edgecolor="white", label=part_label(part))
        left = [a + w for a, w in zip(left, widths, strict=True)]
    ax.set_yticks(rows, [f"{c['e2e']:.0f} ms @ {c['level']} (t={c['start']:.1f}s)" for c in calls])
    ax.invert_yaxis()
    ax.set_xlabel("ms, stage by stage (end to end)")
    ax.set_title(f"The {len(calls)} slowest calls")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    fig.tight_layout()
    return fig


def _histogram_figure(data: dict[str, Any], what: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for level, counts in data["counts"].items():
        ax.stairs(counts, data["edges"], fill=len(data["counts"]) == 1, label=level, linewidth=1.5)
    ax.set_xlabel(f"{what} (ms)")
    ax.set_ylabel("calls")
    ax.set_title(f"{what}: {data['values']} calls")
    if len(data["counts"]) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write(analysis: Analysis, directory: Path) -> list[Path]:
    """Write the report into `directory`: the PNGs, series.json and index.html. Returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    data = series(analysis)
    figures = {
        "ttft_composition": _composition_figure(data["ttft_composition"], data["composition_of"]),
        "latency_vs_load": _load_figure(data["latency_vs_load"]),
        "waterfall": _waterfall_figure(data["waterfall"]),
        "ttft_histogram": _histogram_figure(data["ttft_histogram"], "time to first token"),
        "tpot_histogram": _histogram_figure(data["tpot_histogram"], "time per output token"),
    }
    files = []
    for name, fig in figures.items():
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    (directory / "series.json").write_text(json.dumps(data, indent=1))
    (directory / "index.html").write_text(_html(analysis, files))
    return [*files, directory / "series.json", directory / "index.html"]


def _html(analysis: Analysis, pngs: list[Path]) -> str:
    e = html.escape
    result = analysis.result
    rows = []
    for lv in analysis.levels:
        s = lv.summary
        statuses = ", ".join(f"{k} {v}" for k, v in s.statuses.items())
        goodput = f"{s.goodput:.1%}" if s.goodput is not None else "-"
        rows.append(
            f"<tr><td>{e(s.level.label)}</td><td>{s.calls}</td><td>{e(statuses)}</td>"
            + "".join(f"<td>{_ms(s.ttft[p]):.1f}</td>" for p in PERCENTILES)
            + "".join(f"<td>{_ms(s.tpot[p]):.2f}</td>" for p in (50, 95))
            + f"<td>{s.output_tokens_per_second:.1f}</td><td>{s.requests_per_second:.2f}</td><td>{goodput}</td></tr>"
        )
    findings = "".join(f"<li>{e(f.sentence())}</li>" for lv in analysis.levels for f in lv.findings)
    verdicts = "".join(
        f"<li>{e(lv.summary.level.label)}: {e(name)} {measured:.4g} against {target:.4g}: "
        f"<b>{'met' if met else 'missed'}</b></li>"
        for lv in analysis.levels
        for name, measured, target, met in lv.summary.slo_verdicts(analysis.slo)
    )
    images = "".join(
        f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{e(p.stem.replace('_', ' '))}</figcaption></figure>"
        for p in pngs
    )
    head = "".join(f"<th>TTFT p{p} ms</th>" for p in PERCENTILES) + "<th>TPOT p50 ms</th><th>TPOT p95 ms</th>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>promptpipe analyze: {e(result.target)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>Where the time goes: {e(result.target)} ({e(result.transport)})</h1>
<h2>Bottlenecks</h2><ul>{findings or "<li>no call carried per-stage timings</li>"}</ul>
<h2>SLO</h2><ul>{verdicts or "<li>no SLO set (spec.slo)</li>"}</ul>
<h2>Load levels</h2><table><tr><th>load</th><th>calls</th><th>ended</th>{head}
<th>output tok/s</th><th>req/s</th><th>goodput</th></tr>{"".join(rows)}</table>
{images}</body></html>
"""
