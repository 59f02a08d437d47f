"""A real Prometheus (Debian's build, fetched by `make setup`) on loopback, scraping given targets."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import yaml

from promptpipe.contract.spec import ShedPolicy
from promptpipe.localproc import free_port
from promptpipe.runtime.admission import AdmissionQueue
from promptpipe.runtime.metrics import GatewayMetrics, StageMetrics
from promptpipe.waiting import wait_until
from tests.devcluster.build import Tools
from tests.support.pipelines import serving_process

SCRAPE_SECONDS = 1


@contextmanager
def prometheus(tools: Tools, folder: Path, targets: dict[str, dict[str, str]]) -> Iterator[str]:
    """Yields Prometheus' URL. `targets`: host:port → labels added to its series (as a ServiceMonitor adds
    `namespace`)."""
    if not tools.prometheus.exists():  # a failure, not a skip: these tests are part of the suite
        raise FileNotFoundError(f"{tools.prometheus} not fetched; run `make setup`")
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [
            {
                "job_name": "gateway",
                "static_configs": [{"targets": [target], "labels": labels} for target, labels in targets.items()],
            }
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    args = [
        str(tools.prometheus),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with serving_process(args, f"http://127.0.0.1:{port}/-/ready", "prometheus"):
        yield f"http://127.0.0.1:{port}"


def query(url: str, promql: str) -> list[dict[str, Any]]:
    target = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(target, timeout=5) as response:
        data = json.loads(response.read())
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def scraped(url: str, target: str) -> None:
    """Wait for one more successful scrape of `target` than there had been."""

    def last() -> str:
        with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as response:
            active = json.loads(response.read())["data"]["activeTargets"]
        found = [t for t in active if t["labels"].get("instance") == target and t["health"] == "up"]
        return str(found[0]["lastScrape"]) if found else ""

    before = last()
    wait_until(lambda: (now := last()) and now != before, f"Prometheus to scrape {target}", 20, every=0.1)


@dataclass
class GatewayExposition:
    """A gateway's metrics, as the real stream stage registers them, served on loopback."""

    stream: StageMetrics
    gateway: GatewayMetrics
    target: str  # host:port

    def calls(self, codes: dict[str, int], ttft_seconds: float) -> None:
        for code, count in codes.items():
            for _ in range(count):
                self.stream.observe_call(code, ttft_seconds + 0.1)
                self.gateway.first_token(ttft_seconds)


@contextmanager
def gateway_exposition(pipeline: str) -> Iterator[GatewayExposition]:
    registry = prometheus_client.CollectorRegistry()
    queue = AdmissionQueue(capacity=8, concurrency=4, policy=ShedPolicy.REJECT_NEW, retry_after=1.0)
    exposition = GatewayExposition(
        StageMetrics(registry, pipeline, "stream", queue),
        GatewayMetrics(registry, pipeline),
        f"127.0.0.1:{free_port()}",
    )
    server, thread = prometheus_client.start_http_server(
        int(exposition.target.rsplit(":", 1)[1]), addr="127.0.0.1", registry=registry
    )
    try:
        yield exposition
    finally:
        server.shutdown()
        thread.join()
