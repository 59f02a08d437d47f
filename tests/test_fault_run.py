"""The fault run: under a steady stream of calls, one fault after another, and every call must end with its
tokens or an explicit status within its deadline. `make faults` runs it alone and prints the report.

The data path is five stage processes (as `promptpipe up` runs them) on the `tgi` backend, a TGI-protocol
server behind a TCP proxy; the control plane is the operator, reaching the real API server and the registry
(moto over HTTP) through proxies of their own, reconciling a pipeline that follows a registry alias. Faults:
each stage killed (SIGKILL) and started again; TGI stalled (its connections dead for good, as when a peer
vanishes) and slowed; the operator's API server connection stalled; the registry slowed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client

from promptpipe.cli.localrun import health_status
from promptpipe.contract.spec import STAGE_ORDER, StageName
from promptpipe.registry.store import Registry
from promptpipe.rpc import CHANNEL_OPTIONS
from promptpipe.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from promptpipe.waiting import wait_until, wait_until_async
from tests.devcluster.build import Tools
from tests.devcluster.cluster import ControlPlane
from tests.support.cluster import QUICKSTART, Cluster, apply
from tests.support.faults import FaultyProxy, Mode
from tests.support.moto import make_model, registry_env_through
from tests.support.operator import OperatorProcess, api_through_proxy
from tests.support.pipelines import RunningPipeline, synthetic_pipeline, tgi_server

pytestmark = [pytest.mark.processes, pytest.mark.controlplane, pytest.mark.faults]

CALLERS = 6
TOKENS = 30
CALL_DEADLINE = 8.0  # every call sets one, as docs/api.md asks
HANG_GRACE = 5.0  # past its deadline by this much, a call that has not ended never will
FAULT_SECONDS = 3.0
RETRY_SECONDS = 0.2
# A caller reconnects soon after the gateway is back (gRPC's default backoff reaches two minutes).
CALLER_OPTIONS = (*CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))
NAME = "faulty"


@dataclass
class Report:
    made: int = 0
    with_tokens: int = 0  # every token, then the summary
    with_status: collections.Counter[str] = field(default_factory=collections.Counter)
    status_after_tokens: int = 0  # of those: a status after some tokens (the answer is cut short)
    never_ended: int = 0
    without_either: int = 0  # the stream ended with neither the summary nor a status
    during: dict[str, collections.Counter[str]] = field(default_factory=dict)
    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    open_now: int = 0
    open_at: dict[str, int] = field(default_factory=dict)  # calls open when each fault began

    def lines(self) -> list[str]:
        statuses = ", ".join(f"{code} {n}" for code, n in sorted(self.with_status.items()))
        rows = [
            f"calls made                                   {self.made}",
            f"ended with their tokens and the summary      {self.with_tokens}",
            f"ended with an explicit status                {sum(self.with_status.values())}  ({statuses})",
            f"  of which after some tokens                 {self.status_after_tokens}",
            f"never ended, or ended with neither           {self.never_ended + self.without_either}",
            "by fault (the outcome of every call that ended during it):",
        ]
        rows += [
            f"  {fault:<22} {self.open_at.get(fault, 0):>2} open when it began; ended: {dict(sorted(c.items()))}"
            for fault, c in self.during.items()
        ]
        rows += ["statuses, by message:"] + [f"  {n:>6}  {m}" for m, n in self.messages.most_common(12)]
        return rows


async def call_once(stub: Any, report: Report, fault: Callable[[], str]) -> bool:
    """One call, its outcome counted under the fault going on when it ended; True if it ended with its tokens."""
    report.made += 1
    request = gateway_pb2.GenerateRequest(
        prompt="slow:20 tell me", parameters=common_pb2.GenerationParameters(max_new_tokens=TOKENS)
    )
    tokens, summary = 0, False
    report.open_now += 1

    async def consume() -> None:
        nonlocal tokens, summary
        async for response in stub.Generate(request, timeout=CALL_DEADLINE):
            if response.HasField("summary"):
                summary = True
            else:
                tokens += response.chunk.token_count

    try:
        await asyncio.wait_for(consume(), CALL_DEADLINE + HANG_GRACE)
    except grpc.aio.AioRpcError as err:
        report.open_now -= 1
        outcomes = report.during.setdefault(fault(), collections.Counter())
        report.with_status[err.code().name] += 1
        report.messages[f"{err.code().name}: {(err.details() or '')[:90]}"] += 1
        report.status_after_tokens += tokens > 0
        outcomes[err.code().name] += 1
        return False
    except TimeoutError:
        report.open_now -= 1
        report.never_ended += 1
        report.during.setdefault(fault(), collections.Counter())["never ended"] += 1
        return False
    report.open_now -= 1
    outcomes = report.during.setdefault(fault(), collections.Counter())
    if summary:
        report.with_tokens += 1
        outcomes["tokens"] += 1
        return True
    report.without_either += 1
    outcomes["neither"] += 1
    return False


@pytest.fixture
def data_path(
    start_pipeline: Callable[[dict[str, Any]], RunningPipeline],
) -> Iterator[tuple[RunningPipeline, FaultyProxy]]:
    with tgi_server() as url:
        host, port = url.removeprefix("http://").split(":")
        with FaultyProxy(host, int(port)) as tgi:
            doc = synthetic_pipeline(
                NAME,
                model={
                    "backend": "tgi",
                    "tgi": {"endpoints": [f"http://{tgi.address}"], "readTimeoutSeconds": 2},
                    "circuitBreaker": {"failureThreshold": 3, "resetSeconds": 1},
                },
                generation={"maxNewTokens": TOKENS},
            )
            yield start_pipeline(doc), tgi


@dataclass
class ControlPlaneUnderFaults:
    cluster: Cluster
    plane: ControlPlane
    tools: Tools
    api: FaultyProxy
    registry: FaultyProxy
    operator: OperatorProcess


@pytest.fixture
def control(
    registry: Registry,
    operator_identity: Path,
    kube: client.ApiClient,
    namespace: str,
    control_plane: ControlPlane,
    kube_tools: Tools,
    tmp_path: Path,
) -> Iterator[ControlPlaneUnderFaults]:
    registry.push("smollm2", make_model(tmp_path / "v1"), "v1")
    registry.promote("smollm2", "v1", "prod")
    endpoint = str(registry.settings.endpoint_url).removeprefix("http://").split(":")
    with (
        api_through_proxy(operator_identity, tmp_path) as (through, api),
        FaultyProxy(endpoint[0], int(endpoint[1])) as registry_proxy,
        OperatorProcess(
            through,
            namespace,
            tmp_path / "operator.log",
            resync_seconds=1.0,
            env={
                **registry_env_through(registry.settings, registry_proxy.address),
                "PROMPTPIPE_OPERATOR_API_TIMEOUT_SECONDS": "2",
                "PROMPTPIPE_OPERATOR_ALIAS_POLL_SECONDS": "0.5",
            },
        ) as op,
    ):
        yield ControlPlaneUnderFaults(Cluster(kube, namespace), control_plane, kube_tools, api, registry_proxy, op)


async def serving(target: str) -> bool:
    return await asyncio.to_thread(health_status, target, 1.0) == "SERVING"  # off the loop the callers share


def blue_green(**stages: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {**QUICKSTART, "metadata": {"name": NAME}}
    doc["spec"] = {
        **QUICKSTART["spec"],
        "model": {"name": "smollm2", "alias": "prod", "backend": "tgi", "tgi": {"gpus": 1}},
        "stages": stages,
    }
    return doc


async def test_every_call_ends_with_its_tokens_or_an_explicit_status_through_every_fault(
    data_path: tuple[RunningPipeline, FaultyProxy], control: ControlPlaneUnderFaults
) -> None:
    pipeline, tgi = data_path
    apply(control.plane, control.tools, control.cluster.ns, blue_green())
    wait_until(lambda: control.cluster.status(NAME).get("activeVersion") == "v1", "the operator to resolve the alias")

    report = Report()
    fault = "baseline"
    running = True
    relaunched: list[subprocess.Popen[bytes]] = []

    async def caller() -> None:
        async with grpc.aio.insecure_channel(pipeline.gateway, options=CALLER_OPTIONS) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)  # type: ignore[no-untyped-call]
            while running:
                if not await call_once(stub, report, lambda: fault):
                    await asyncio.sleep(RETRY_SECONDS)  # as a client backs off after a failure

    async def kill(stage: StageName) -> None:
        os.kill(pipeline.pid(stage), signal.SIGKILL)
        await asyncio.sleep(1.0)
        relaunched.append(pipeline.relaunch(stage))
        target = pipeline.target(stage)
        await wait_until_async(lambda: serving(target), f"{stage.value} back", timeout=30)

    async def for_a_while(mode: Mode, proxy: FaultyProxy, delay: float = 0.0) -> None:
        proxy.delay = delay
        proxy.mode = mode
        await asyncio.sleep(FAULT_SECONDS)
        proxy.mode = Mode.PASS

    schedule: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("baseline", lambda: asyncio.sleep(FAULT_SECONDS)),
        *[(f"kill {s.value}", lambda s=s: kill(s)) for s in STAGE_ORDER],  # type: ignore[misc]
        ("stall TGI", lambda: for_a_while(Mode.STALL, tgi)),
        ("slow TGI", lambda: for_a_while(Mode.SLOW, tgi, 0.3)),
        ("stall the API server", lambda: for_a_while(Mode.STALL, control.api)),
        ("slow the registry", lambda: for_a_while(Mode.SLOW, control.registry, 1.5)),
        ("after", lambda: asyncio.sleep(CALL_DEADLINE + HANG_GRACE)),
    ]
    callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    try:
        for name, inject in schedule:
            fault = name
            report.open_at[name] = report.open_now
            report.during.setdefault(name, collections.Counter())
            await inject()
    finally:
        running = False
        await asyncio.gather(*callers)
        for proc in relaunched:
            proc.terminate()
            proc.wait(15)

    # The operator, after its own faults, still converges: an edit made now is applied.
    edited_at = time.monotonic()
    apply(control.plane, control.tools, control.cluster.ns, blue_green(rag={"scaling": {"maxReplicas": 7}}))
    wait_until(
        lambda: control.cluster.children(NAME)[("ScaledObject", f"{NAME}-rag")]["spec"]["maxReplicaCount"] == 7,
        "the operator to apply an edit after the faults",
        timeout=60,
    )
    converged = time.monotonic() - edited_at
    print(
        "\n".join(
            ["", "fault run", *report.lines(), f"operator applied an edit made after the faults in {converged:.1f} s"]
        )
    )

    assert report.never_ended + report.without_either == 0, report.lines()
    assert report.made == report.with_tokens + sum(report.with_status.values())
    assert report.during["baseline"]["tokens"] > 0 and report.during["after"]["tokens"] > 0, report.lines()
