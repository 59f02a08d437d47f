"""The `promptpipe` command."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich import box
from rich.table import Table

from promptpipe import __version__, chattemplates, event_loop
from promptpipe.cli import localrun
from promptpipe.cli.console import err, fail, out, print_table
from promptpipe.cli.keys import keys_app
from promptpipe.cli.models import model_app, registry_app
from promptpipe.cli.perf import analyze_command, bench
from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract import topology
from promptpipe.contract.labels import ROLLBACK as ROLLBACK_ANNOTATION
from promptpipe.contract.pipeline_file import PipelineFileError, load_pipeline
from promptpipe.contract.runtime_config import load_runtime_config
from promptpipe.contract.spec import GROUP, PLURAL, VERSION, StageName
from promptpipe.contract.tracing import Exporter
from promptpipe.localproc import alive
from promptpipe.v1 import common_pb2, gateway_pb2, stage_pb2, stage_pb2_grpc
from promptpipe.waiting import wait_until

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(asked: bool) -> None:
    if asked:
        out.print(f"promptpipe {__version__}")
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Multi-stage LLM prompt pipelines as streaming gRPC microservices."""


app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")
app.add_typer(registry_app, name="registry")
app.command()(bench)
app.command("analyze")(analyze_command)

NameOption = Annotated[str | None, typer.Option("--name", "-n", help="Which running pipeline (default: the only one).")]


def _run(name: str | None) -> localrun.LocalRun:
    try:
        return localrun.find_run(name)
    except localrun.LocalRunError as e:
        raise fail(str(e)) from None


@app.command()
def validate(file: Annotated[Path, typer.Option("--file", "-f", help="PromptPipeline YAML.")]) -> None:
    """Check a pipeline file; every invalid field is named."""
    try:
        pipeline = load_pipeline(file)
    except PipelineFileError as e:
        raise fail(f"{file} is not a valid PromptPipeline:\n{e}", 2) from None
    template = pipeline.spec.template.chat_template
    if template and (problem := chattemplates.syntax_problem(template)):  # as the operator judges it
        raise fail(f"{file} is not a valid PromptPipeline:\nspec.template.chatTemplate: does not parse: {problem}", 2)
    out.print(f"{file}: PromptPipeline [bold]{pipeline.metadata.name}[/] is valid")


@app.command()
def up(
    file: Annotated[Path, typer.Option("--file", "-f", help="PromptPipeline YAML.")],
    wait: Annotated[float, typer.Option(help="Seconds to wait for every stage to be SERVING.")] = 120.0,
    otel_exporter: Annotated[
        Exporter | None,
        typer.Option(help="Tracing exporter. Default: OTLP as the file's spec.tracing says, else none."),
    ] = None,
) -> None:
    """Start the pipeline's five stages as local processes on loopback ports."""
    try:
        run = localrun.start(file, otel_exporter=otel_exporter or "")
    except PipelineFileError as e:
        raise fail(f"{file} is not a valid PromptPipeline:\n{e}", 2) from None
    except localrun.LocalRunError as e:
        raise fail(str(e)) from None
    with err.status(f"starting pipeline {run.name}…"):
        try:
            localrun.wait_serving(run, wait)
        except localrun.LocalRunError as e:
            localrun.stop(run)
            raise fail(str(e)) from None
    wire = "gRPC over TLS" if run.tls else "gRPC"
    out.print(f"pipeline [bold]{run.name}[/] is serving; gateway at [bold]{run.gateway}[/] ({wire})")
    out.print(f"OpenAI-compatible API at [bold]{run.openai_base_url}[/] (model {run.model!r})")
    if any(os.environ.get(k) for k in ("PROMPTPIPE_API_KEYS_FILE", "PROMPTPIPE_API_KEYS")):
        out.print("API keys are on: calls need [bold]Authorization: Bearer <key>[/] (`promptpipe keys new`)")
    else:
        err.print("[yellow]no API keys configured: the gateway is open to anyone who reaches it[/]")
    _print_status(run)


@app.command()
def down(name: NameOption = None) -> None:
    """Drain and stop a local pipeline (gateway first)."""
    run = _run(name)
    killed = localrun.stop(run)
    if killed:
        err.print(f"[yellow]killed after the drain grace:[/] {', '.join(killed)}")
    out.print(f"pipeline [bold]{run.name}[/] stopped")


async def _stats(target: str) -> stage_pb2.StageStats | None:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            stub = stage_pb2_grpc.StageStub(channel)  # type: ignore[no-untyped-call]
            result: stage_pb2.StageStats = await stub.Stats(stage_pb2.StatsRequest(), timeout=2.0)
            return result
        except grpc.aio.AioRpcError:
            return None


