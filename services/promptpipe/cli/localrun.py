"""`promptpipe up/down/status` on a laptop: each stage a local process on loopback.

The processes run the same entry point as the container images
(`promptpipe.stage_process`), configured the same way (PROMPTPIPE_* environment
and a runtime config file), so local runs exercise the production code path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from promptpipe.cli import local_identity
from promptpipe.contract import topology
from promptpipe.contract.pipeline_file import load_pipeline
from promptpipe.contract.runtime_config import RuntimeConfig, load_runtime_config
from promptpipe.contract.spec import STAGE_ORDER, TGI_WITHOUT_ENDPOINTS, BackendKind, PromptPipeline, StageName
from promptpipe.localproc import alive, exits, free_port, state_home
from promptpipe.waiting import wait_until

# The gateway drains first (it stops taking requests), the model server last.
SHUTDOWN_ORDER = (StageName.STREAM, StageName.RAG, StageName.ASSEMBLE, StageName.POST, StageName.INFERENCE)


@dataclass
class StageProcess:
    stage: str
    pid: int
    port: int
    metrics_port: int
    log: str
    http_port: int = 0  # the gateway's OpenAI-compatible API
    stage_port: int = 0  # its Stage service (queue stats): the gateway's internal port, else `port`

    @property
    def stats_target(self) -> str:
        return f"127.0.0.1:{self.stage_port or self.port}"


@dataclass
class LocalRun:
    name: str
    folder: str
    stages: dict[str, StageProcess]
    model: str = ""  # what OpenAI clients name as `model`
    tls: bool = False  # the gateway's public ports serve TLS (PROMPTPIPE_TLS_CERT_FILE)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.stages[StageName.STREAM.value].port}"

    @property
    def openai_base_url(self) -> str:
        """What an OpenAI SDK takes as `base_url`."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.stages[StageName.STREAM.value].http_port}/v1"

    def save(self) -> None:
        (Path(self.folder) / "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> LocalRun:
        data = json.loads((folder / "state.json").read_text())
        stages = {k: StageProcess(**v) for k, v in data.pop("stages").items()}
        return cls(stages=stages, **data)


class LocalRunError(RuntimeError):
    pass


def find_run(name: str | None) -> LocalRun:
    runs = state_home() / "runs"
    candidates = sorted(p for p in runs.glob("*") if (p / "state.json").exists()) if runs.exists() else []
    if name is not None:
        candidates = [p for p in candidates if p.name == name]
    if not candidates:
        raise LocalRunError("no local pipeline is running (start one with `promptpipe up -f FILE`)")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise LocalRunError(f"several pipelines are running ({names}); pick one with --name")
    return LocalRun.load(candidates[0])


def start(pipeline_file: Path, *, otel_exporter: str = "") -> LocalRun:
    pipeline = load_pipeline(pipeline_file)
    model = pipeline.spec.model
    if model.backend is BackendKind.TGI and not (model.tgi and model.tgi.endpoints):
        raise LocalRunError(TGI_WITHOUT_ENDPOINTS)
    name = pipeline.metadata.name
    folder = state_home() / "runs" / name
    if (folder / "state.json").exists():
        existing = LocalRun.load(folder)
        if any(alive(p.pid) for p in existing.stages.values()):
            raise LocalRunError(f"pipeline {name!r} is already running (promptpipe down --name {name})")
    folder.mkdir(parents=True, exist_ok=True)
    # One process per stage, but a fused stage runs in its host's (`spec.fuse`): its endpoint is the host's.
    processes = topology.processes(pipeline.spec)
    ports = {stage: free_port() for stage in processes}
    config = RuntimeConfig(
        pipeline=pipeline,
        endpoints={s: f"127.0.0.1:{ports[topology.host_of(pipeline.spec, s)]}" for s in STAGE_ORDER},
        base_dir=str(pipeline_file.resolve().parent),
        identity=local_identity.set_up(folder, pipeline),  # the stages check who calls them, as on a cluster
    )
    config_path = folder / "runtime.yaml"
    config_path.write_text(config.dump_yaml())
    tls = bool(os.environ.get("PROMPTPIPE_TLS_CERT_FILE"))
    run = LocalRun(name=name, folder=str(folder), stages={}, model=model.name, tls=tls)
    for stage in processes:
        log_path = folder / f"{stage.value}.log"
        env = {
            **stage_environment(stage, pipeline, os.environ),
            "PROMPTPIPE_STAGE": stage.value,
            "PROMPTPIPE_CONFIG": str(config_path),
            "PROMPTPIPE_PORT": str(ports[stage]),
            "PROMPTPIPE_METRICS_PORT": str(free_port()),
            "PROMPTPIPE_PORT_FILE": str(folder / f"{stage.value}.ports"),
            "PROMPTPIPE_OTEL_EXPORTER": otel_exporter,
        }
        if stage is StageName.STREAM:
            env["PROMPTPIPE_HTTP_PORT"] = "0"
            env["PROMPTPIPE_STAGE_PORT"] = "0"
        (folder / f"{stage.value}.ports").unlink(missing_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "promptpipe.stage_process"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        run.stages[stage.value] = StageProcess(stage.value, proc.pid, ports[stage], 0, str(log_path))
    run.save()
    return run


# What every stage process gets of the environment `promptpipe up` runs in: what Python, the locale
# and the tools the stages use (OpenTelemetry, gRPC, OpenMP) read. Nothing else: no credential of the
# shell reaches a stage unless the pipeline asks for it by name.
PASSED_TO_EVERY_STAGE = ("PATH", "HOME", "USER", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")
PASSED_BY_PREFIX = ("PROMPTPIPE_", "LC_", "OTEL_", "GRPC_", "OMP_")
# The inference stage calls its backend over HTTP: proxies and CA bundles, as the HTTP clients read them.
PASSED_TO_INFERENCE = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
)


# The gateway's alone: the quota store's URL holds its password.
PASSED_TO_THE_GATEWAY = ("PROMPTPIPE_QUOTA_STORE_URL",)


def stage_environment(stage: StageName, pipeline: PromptPipeline, parent: Mapping[str, str]) -> dict[str, str]:
    """The part of `parent` a stage process needs (the PROMPTPIPE_* settings are added by the caller)."""
    names = set(PASSED_TO_EVERY_STAGE)
    withheld = () if stage is StageName.STREAM else PASSED_TO_THE_GATEWAY
    if topology.runs_inference(pipeline.spec, stage):
        names.update(PASSED_TO_INFERENCE)
        openai = pipeline.spec.model.openai
        if pipeline.spec.model.backend is BackendKind.OPENAI and openai is not None and openai.api_key_env:
            names.add(openai.api_key_env)
    return {k: v for k, v in parent.items() if (k in names or k.startswith(PASSED_BY_PREFIX)) and k not in withheld}


def wait_serving(run: LocalRun, timeout: float) -> None:
    """Wait until every stage's health check says SERVING; fail fast if one died."""
    pending = dict(run.stages)

    def all_serving() -> bool:
        for stage, proc in list(pending.items()):
            if not alive(proc.pid):
                tail = Path(proc.log).read_text(errors="replace")[-2000:]
                raise LocalRunError(f"stage {stage} exited during start-up; its log ends:\n{tail}")
            port_file = Path(run.folder, f"{stage}.ports")
            if not port_file.exists():
                continue
            _, metrics_port, http_port, stage_port = port_file.read_text().split()
            proc.metrics_port, proc.http_port, proc.stage_port = int(metrics_port), int(http_port), int(stage_port)
            # Asked on the internal port: plain gRPC even when the gateway's public port serves TLS.
            if health_status(proc.stats_target, 1.0) == "SERVING":
                del pending[stage]
        return not pending

    try:
        wait_until(all_serving, "every stage to serve", timeout=timeout, every=0.1)
    except TimeoutError:
        raise LocalRunError(f"stages not serving after {timeout:.0f}s: {', '.join(pending)}") from None
    run.save()


def health_status(target: str, timeout: float) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return "UNREACHABLE" if err.code() is grpc.StatusCode.UNAVAILABLE else err.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def stop(run: LocalRun) -> list[str]:
    """SIGTERM each stage in drain order and wait for it; SIGKILL after its drain grace."""
    config = load_runtime_config(Path(run.folder) / "runtime.yaml")
    killed: list[str] = []
    for stage in SHUTDOWN_ORDER:
        proc = run.stages.get(stage.value)
        if proc is None or not alive(proc.pid):
            continue
        os.kill(proc.pid, signal.SIGTERM)
        spec = config.pipeline.spec
        grace = topology.drain_grace(spec, stage)
        if not exits(proc.pid, grace + 5.0):
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(stage.value)
    Path(run.folder, "state.json").unlink(missing_ok=True)
    return killed
