"""Reading pipeline files and the runtime config the stage processes share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from promptpipe.config.spec import PromptPipeline, StageName


class PipelineFileError(ValueError):
    """A pipeline document is invalid; the message names each bad field."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(document)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {msg}")
    return "\n".join(lines)


def parse_pipeline(document: Any) -> PromptPipeline:
    if not isinstance(document, dict):
        raise PipelineFileError("(document): expected a PromptPipeline mapping")
    try:
        return PromptPipeline.model_validate(document)
    except ValidationError as err:
        raise PipelineFileError(format_validation_error(err)) from None


def load_pipeline(path: Path) -> PromptPipeline:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PipelineFileError(f"{path}: {err.strerror}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise PipelineFileError(f"{path}: not valid YAML: {err}") from None
    if len(docs) != 1:
        raise PipelineFileError(f"{path}: expected one PromptPipeline document, found {len(docs)}")
    return parse_pipeline(docs[0])


class RuntimeConfig(BaseModel):
    """What every stage process reads: the pipeline and where the other stages are.

    Locally `promptpipe up` writes it; in a cluster the operator renders it into
    a ConfigMap with Service DNS names as endpoints.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    pipeline: PromptPipeline
    endpoints: dict[StageName, str]
    # Relative paths in the spec (the rag corpus) resolve against this folder.
    base_dir: str = "."

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def dump_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def load_runtime_config(path: Path) -> RuntimeConfig:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return RuntimeConfig.model_validate(data)
    except ValidationError as err:
        raise PipelineFileError(format_validation_error(err)) from None
