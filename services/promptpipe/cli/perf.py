"""`promptpipe bench` (load a gateway, record every call) and `promptpipe analyze` (where the time went)."""

from __future__ import annotations

import datetime
import math
import statistics
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from promptpipe import event_loop
from promptpipe.cli import localrun
from promptpipe.cli.console import err, fail, out, print_table
from promptpipe.contract.pipeline_file import PipelineFileError, load_pipeline
from promptpipe.contract.spec import PipelineSpec
from promptpipe.perf import prometheus as prom
from promptpipe.perf import records, traces
from promptpipe.perf.analysis import Analysis, LevelAnalysis, analyze, part_label, slo_of
from promptpipe.perf.breakdown import PARTS, PERCENTILES, LevelSummary, Slo, summarize
from promptpipe.perf.load import parse_levels
from promptpipe.perf.prompts import from_jsonl
from promptpipe.perf.runner import Plan, prompt_source, run
from promptpipe.perf.transports import GrpcTransport, HttpTransport, Transport
from promptpipe.promql import PrometheusError

FileOption = Annotated[
    Path | None, typer.Option("--file", "-f", exists=True, dir_okay=False, help="The pipeline file: its spec.slo.")
]
SloTtftOption = Annotated[float | None, typer.Option(help="SLO: TTFT p95 in ms (default: the file's spec.slo).")]
SloTpotOption = Annotated[float | None, typer.Option(help="SLO: TPOT p95 in ms (default: the file's spec.slo).")]


def _spec(file: Path | None) -> PipelineSpec | None:
    if file is None:
        return None
    try:
        return load_pipeline(file).spec
    except PipelineFileError as e:
        raise fail(f"{file} is not a valid PromptPipeline:\n{e}", 2) from None


def _slo(spec: PipelineSpec | None, ttft_ms: float | None, tpot_ms: float | None) -> Slo:
    base = slo_of(spec)
    return Slo(
        ttft_p95=ttft_ms / 1000 if ttft_ms is not None else base.ttft_p95,
        tpot_p95=tpot_ms / 1000 if tpot_ms is not None else base.tpot_p95,
        error_rate=base.error_rate,
    )


def bench(
    concurrency: Annotated[
        str | None, typer.Option(help="Fixed concurrency; several (1,4,16) sweep them in turn.")
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Fixed rate in calls/s, Poisson arrivals; several (2,5,10) sweep them.")
    ] = None,
    requests: Annotated[
        int, typer.Option(min=1, help="Calls per level, at most (rounded up to whole sessions).")
    ] = 100,
    seconds: Annotated[
        float, typer.Option(min=0.1, help="Seconds per level, at most: no session starts after.")
    ] = 60.0,
    input_tokens: Annotated[int, typer.Option(min=1, help="Synthetic prompts: about this many tokens.")] = 128,
    output_tokens: Annotated[int, typer.Option(min=1, help="Tokens asked of each call (max_new_tokens).")] = 64,
    prompts: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help='JSONL: {"prompt": ...} or {"messages": [...]} per line.'),
    ] = None,
    turns: Annotated[int, typer.Option(min=1, help="Turns per session (>1: multi-turn, history carried).")] = 1,
    timeout: Annotated[float, typer.Option(min=0.1, help="Deadline of each call, in seconds.")] = 60.0,
    warmup: Annotated[int, typer.Option(min=0, help="Calls sent one at a time first, not recorded.")] = 0,
    transport: Annotated[str, typer.Option(help="grpc (the gateway's API) or http (OpenAI-compatible).")] = "grpc",
    target: Annotated[
        str | None, typer.Option(help="gRPC address, or the HTTP API's base URL (default: the local pipeline's).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="HTTP: the model to ask for (default: the first listed).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="PROMPTPIPE_API_KEY", help="The gateway's API key.")] = None,
    output: Annotated[Path, typer.Option("--out", "-o", help="Result file (JSON; the calls as CSV beside it).")] = Path(
        "bench.json"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the prompts and arrivals.")] = 0,
    file: FileOption = None,
    slo_ttft_ms: SloTtftOption = None,
    slo_tpot_ms: SloTpotOption = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Which local pipeline (default: the only one).")
    ] = None,
) -> None:
    """Load a gateway and record every call with its per-stage timings; stops after --requests or --seconds
    per level. Then `promptpipe analyze` the result."""
    try:
        levels = parse_levels(concurrency, rate)
        fixed = from_jsonl(prompts) if prompts is not None else None
    except ValueError as e:
        raise fail(str(e), 2) from None
    if transport not in ("grpc", "http"):
        raise fail(f"--transport: {transport!r} is neither grpc nor http", 2)
    slo = _slo(_spec(file), slo_ttft_ms, slo_tpot_ms)
    address = target or _local_target(name, transport)
    source = prompt_source(fixed, input_tokens, output_tokens)
    plan = Plan(levels, requests, seconds, source, turns, timeout, seed, warmup)
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "requests": requests,
        "seconds": seconds,
        "input_tokens": None if fixed else input_tokens,
        "output_tokens": None if fixed else output_tokens,
        "prompts": str(prompts) if prompts else None,
        "turns": turns,
        "timeout": timeout,
        "seed": seed,
        "warmup": warmup,
    }
    result = records.BenchResult(address, transport, levels, meta=meta)
    event_loop.run(_bench(plan, transport, address, api_key, model, result))
    csv_path = records.save(result, output)
    _print_errors(result)
    _print_levels([summarize(result, i, slo) for i in range(len(levels))], slo)
    out.print(f"results: [bold]{output}[/] and {csv_path}; next: promptpipe analyze {output}", soft_wrap=True)


