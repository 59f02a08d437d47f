"""Pipeline files: the quickstart is valid; every malformed one is refused naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from promptpipe.cli.main import app
from promptpipe.contract import topology
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
    assert topology.drain_grace(alone, StageName.INFERENCE) == 30 and topology.drain_grace(alone, StageName.POST) == 300
    assert topology.runs_inference(alone, StageName.INFERENCE) and not topology.runs_inference(alone, StageName.STREAM)
    doc["spec"]["fuse"] = ["post"]
    post_in_inference = parse_pipeline(copy.deepcopy(doc)).spec
    assert topology.drain_grace(post_in_inference, StageName.INFERENCE) == 300  # post's calls run in it now
    doc["spec"]["fuse"] = ["rag", "assemble", "post", "inference"]
    whole = parse_pipeline(doc).spec
    assert topology.runs_inference(whole, StageName.STREAM) and topology.drain_grace(whole, StageName.STREAM) == 300


@pytest.mark.parametrize("stage", ["stream", "rag", "assemble", "inference", "post"])
@pytest.mark.parametrize("workers", [1, 4])
def test_workers_were_removed_and_a_file_that_sets_them_is_refused_saying_what_to_do(stage: str, workers: int) -> None:
    doc = quickstart()
    doc["spec"]["stages"].setdefault(stage, {})["workers"] = workers
    with pytest.raises(PipelineFileError) as info:
        parse_pipeline(doc)
    message = str(info.value)
    assert f"spec.stages.{stage}.workers" in message, message
    assert "removed in 0.2.0" in message and "scale a stage with replicas" in message, message
