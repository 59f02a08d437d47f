"""Reading a PromptPipeline document (a file for `promptpipe up`, a body from the API server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from promptpipe.contract.spec import PromptPipeline


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
