"""Pipeline files: the quickstart is valid; every malformed one is refused naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from promptpipe.cli.main import app
from promptpipe.contract.pipeline_file import PipelineFileError, load_pipeline, parse_pipeline
from promptpipe.contract.spec import StageName
from promptpipe_operator import policy

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "deploy" / "examples" / "quickstart.yaml"


def quickstart() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    return doc


def test_every_example_pipeline_is_valid() -> None:
    examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    assert QUICKSTART in examples
    for path in examples:
        assert load_pipeline(path).kind == "PromptPipeline"


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (["spec", "stages", "rag", "queue", "capacity"], -1, "spec.stages.rag.queue.capacity"),
        (["spec", "stages", "post", "queue", "shedPolicy"], "drop-newest", "spec.stages.post.queue.shedPolicy"),
        (
            ["spec", "stages", "inference", "scaling"],
            {"minReplicas": 5, "maxReplicas": 2},
            "spec.stages.inference.scaling",
        ),
        (["spec", "stages", "ranker"], {}, "spec.stages.ranker"),
        (["spec", "model", "backend"], "openai", "spec.model"),
        (["spec", "model", "backend"], "vllm", "spec.model.backend"),
        (["spec", "generation", "temperature"], 3, "spec.generation.temperature"),
        (["spec", "rag", "topK"], "three", "spec.rag.topK"),
        (["metadata", "name"], "Not_A_DNS_Name", "metadata.name"),
        (["apiVersion"], "promptpipe.io/v2", "apiVersion"),
        (["spec", "slo"], {"ttftP95Milliseconds": 0}, "spec.slo.ttftP95Milliseconds"),
        (["spec", "slo"], {"errorRate": 1}, "spec.slo.errorRate"),
        (["spec", "tracing"], {"otlpEndpoint": "jaeger:4317"}, "spec.tracing.otlpEndpoint"),
        (["spec", "tracing"], {"otlpEndpoint": "http://jaeger:4317", "sampleRatio": 1.5}, "spec.tracing.sampleRatio"),
        # The API server's rules, the same in the model: `promptpipe validate` and `up` judge alike.
        (["spec", "stages", "rag", "retries"], {"initialBackoffSeconds": 5}, "spec.stages.rag.retries"),
        (["spec", "generation", "maxNewTokens"], 5000, "spec.generation"),
        (["spec", "rag", "topK"], 0, "spec.rag"),
        (["spec", "generation", "maxNewTokens"], 2048, "spec"),
        (
            ["spec", "model"],
            {"name": "m", "backend": "tgi", "tgi": {"endpoints": ["tgi:8080"]}},
            "spec.model.tgi.endpoints.0",
        ),
        (
            ["spec", "model"],
            {"name": "m", "backend": "tgi", "tgi": {"maxInputTokens": 8, "maxTotalTokens": 8}},
            "spec.model.tgi",
        ),
        (["spec", "stages", "post", "workers"], 0, "spec.stages.post.workers"),
        (["spec", "stages", "inference", "workers"], 2, "spec"),  # the model's message names the field
    ],
)
def test_malformed_pipeline_is_refused_naming_the_field(path: list[str], value: object, field: str) -> None:
    doc = quickstart()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(PipelineFileError) as info:
        parse_pipeline(doc)
    assert str(info.value).startswith(field + ":") or f"\n{field}:" in str(info.value), str(info.value)


def test_missing_model_is_refused() -> None:
    doc = quickstart()
    del doc["spec"]["model"]
    with pytest.raises(PipelineFileError, match=r"^spec\.model: Field required"):
        parse_pipeline(doc)


def test_cli_validate_names_the_field_and_exits_2(tmp_path: Path) -> None:
    doc = copy.deepcopy(quickstart())
    doc["spec"]["stages"]["rag"]["queue"]["capacity"] = -5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", "-f", str(bad)])
    assert result.exit_code == 2
    assert "spec.stages.rag.queue.capacity" in result.output
    good = CliRunner().invoke(app, ["validate", "-f", str(QUICKSTART)])
    assert good.exit_code == 0, good.output


def test_cli_up_refuses_an_invalid_file_without_starting_anything(tmp_path: Path) -> None:
    doc = quickstart()
    doc["spec"]["stages"]["post"]["queue"]["shedPolicy"] = "random"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["up", "-f", str(bad)])
    assert result.exit_code == 2 and "spec.stages.post.queue.shedPolicy" in result.output


def test_a_chat_template_that_does_not_parse_is_refused_by_validate_naming_the_field(tmp_path: Path) -> None:
    doc = quickstart()
    doc["spec"]["template"]["chatTemplate"] = "{% for m in messages %}{{ m.content }}"  # no endfor
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["validate", "-f", str(bad)])
    assert result.exit_code == 2
    assert "spec.template.chatTemplate: does not parse: line 1:" in result.output
    # The operator judges it the same way: the pipeline is refused before any pod runs it.
    assert (policy.invalid(parse_pipeline(doc)) or "").startswith("spec.template.chatTemplate: does not parse: line 1:")
    doc["spec"]["template"]["chatTemplate"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert policy.invalid(parse_pipeline(doc)) is None


def test_a_process_drains_for_the_longest_stage_it_runs_and_knows_whether_it_runs_inference() -> None:
    doc = quickstart()
    doc["spec"]["stages"]["post"] = {"timeoutSeconds": 300}
    doc["spec"]["stages"]["inference"]["drainGraceSeconds"] = 30
    alone = parse_pipeline(copy.deepcopy(doc)).spec
    assert alone.drain_grace(StageName.INFERENCE) == 30 and alone.drain_grace(StageName.POST) == 300
    assert alone.runs_inference(StageName.INFERENCE) and not alone.runs_inference(StageName.STREAM)
    doc["spec"]["fuse"] = ["post"]
    post_in_inference = parse_pipeline(copy.deepcopy(doc)).spec
    assert post_in_inference.drain_grace(StageName.INFERENCE) == 300  # post's calls run in it now
    doc["spec"]["fuse"] = ["rag", "assemble", "post", "inference"]
    whole = parse_pipeline(doc).spec
    assert whole.runs_inference(StageName.STREAM) and whole.drain_grace(StageName.STREAM) == 300


@pytest.mark.parametrize(
    ("stage", "fuse", "backend", "refused"),
    [
        ("post", [], "synthetic", None),
        ("rag", [], "tgi", None),
        ("inference", [], "tgi", None),
        ("stream", [], "synthetic", None),  # its tenants' quotas are its supervisor's, like its queue
        ("stream", ["post"], "tgi", None),  # post runs in inference's process: the gateway hosts nothing
        ("stream", ["rag"], "synthetic", "fused into another's process, or hosting one"),
        ("stream", ["post", "inference"], "synthetic", "fused into another's process, or hosting one"),
        ("inference", [], "llamacpp", "each worker would load the model"),
        ("post", ["post"], "synthetic", "fused into another's process, or hosting one"),
        ("inference", ["post"], "synthetic", "fused into another's process, or hosting one"),
        ("assemble", ["rag", "assemble"], "synthetic", "fused into another's process, or hosting one"),
    ],
)
def test_a_stage_runs_several_workers_only_where_a_shared_queue_is_all_they_share(
    stage: str, fuse: list[str], backend: str, refused: str | None
) -> None:
    doc = quickstart()
    model: dict[str, Any] = {"name": "m", "backend": backend}
    if backend == "tgi":
        model["tgi"] = {"endpoints": ["http://tgi:8080"]}
    doc["spec"]["model"], doc["spec"]["fuse"] = model, fuse
    doc["spec"]["stages"].setdefault(stage, {})["workers"] = 2
    if refused is None:
        assert parse_pipeline(doc).spec.stages.get(StageName(stage)).workers == 2
        return
    with pytest.raises(PipelineFileError) as info:
        parse_pipeline(doc)
    assert f"stages.{stage}.workers: must be 1" in str(info.value) and refused in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("stage", "cpu", "workers", "expected"),
    [
        ("post", None, None, 1),  # no request: one
        ("post", "500m", None, 1),
        ("post", "2", None, 2),
        ("post", "3900m", None, 3),  # whole CPUs
        ("post", 64, None, 32),  # at most MAX_WORKERS
        ("post", "4", 1, 1),  # told
        ("assemble", None, 3, 3),
        ("stream", "4", None, 4),  # the gateway too: its quotas are its supervisor's
        ("inference", "4", None, 1),  # llama.cpp: one process, every core
    ],
)
def test_a_stage_runs_one_worker_per_whole_cpu_it_requests_unless_told(
    stage: str, cpu: object, workers: int | None, expected: int
) -> None:
    doc = quickstart()
    spec = doc["spec"]["stages"].setdefault(stage, {})
    if cpu is not None:
        spec["resources"] = {"requests": {"cpu": cpu}}
    if workers is not None:
        spec["workers"] = workers
    assert parse_pipeline(doc).spec.workers_of(StageName(stage)) == expected