def _local_target(name: str | None, transport: str) -> str:
    try:
        found = localrun.find_run(name)
    except localrun.LocalRunError as e:
        raise fail(f"{e} (or give --target)") from None
    return found.gateway if transport == "grpc" else found.openai_base_url


async def _bench(
    plan: Plan, kind: str, address: str, api_key: str | None, model: str | None, result: records.BenchResult
) -> None:
    client: Transport = GrpcTransport(address, api_key) if kind == "grpc" else HttpTransport(address, api_key, model)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[errors]} errors  TTFT p50 {task.fields[ttft]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=err, transient=False) as progress:
            tasks = [
                progress.add_task(level.label, total=plan.requests, errors=0, ttft="-", start=False)
                for level in plan.levels
            ]
            ttfts: dict[int, list[float]] = {}

            def advance(index: int, call: records.CallRecord) -> None:
                progress.start_task(tasks[index])
                if call.ttft is not None and call.ok:
                    ttfts.setdefault(index, []).append(call.ttft)
                errors = sum(1 for c in result.calls_of(index) if not c.ok)
                ttft = f"{statistics.median(ttfts[index]) * 1000:.1f} ms" if ttfts.get(index) else "-"
                progress.update(tasks[index], advance=1, errors=errors, ttft=ttft)

            await run(plan, client, result, advance)
            for task in tasks:  # a level cut by its time ends short of its count
                progress.update(task, total=progress.tasks[task].completed)
    finally:
        await client.close()


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def _print_levels(summaries: list[LevelSummary], slo: Slo) -> None:
    if not summaries:
        return
    load = {"concurrency": "concurrency", "rate": "offered req/s"}.get(summaries[0].level.kind, "calls")
    latency = Table(title="latency (ms)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    latency.add_column(load)
    metrics = (("TTFT", "ttft", PERCENTILES), ("TPOT", "tpot", (50, 95)), ("ITL", "itl", (50, 99)))
    for label, _, ps in (*metrics, ("E2E", "e2e", (50, 99))):
        for p in ps:
            latency.add_column(f"{label} p{p}", justify="right")
    ends = Table(title="throughput and ends", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in (load, "calls", "out tok/s", "req/s", "goodput", "ended"):
        ends.add_column(col, justify="left" if col in (load, "ended") else "right")
    for s in summaries:
        figures = [_ms(getattr(s, attr)[p]) for _, attr, ps in (*metrics, ("E2E", "e2e", (50, 99))) for p in ps]
        latency.add_row(f"{s.level.value:g}", *figures)
        ends.add_row(
            f"{s.level.value:g}",
            str(s.calls),
            f"{s.output_tokens_per_second:.1f}",
            f"{s.requests_per_second:.2f}",
            f"{s.goodput:.1%}" if s.goodput is not None else "-",
            ", ".join(f"{k} {v}" for k, v in s.statuses.items()),
        )
    print_table(latency)
    print_table(ends)
    for s in summaries:
        for stage, (calls, times) in s.failed_over.items():
            out.print(
                f"at {s.level.label}: {calls} of {s.calls} calls carried on mid-stream by {stage}"
                f" after what served them failed ({times} failovers; spec.failover)",
                soft_wrap=True,
            )
        for stage, count in s.wait_capped.items():
            out.print(
                f"at {s.level.label}: {count} of {s.calls} calls refused or ended by"
                f" stages.{stage}.queue.maxWaitMilliseconds (the wait cap), not by a full queue",
                soft_wrap=True,
            )
    if slo.set:
        for s in summaries:
            verdicts = [
                f"{name} {_slo_figure(name, measured)} {'≤' if met else '>'} {_slo_figure(name, target)} "
                + ("[green]met[/]" if met else "[red]missed[/]")
                for name, measured, target, met in s.slo_verdicts(slo)
            ]
            out.print(f"SLO at {s.level.label}: " + ", ".join(verdicts), soft_wrap=True)


def _print_errors(result: records.BenchResult) -> None:
    """Each error status once, with what the gateway said the first time."""
    seen: dict[str, str] = {}
    for c in result.calls:
        if not c.ok and c.status not in seen:
            seen[c.status] = c.error
    for status, message in seen.items():
        err.print(f"[yellow]{status}[/]: {message}", highlight=False, soft_wrap=True)


def _slo_figure(objective: str, value: float) -> str:
    return f"{value:.2%}" if objective == "error rate" else f"{value * 1000:.1f} ms"


def analyze_command(
    result_file: Annotated[
        Path | None, typer.Argument(exists=True, dir_okay=False, help="A `promptpipe bench` result.")
    ] = None,
    file: FileOption = None,
    slo_ttft_ms: SloTtftOption = None,
    slo_tpot_ms: SloTpotOption = None,
    report: Annotated[
        Path | None, typer.Option(file_okay=False, help="Write an HTML report with its PNGs into this folder.")
    ] = None,
    prometheus: Annotated[
        str | None, typer.Option(help="Instead of a result file: a Prometheus scraping the pipeline (its URL).")
    ] = None,
    pipeline: Annotated[str | None, typer.Option(help="With --prometheus or --jaeger: the pipeline's name.")] = None,
    namespace: Annotated[
        str | None, typer.Option(help="With --prometheus: its namespace (needed if several have the name).")
    ] = None,
    window: Annotated[str, typer.Option(help="With --prometheus: the PromQL range to look back over.")] = "5m",
    jaeger: Annotated[
        str | None, typer.Option(help="Instead of a result file: Jaeger's query API (its URL), holding the traces.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="With --jaeger: at most this many traces.")] = 500,
    lookback: Annotated[str, typer.Option(help="With --jaeger: how far back (Jaeger's 1h, 30m, ...).")] = "1h",
) -> None:
    """Where the time went: per load level and percentile, how TTFT and TPOT split across the stages' queue
    waits and work and the network; the dominant part and the knob (from the spec) that moves it; the SLO."""
    spec = _spec(file)
    if sum(x is not None for x in (result_file, prometheus, jaeger)) != 1:
        raise fail("give one source: a bench result file, --prometheus URL or --jaeger URL (with --pipeline)", 2)
    slo = _slo(spec, slo_ttft_ms, slo_tpot_ms)
    if prometheus is not None:
        _analyze_prometheus(prometheus, pipeline, namespace, window, spec)
    elif jaeger is not None:
        if not pipeline:
            raise fail("--jaeger needs --pipeline NAME", 2)
        try:
            result = traces.result(jaeger, pipeline, traces.fetch(jaeger, pipeline, limit, lookback))
        except traces.TraceSourceError as e:
            raise fail(str(e)) from None
        _show(result, spec, slo, report)
    elif result_file is not None:
        try:
            result = records.load(result_file)
        except (ValueError, KeyError, TypeError) as e:
            raise fail(f"{result_file}: {e}", 2) from None
        _show(result, spec, slo, report)


def _show(result: records.BenchResult, spec: PipelineSpec | None, slo: Slo, report: Path | None) -> None:
    analysis = analyze(result, spec, slo)
    _print_levels([lv.summary for lv in analysis.levels], analysis.slo)
    for lv in analysis.levels:
        _print_split(lv)
    _print_accounting(analysis)
    if analysis.knee is not None:
        out.print(
            f"knee: latency leaves its unloaded curve after [bold]{result.levels[analysis.knee].label}[/]",
            soft_wrap=True,
        )
    if report is not None:
        try:
            from promptpipe.perf import report as reporting  # noqa: PLC0415 - matplotlib only when drawing
        except ImportError as e:
            raise fail(f"--report needs matplotlib: pip install 'promptpipe[perf]' ({e})") from None
        files = reporting.write(analysis, report)
        out.print(f"report: [bold]{report / 'index.html'}[/] ({len(files)} files)", soft_wrap=True)


def _analyze_prometheus(
    url: str, pipeline: str | None, namespace: str | None, window: str, spec: PipelineSpec | None
) -> None:
    if not pipeline:
        raise fail("--prometheus needs --pipeline NAME", 2)
    try:
        fig = prom.figures(url, pipeline, window, namespace)
    except PrometheusError as e:
        raise fail(str(e)) from None
    parts = fig.mean_parts()
    total = sum(parts.values())
    table = Table(
        title=f"pipeline {pipeline}, last {window}: {fig.calls_per_second:.3g} req/s (ms)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
    )
    for col in ("stage", "calls/s", "queue mean", "queue p95", "own work mean", "share of the mean call"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in fig.stages.items():
        own = parts[f"{name} queue"] + parts[f"{name} work"]
        table.add_row(
            name,
            f"{s.calls_per_second:.3g}",
            _ms(s.queue_mean),
            _ms(s.queue_p95),
            _ms(parts[f"{name} work"]),
            f"{own / total:.0%}" if total else "-",
        )
    print_table(table)
    out.print("gateway TTFT " + ", ".join(f"p{p} {_ms(v)} ms" for p, v in fig.ttft.items()), soft_wrap=True)
    out.print(
        "(a stage's own work includes the hops to the stages it calls: Prometheus does not see the network)",
        style="dim",
        soft_wrap=True,
    )
    out.print(f"[bold]bottleneck[/]: {prom.bottleneck(fig, spec)}", soft_wrap=True)


def _print_split(lv: LevelAnalysis) -> None:
    """One table per metric: the parts down, the percentiles across (narrow enough for a terminal)."""
    for metric, rows in (("TTFT", lv.ttft), ("TPOT", lv.tpot), ("E2E", lv.e2e)):
        if not rows:
            continue
        table = Table(
            title=f"{metric} at {lv.summary.level.label}: ms (share)", title_justify="left", box=box.SIMPLE_HEAD
        )
        table.add_column("")
        for r in rows:
            table.add_column(f"p{r.percentile}", justify="right")
        for part in PARTS:
            if any(r.parts[part] > 0 for r in rows):
                cells = [f"{r.parts[part] * 1000:.1f} ({r.parts[part] / r.value:.0%})" for r in rows if r.value]
                table.add_row(part_label(part), *cells)
        table.add_row(f"[bold]{metric}[/]", *(f"[bold]{r.value * 1000:.1f}[/]" for r in rows))
        print_table(table)
    for f in lv.findings:
        out.print(f"[bold]bottleneck[/]: {f.sentence()}", soft_wrap=True)


def _print_accounting(analysis: Analysis) -> None:
    errors = analysis.sum_errors()
    if not errors:
        err.print("[yellow]no call carried per-stage timings: is the target a promptpipe gateway?[/]")
        return
    worst = max(errors)
    out.print(
        f"accounting: stage shares + network add up to each call's measured end-to-end time within "
        f"{worst:.2%} (median {statistics.median(errors):.3%}, {len(errors)} calls)",
        soft_wrap=True,
    )
