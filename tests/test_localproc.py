"""Local process helpers, and what `promptpipe up` passes its stage processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from promptpipe.cli import localrun
from promptpipe.contract.spec import OpenAISpec, PromptPipeline, StageName
from promptpipe.localproc import free_port
from tests.support.pipelines import synthetic_pipeline


def test_free_ports_are_distinct_and_outside_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(10_000 <= p < low for p in ports)


def test_a_stage_gets_only_the_environment_it_needs() -> None:
    pipeline = PromptPipeline.model_validate(
        synthetic_pipeline(
            model={"backend": "openai", "openai": {"endpoints": ["http://llm:8000"], "apiKeyEnv": "LLM_API_KEY"}}
        )
    )
    parent = {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "HTTPS_PROXY": "http://proxy:3128",
        "LLM_API_KEY": "the-key",
        "AWS_SECRET_ACCESS_KEY": "never",
        "GITHUB_TOKEN": "never",
        "PROMPTPIPE_QUOTA_STORE_URL": "redis://:password@store:6379/0",
    }
    envs = {stage: localrun.stage_environment(stage, pipeline, parent) for stage in StageName}
    assert all("AWS_SECRET_ACCESS_KEY" not in env and "GITHUB_TOKEN" not in env for env in envs.values())
    assert {stage for stage, env in envs.items() if "LLM_API_KEY" in env} == {StageName.INFERENCE}
    assert {stage for stage, env in envs.items() if "HTTPS_PROXY" in env} == {StageName.INFERENCE}
    assert all(env["PATH"] == "/usr/bin" and env["LC_ALL"] == "C.UTF-8" for env in envs.values())
    assert all("OTEL_EXPORTER_OTLP_ENDPOINT" in env for env in envs.values())
    # The quota store's URL (and its password) is the gateway's alone.
    assert {stage for stage, env in envs.items() if "PROMPTPIPE_QUOTA_STORE_URL" in env} == {StageName.STREAM}


@pytest.mark.processes
def test_stage_processes_do_not_inherit_the_shells_credentials(
    start_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-stages")
    p = start_pipeline(synthetic_pipeline())
    for stage in StageName:
        environ = Path(f"/proc/{p.pid(stage)}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"AWS_SECRET_ACCESS_KEY=") for v in environ), stage
        assert any(v.startswith(b"PROMPTPIPE_STAGE=") for v in environ), stage


def test_an_api_key_variable_must_look_like_one() -> None:
    with pytest.raises(ValidationError, match=r"apiKeyEnv|api_key_env"):
        OpenAISpec.model_validate({"endpoints": ["http://llm"], "apiKeyEnv": "AWS_SECRET_ACCESS_KEY"})
    assert OpenAISpec.model_validate({"endpoints": ["http://llm"], "apiKeyEnv": "OPENAI_API_KEY"}).api_key_env
