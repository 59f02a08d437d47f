"""moto's standalone server on loopback: S3 and DynamoDB over HTTP, as boto3 sees AWS."""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from promptpipe.localproc import free_port
from promptpipe.registry.settings import RegistrySettings
from promptpipe.registry.store import Registry
from tests.support.pipelines import serving_process

# moto accepts any key unless authentication is switched on; these are its documented test values.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def moto_command(host: str, port: int) -> list[str]:
    """moto's server, with DynamoDB transactions isolated as AWS has them (see moto_serial)."""
    # -P: the script's folder holds moto.py, which must not hide the moto package.
    return [sys.executable, "-P", str(Path(__file__).with_name("moto_serial.py")), host, str(port)]


@contextmanager
def moto_server(require_auth: bool = False) -> Iterator[str]:
    """Yields the endpoint URL. With `require_auth`, every request must carry a key moto's IAM knows."""
    port = free_port()
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if require_auth else None
    with serving_process(
        moto_command("127.0.0.1", port), f"http://127.0.0.1:{port}/moto-api/data.json", "moto server", env=env
    ):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return CREDENTIALS


@pytest.fixture
def registry_settings(moto_endpoint: str, aws_env: dict[str, str]) -> RegistrySettings:
    """A bucket and table of this test's own (not created yet)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    return RegistrySettings(
        bucket=name,
        table=name,
        endpoint_url=moto_endpoint,
        region="us-east-1",
        multipart_threshold_mb=5,
        part_size_mb=5,
    )


@pytest.fixture
def registry(registry_settings: RegistrySettings) -> Registry:
    reg = Registry(registry_settings)
    reg.init()
    return reg


def registry_env(settings: RegistrySettings) -> dict[str, str]:
    """The environment that points the `promptpipe` command (or a pod) at `settings`' registry."""
    return {
        **CREDENTIALS,
        "PROMPTPIPE_REGISTRY_BUCKET": settings.bucket,
        "PROMPTPIPE_REGISTRY_TABLE": settings.table,
        "PROMPTPIPE_REGISTRY_ENDPOINT_URL": str(settings.endpoint_url),
        "PROMPTPIPE_REGISTRY_REGION": "us-east-1",
    }


def registry_env_through(settings: RegistrySettings, proxy_address: str) -> dict[str, str]:
    """`registry_env`, reaching the registry through a fault proxy, with the timeouts the chart gives the
    operator made short: a stalled registry is given up on within seconds."""
    return {
        **registry_env(settings),
        "PROMPTPIPE_REGISTRY_ENDPOINT_URL": f"http://{proxy_address}",
        "PROMPTPIPE_REGISTRY_READ_TIMEOUT_SECONDS": "1",
        "PROMPTPIPE_REGISTRY_MAX_ATTEMPTS": "2",
    }


def make_model(folder: Path, seed: str = "a", big_mib: int = 0) -> Path:
    """A model-shaped folder: config, tokenizer, weights (optionally big enough for multipart)."""
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "hidden": 64}))
    (folder / "tokenizer" / "tokenizer.json").write_text(f'{{"vocab": "{seed}"}}')
    (folder / "tokenizer" / "special_tokens.json").write_text('{"eos": "</s>"}')  # same in every version
    weights = hashlib.sha256(seed.encode()).digest() * (1024 * 32)  # 1 MiB, content depends on seed
    (folder / "model.safetensors").write_bytes(weights * max(big_mib, 1))
    return folder
