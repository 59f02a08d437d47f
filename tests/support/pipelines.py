"""Starting real pipelines (five stage processes) from tests, through `promptpipe up`'s code."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from promptpipe.cli import localrun
from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.contract.identity import StageIdentity, subject
from promptpipe.contract.runtime_config import load_runtime_config
from promptpipe.contract.spec import StageName
from promptpipe.localproc import alive, free_port
from promptpipe.runtime.identity import SignedToken, parse_issuer_keys
from promptpipe.waiting import wait_until


def synthetic_pipeline(name: str = "t", **spec: Any) -> dict[str, Any]:
    """A pipeline on the synthetic backend; `spec` entries are merged over the defaults."""
    doc: dict[str, Any] = {
        "apiVersion": "promptpipe.io/v1alpha1",
        "kind": "PromptPipeline",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "synthetic", "backend": "synthetic", "synthetic": {"tokensPerSecond": 0}},
            "generation": {"maxNewTokens": 16},
            "rag": {"enabled": False},
            "stages": {},
        },
    }
    deep_merge(doc["spec"], spec)
    return doc


def deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def tenant_keys(folder: Path, monkeypatch: Any, *tenants: str) -> dict[str, str]:
    """A new API key for each tenant, in a key file the pipelines started next read (as
    PROMPTPIPE_API_KEYS_FILE): the keys by tenant."""
    keys = {tenant: new_key() for tenant in tenants}
    path = folder / "keys.yaml"
    path.write_text("".join(f"{tenant}: {hash_key(key)}\n" for tenant, key in keys.items()))
    monkeypatch.setenv("PROMPTPIPE_API_KEYS_FILE", str(path))
    monkeypatch.delenv("PROMPTPIPE_API_KEYS", raising=False)
    return keys


@dataclass
class Pod:
    """One more process of a stage (see `RunningPipeline.another`)."""

    proc: subprocess.Popen[bytes]
    target: str
    metrics_port: int

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())


class RunningPipeline:
    def __init__(self, run: localrun.LocalRun) -> None:
        self.run = run

    @property
    def gateway(self) -> str:
        return self.run.gateway

    @property
    def openai_base_url(self) -> str:
        return self.run.openai_base_url

    def target(self, stage: StageName) -> str:
        return f"127.0.0.1:{self.run.stages[stage.value].port}"

    def stats_target(self, stage: StageName) -> str:
        """Where the stage's Stage service answers Stats: the gateway's internal port, else its port."""
        return self.run.stages[stage.value].stats_target

    def run_identity(self) -> StageIdentity:
        """The run's stage identity, as `promptpipe up` set it up (its key, its keys file)."""
        identity = load_runtime_config(Path(self.run.folder) / "runtime.yaml").identity
        assert identity is not None, "promptpipe up sets up stage identity"
        return identity

    def identity_of(self, stage: StageName) -> SignedToken:
        """Tokens of the pipeline's `stage` process, signed with the run's key (what that process sends)."""
        identity = self.run_identity()
        keys = parse_issuer_keys(Path(identity.keys_file).read_text())
        account = subject(identity.namespace, identity.accounts[stage])
        return SignedToken(Path(identity.signing_key_file), keys, identity.audience, account)

    def pid(self, stage: StageName) -> int:
        return self.run.stages[stage.value].pid

    def metrics(self, stage: StageName) -> str:
        url = f"http://127.0.0.1:{self.run.stages[stage.value].metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return str(resp.read().decode())

    def relaunch(self, stage: StageName, **extra_env: str) -> subprocess.Popen[bytes]:
        """The stage again, on its port, as `promptpipe up` started it (as a pod comes back on a cluster), with
        `extra_env` on top."""
        env = {
            **os.environ,
            "PROMPTPIPE_STAGE": stage.value,
            "PROMPTPIPE_CONFIG": str(Path(self.run.folder) / "runtime.yaml"),
            "PROMPTPIPE_PORT": str(self.run.stages[stage.value].port),
            "PROMPTPIPE_METRICS_PORT": "0",
            "PROMPTPIPE_STAGE_PORT": "0",  # the gateway's internal port (unused by the other stages)
            **extra_env,
        }
        args = [sys.executable, "-m", "promptpipe.stage_process"]
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @contextmanager
    def more_gateways(self, n: int, folder: Path, **extra_env: str) -> Iterator[list[tuple[str, str]]]:
        """`n` more gateway processes of this pipeline (as more pods of its gateway), on ports of their own,
        with `extra_env`; yields each one's gRPC address and OpenAI base URL."""
        procs: list[subprocess.Popen[bytes]] = []
        served = []
        try:
            for i in range(n):
                ports = folder / f"gateway-{i}-{uuid.uuid4().hex[:6]}.ports"
                extra = {"PROMPTPIPE_PORT": "0", "PROMPTPIPE_HTTP_PORT": "0", "PROMPTPIPE_PORT_FILE": str(ports)}
                procs.append(self.relaunch(StageName.STREAM, **extra, **extra_env))
                wait_until(ports.exists, f"gateway {i} to serve", 60)
                grpc_port, _, http_port, _ = ports.read_text().split()
                served.append((f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/v1"))
            yield served
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)

    @contextmanager
    def another(self, stage: StageName, folder: Path, **extra_env: str) -> Iterator[Pod]:
        """One more process of `stage` (another pod of it), on ports of its own (or `PROMPTPIPE_PORT`), until
        the block ends."""
        ports = folder / f"{stage.value}-{uuid.uuid4().hex[:6]}.ports"
        proc = self.relaunch(stage, **{"PROMPTPIPE_PORT": "0", "PROMPTPIPE_PORT_FILE": str(ports), **extra_env})
        try:
            wait_until(lambda: ports.exists() or proc.poll() is not None, f"another {stage.value} to serve", 60)
            grpc_port, metrics_port, _, _ = ports.read_text().split()
            target = f"127.0.0.1:{grpc_port}"
            wait_until(lambda: localrun.health_status(target, 1.0) == "SERVING", f"{target} to serve", 60)
            yield Pod(proc, target, int(metrics_port))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

    def with_endpoints(self, folder: Path, **targets: str) -> Path:
        """A copy of the run's config whose stages call `targets` (by stage name) instead, e.g. two pods of
        a stage behind one gRPC target: `ipv4:127.0.0.1:A,127.0.0.1:B`."""
        config = yaml.safe_load((Path(self.run.folder) / "runtime.yaml").read_text())
        config["endpoints"].update(targets)
        path = folder / f"runtime-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def metric(self, stage: StageName, name: str, /, **labels: str) -> float:
        """The value of one sample in the stage's /metrics (a `stage` label too: a fused stage's, in its host's)."""
        for line in self.metrics(stage).splitlines():
            named = line.startswith((name + "{", name + " "))
            if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(f"{name}{labels} not in the metrics of {stage.value}")


@contextmanager
def running_pipeline(doc: dict[str, Any], folder: Path, otel_exporter: str = "") -> Iterator[RunningPipeline]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    run = localrun.start(path, otel_exporter=otel_exporter)
    try:
        localrun.wait_serving(run, timeout=60)
        yield RunningPipeline(run)
    finally:
        localrun.stop(run)
        for proc in run.stages.values():  # never leave a process behind, even on failure
            if alive(proc.pid):
                os.kill(proc.pid, signal.SIGKILL)


@contextmanager
def serving_process(
    args: list[str], probe_url: str, what: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Run a server process until the block ends; wait until `probe_url` answers."""
    proc = subprocess.Popen(
        args,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env} if env else None,
    )

    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it answered")
        urllib.request.urlopen(probe_url, timeout=1).close()
        return True

    try:
        wait_until(answers, f"{what} to answer", timeout, retry_on=(OSError,))
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def tgi_server(
    name: str = "tgi", max_concurrent: int = 128, model: Path | None = None, port: int | None = None
) -> Iterator[str]:
    """A TGI-protocol server in its own process; yields its base URL. With `model` (a folder holding a
    GGUF and a config.json, as the operator hands TGI) it generates with that model; on `port`, or any."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        sys.executable,
        "-m",
        "tests.support.tgi_server",
        "--port",
        str(port),
        "--name",
        name,
        "--max-concurrent",
        str(max_concurrent),
        *(["--model-id", str(model)] if model else []),
    ]
    with serving_process(args, url + "/health", "the TGI test server"):
        yield url


def tgi_stats(url: str) -> dict[str, Any]:
    import json

    with urllib.request.urlopen(url + "/stats", timeout=5) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


@contextmanager
def openai_server() -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server on SmolLM2, in its own process; yields its base URL."""
    from promptpipe.backends.llamacpp import default_model_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(default_model_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--verbose",
        "false",
    ]
    with serving_process(args, url + "/v1/models", "llama.cpp's OpenAI-compatible server"):
        yield url