def _print_status(run: localrun.LocalRun) -> None:
    table = Table(
        title=f"pipeline {run.name} (127.0.0.1)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("stage", "health", "grpc", "metrics", "queue", "running", "rejected", "dropped", "done"):
        table.add_column(col, justify="left" if col in ("stage", "health") else "right", no_wrap=True)
    spec = load_runtime_config(Path(run.folder) / "runtime.yaml").pipeline.spec
    for stage, proc in run.stages.items():
        health = localrun.health_status(proc.stats_target, 2.0) if alive(proc.pid) else "EXITED"
        stats = asyncio.run(_stats(proc.stats_target)) if health != "EXITED" else None
        colour = "green" if health == "SERVING" else "red"
        # A process with fused stages (`spec.fuse`) names them; its queue is the one its callers call.
        label = "+".join([stage, *(s.value for s in topology.fused_into(spec, StageName(stage)))])
        row = [label, f"[{colour}]{health}[/]", str(proc.port), str(proc.metrics_port)]
        if stats is None:
            table.add_row(*row, *["-"] * 5)
            continue
        table.add_row(
            *row,
            f"{stats.queue_depth}/{stats.queue_capacity}",
            f"{stats.in_flight}/{stats.concurrency}",
            str(stats.rejected_total),
            str(stats.dropped_total),
            str(stats.completed_total),
        )
    print_table(table)


@app.command()
def status(name: NameOption = None) -> None:
    """Each stage: health, queue depth/capacity, in flight, rejections."""
    _print_status(_run(name))


async def _generate(
    target: str,
    prompt: str,
    session: str,
    max_new_tokens: int,
    temperature: float | None,
    timeout: float,
    api_key: str | None,
    tls: bool,
    ca_file: Path | None,
) -> int:
    roots = ca_file.read_bytes() if ca_file is not None else None
    async with PipelineClient(target, api_key, tls=tls, root_certificates=roots) as client:
        try:
            async for response in client.generate(
                prompt, session_id=session, max_new_tokens=max_new_tokens, temperature=temperature, timeout=timeout
            ):
                if response.HasField("chunk"):
                    sys.stdout.write(response.chunk.text)
                    sys.stdout.flush()
                else:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                    _print_summary(response.summary)
        except GenerationError as e:
            sys.stdout.write("\n")
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            return 1
    return 0


def _print_summary(s: gateway_pb2.GenerateSummary) -> None:
    reason = common_pb2.FinishReason.Name(s.finish_reason).removeprefix("FINISH_REASON_").lower()
    generated = s.usage.completion_tokens
    streaming = s.total_seconds - s.time_to_first_token_seconds
    rate = (generated - 1) / streaming if generated > 1 and streaming > 0 else 0.0
    stages = "  ".join(f"{t.stage} {(t.queue_wait_seconds + t.work_seconds) * 1000:.1f}ms" for t in s.timings)
    err.print(
        f"[dim]── finish={reason}  tokens={s.usage.prompt_tokens}+{generated}  "
        f"ttft={s.time_to_first_token_seconds * 1000:.0f}ms  {rate:.1f} tok/s  "
        f"total={s.total_seconds:.2f}s\n── {stages}[/]",
        highlight=False,
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The question.")],
    session: Annotated[str, typer.Option("--session", "-s", help="Session id (keeps its backend replica).")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="0: the pipeline's default.")] = 0,
    temperature: Annotated[float | None, typer.Option(help="Default: the pipeline's.")] = None,
    timeout: Annotated[float, typer.Option(help="Deadline of the call, in seconds.")] = 120.0,
    target: Annotated[str | None, typer.Option(help="Gateway address (default: the local pipeline's).")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="PROMPTPIPE_API_KEY", help="The gateway's API key, if it has keys.")
    ] = None,
    tls: Annotated[bool, typer.Option(help="The gateway serves TLS (spec.tls).")] = False,
    ca_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Trust this CA (PEM) for TLS; implies --tls.")
    ] = None,
    name: NameOption = None,
) -> None:
    """Stream an answer from the gateway, then a summary line."""
    address = target or _run(name).gateway
    call = _generate(address, prompt, session, max_new_tokens, temperature, timeout, api_key, tls, ca_file)
    raise typer.Exit(event_loop.run(call))


@app.command()
def rollback(
    pipeline: Annotated[str, typer.Argument(help="The PromptPipeline.")],
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Default: the kubeconfig's.")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the operator to act; 0: do not wait.")] = 30.0,
) -> None:
    """Put a cluster pipeline's traffic back on its previous model version (blue-green)."""
    # Only this command talks to a cluster: the client's import is not paid by every other one.
    from kubernetes import client, config  # noqa: PLC0415

    try:
        config.load_kube_config()
        ns = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
    except config.ConfigException as e:
        raise fail(f"no cluster: {e}") from None
    api = client.CustomObjectsApi()
    token = f"{time.time():.3f}"
    try:
        api.patch_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, pipeline, {"metadata": {"annotations": {ROLLBACK_ANNOTATION: token}}}
        )
    except client.ApiException as e:
        raise fail(f"PromptPipeline {ns}/{pipeline}: HTTP {e.status} {e.reason}") from None
    out.print(f"rollback of [bold]{ns}/{pipeline}[/] requested")
    if not wait:
        return

    def handled() -> dict[str, Any] | None:
        status = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, pipeline).get("status") or {}
        rollout: dict[str, Any] = status.get("rollout") or {}
        return rollout if rollout.get("rollbackHandled") == token else None

    try:
        rollout = wait_until(handled, "the operator", timeout=wait, every=0.2)
    except TimeoutError:
        raise fail(f"the operator did not act within {wait:g}s (is it running?)") from None
    if rollout.get("reason") != "ManualRollback":
        raise fail("the operator found no previous version running to go back to")
    active = rollout.get("active") or {}
    out.print(f"traffic on {active.get('version')} ({active.get('color')})")


if __name__ == "__main__":
    app()
