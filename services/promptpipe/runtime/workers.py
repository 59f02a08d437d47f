"""A stage as several worker processes on one port (`stages.<stage>.workers`): a core each.

The process the container (or `promptpipe up`) starts becomes the stage's supervisor. It holds the
stage's one admission queue (and the gateway's tenant quotas and per-tenant metrics) and lends them to
the workers (`broker`), starts the workers, each a stage process of its own serving the same ports
(gRPC; the gateway's internal Stage port and OpenAI HTTP port too: SO_REUSEPORT, the kernel spreads
connections over them), serves the stage's /metrics (the workers', merged: `metrics_merge`), and
passes SIGTERM on so each drains as a lone stage does. A worker that dies takes the stage down with it:
the supervisor stops the others and exits non-zero, and the kubelet (or `promptpipe up`) sees a stage
that failed, not one quietly running on fewer cores. A worker whose supervisor is gone drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from promptpipe.contract.runtime_config import RuntimeConfig
from promptpipe.contract.spec import StageName
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.broker import StageBroker
from promptpipe.runtime.metrics_merge import merge
from promptpipe.runtime.quotas import LocalTenancy
from promptpipe.runtime.settings import StageSettings
from promptpipe.waiting import wait_until_async

log = logging.getLogger(__name__)

# How long a scrape waits for a worker's metrics.
SCRAPE_TIMEOUT_SECONDS = 5.0
# How long the workers may take to start (rag indexes its corpus first); past it the stage fails.
WORKER_START_SECONDS = 600.0


class WorkerMetrics(Collector):
    """The workers' metrics, read from each when Prometheus scrapes the supervisor, merged."""

    def __init__(self) -> None:
        self.ports: list[int] = []

    def collect(self) -> Iterator[Metric]:
        texts = []
        for port in self.ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS) as r:
                    texts.append(r.read().decode())
            except OSError as exc:  # a worker stopping: the stage is going down with it
                log.warning("worker metrics on :%d not read: %s", port, exc)
        yield from merge(texts)


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """`port` (0: a free one), held open with SO_REUSEPORT while the workers bind it beside us."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((host, port))
        yield int(held.getsockname()[1])


@dataclass(frozen=True)
class SharedPorts:
    """The ports every worker of a stage serves: gRPC, the gateway's internal Stage port (the others'
    Stage service is on `grpc`), and the gateway's HTTP port (None: it serves none)."""

    grpc: int
    stage: int
    http: int | None


@contextlib.contextmanager
def reserved_ports(settings: StageSettings) -> Iterator[SharedPorts]:
    """The stage's ports (0: free ones), held while its workers bind them beside us."""
    with contextlib.ExitStack() as held:
        grpc = held.enter_context(reserved_port(settings.host, settings.port))
        if settings.stage is not StageName.STREAM:
            yield SharedPorts(grpc, grpc, None)
            return
        stage = held.enter_context(reserved_port(settings.host, settings.stage_port))
        http = None
        if settings.http_port is not None:
            http = held.enter_context(reserved_port(settings.host, settings.http_port))
        yield SharedPorts(grpc, stage, http)


def worker_environment(settings: StageSettings, ports: SharedPorts, port_file: Path, broker: Path) -> dict[str, str]:
    """The environment of one worker: this process's settings, on the shared ports, reporting to us."""
    env = dict(os.environ)
    values = settings.model_dump(mode="json", exclude_none=True)
    values |= {
        "port": ports.grpc,
        "stage_port": ports.stage,
        "metrics_port": 0,
        "port_file": str(port_file),
        "worker_of": str(broker),
    }
    if ports.http is not None:
        values["http_port"] = ports.http
    for name, value in values.items():
        env[f"PROMPTPIPE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


async def supervise(settings: StageSettings, config: RuntimeConfig, workers: int) -> None:
    stage = settings.stage.value
    pipeline = config.pipeline.metadata.name
    queue = AdmissionQueue.of(config.pipeline.spec.stages.get(settings.stage).queue, stage)
    registry = CollectorRegistry()
    scraped = WorkerMetrics()
    registry.register(scraped)
    tenancy = None
    if settings.stage is StageName.STREAM:
        tenancy = LocalTenancy.create(config.pipeline.spec.auth, registry, pipeline, queue)
    broker = StageBroker(queue, tenancy, lambda: generate_latest(registry))
    with tempfile.TemporaryDirectory(prefix=f"promptpipe-{stage}-") as folder:
        socket_path = Path(folder, "admission.sock")
        await broker.start(str(socket_path))
        procs: list[asyncio.subprocess.Process] = []
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            with reserved_ports(settings) as ports:
                port_files = [Path(folder, f"worker-{i}.ports") for i in range(workers)]
                for port_file in port_files:
                    env = worker_environment(settings, ports, port_file, socket_path)
                    procs.append(
                        await asyncio.create_subprocess_exec(sys.executable, "-m", __package__ + ".server", env=env)
                    )
                scraped.ports = await _serving(procs, port_files, stop)
            metrics_httpd, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
            metrics_port = metrics_httpd.server_port
            settings.report_ports(ports.grpc, metrics_port, ports.http or 0, ports.stage)
            log.info(
                "stage %s of pipeline %s serving on %s:%d with %d workers (metrics :%d%s)",
                stage,
                pipeline,
                settings.host,
                ports.grpc,
                workers,
                metrics_port,
                (f", OpenAI-compatible HTTP :{ports.http}" if ports.http is not None else "")
                + (f", internal Stage service :{ports.stage}" if ports.stage != ports.grpc else ""),
            )
            try:
                failed = await _until_stopped_or_failed(procs, stop)
            finally:
                metrics_httpd.shutdown()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)  # each drains within its grace, as a lone stage does
            await asyncio.gather(*(proc.wait() for proc in procs))
            await broker.close()
    if failed:
        raise SystemExit(f"stage {stage}: a worker exited; stopped the others")
    log.info("stage %s stopped (%d workers)", stage, workers)


async def _serving(procs: list[asyncio.subprocess.Process], port_files: list[Path], stop: asyncio.Event) -> list[int]:
    """Once every worker serves: their metrics ports. A worker that exits first fails the start."""

    def all_serving() -> bool:
        exited = [p for p in procs if p.returncode is not None]
        if exited:
            raise SystemExit(f"a worker exited with {exited[0].returncode} before it served")
        if stop.is_set():
            raise SystemExit("stopped before every worker served")
        return all(f.exists() for f in port_files)

    await wait_until_async(all_serving, "every worker to serve", WORKER_START_SECONDS, every=0.05)
    return [int(f.read_text().split()[1]) for f in port_files]


async def _until_stopped_or_failed(procs: list[asyncio.subprocess.Process], stop: asyncio.Event) -> bool:
    """Wait for SIGTERM (False) or for a worker to exit by itself (True)."""
    stopping = asyncio.create_task(stop.wait())
    exits = [asyncio.create_task(p.wait()) for p in procs]
    done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    for task in exits:
        task.cancel()
    failed = stopping not in done
    if failed:
        log.error("a worker of this stage exited (%s): stopping the others", [p.returncode for p in procs])
    return failed
