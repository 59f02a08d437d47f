"""The runtime config file every stage process reads: the pipeline and where the other stages are."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from promptpipe.contract.identity import StageIdentity
from promptpipe.contract.pipeline_file import PipelineFileError, format_validation_error
from promptpipe.contract.spec import PromptPipeline, StageName


class BackendPods(BaseModel):
    """Where the inference stage finds the backend's replicas: the ready pods behind this Service, from its
    EndpointSlices (the TGI the operator runs; see `promptpipe.backends.discovery`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    service: str
    namespace: str
    port: str = "http"  # the Service port's name
    scheme: str = "http"


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
    # The operator's TGI: its pods are the replicas, found as they come and go (the endpoint, its Service,
    # serves until they are known).
    backend_pods: BackendPods | None = None
    # How the processes prove who calls whom (`promptpipe.contract.identity`); without it they take calls
    # from anyone (a stage started by hand), and say so at start.
    identity: StageIdentity | None = None

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
