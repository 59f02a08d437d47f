"""API keys on a running gateway, gRPC and HTTP alike, with the real clients; rotated without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from promptpipe.client import GenerationError, PipelineClient
from promptpipe.contract.apikeys import hash_key, new_key
from promptpipe.contract.spec import StageName
from promptpipe.waiting import wait_until
from tests.support.pipelines import RunningPipeline, synthetic_pipeline

pytestmark = pytest.mark.processes

HELLO = [{"role": "user", "content": "hello there"}]


def write(path: Path, text: str) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)  # as a Secret volume swaps its files


async def grpc_answer(p: RunningPipeline, key: str | None) -> str:
    async with PipelineClient(p.gateway, key) as client:
        text = ""
        async for r in client.generate("hello there", timeout=10):
            text += r.chunk.text
        return text


def http_status(url: str, key: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def keys_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    key = new_key()
    path = tmp_path / "keys.yaml"
    write(path, f"team-a: {hash_key(key)}\n")
    monkeypatch.setenv("PROMPTPIPE_API_KEYS_FILE", str(path))
    return path, key


def test_grpc_calls_need_a_valid_key_in_their_metadata(start_pipeline, keys_file) -> None:
    _, key = keys_file
    p = start_pipeline(synthetic_pipeline())
    assert asyncio.run(grpc_answer(p, key)).strip()
    for wrong, words in [(None, "an API key is required"), ("pp-not-a-key", "the API key is not valid")]:
        with pytest.raises(GenerationError) as err:
            asyncio.run(grpc_answer(p, wrong))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and words in err.value.message
    # Refused before admission: only the call with the key took a work slot.
    assert p.metric(StageName.STREAM, "promptpipe_stage_queue_wait_seconds_count") == 1


def test_http_calls_need_a_valid_bearer_key_and_health_stays_open(start_pipeline, keys_file) -> None:
    _, key = keys_file
    p = start_pipeline(synthetic_pipeline())
    good = openai.OpenAI(base_url=p.openai_base_url, api_key=key, max_retries=0)
    answer = good.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    bad = openai.OpenAI(base_url=p.openai_base_url, api_key="pp-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="synthetic", messages=HELLO)  # type: ignore[arg-type]
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert http_status(p.openai_base_url + "/models") == 401
    assert http_status(p.openai_base_url + "/models", key) == 200
    base = p.openai_base_url.removesuffix("/v1")
    assert http_status(base + "/health") == 200
    assert http_status(base + "/metrics") == 404, "the metrics (tenants' names among them) are not on the public port"


def test_rewriting_the_key_file_rotates_the_keys_without_a_restart(start_pipeline, keys_file) -> None:
    path, old = keys_file
    p = start_pipeline(synthetic_pipeline())
    pid = p.pid(StageName.STREAM)
    new = new_key()
    write(path, f"team-a: [{hash_key(new)}]\n")

    def rotated() -> bool:
        try:
            asyncio.run(grpc_answer(p, old))
        except GenerationError as err:
            return err.code == grpc.StatusCode.UNAUTHENTICATED
        return False

    wait_until(rotated, "the old key to be refused", 10)
    assert asyncio.run(grpc_answer(p, new)).strip()
    client = openai.OpenAI(base_url=p.openai_base_url, api_key=new, max_retries=0)
    assert client.models.list().data[0].id == "synthetic"
    assert p.pid(StageName.STREAM) == pid


def test_with_no_keys_the_gateway_is_open_and_its_log_says_so(start_pipeline, monkeypatch) -> None:
    monkeypatch.delenv("PROMPTPIPE_API_KEYS_FILE", raising=False)
    monkeypatch.delenv("PROMPTPIPE_API_KEYS", raising=False)
    p = start_pipeline(synthetic_pipeline())
    assert asyncio.run(grpc_answer(p, None)).strip()
    log = Path(p.run.stages[StageName.STREAM.value].log).read_text()
    assert "no API keys configured: the gateway is open to anyone who reaches it" in log
    assert json.loads(urllib.request.urlopen(p.openai_base_url + "/models", timeout=5).read())["data"]
