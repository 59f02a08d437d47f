"""Where each stage of a pipeline runs: which stages share a process (`spec.fuse`), which process the
others call, how long a process drains. Deployment logic, kept out of the schema (`spec.py`); pure functions
of a PipelineSpec that the operator, `promptpipe up` and the stage process all use."""

from __future__ import annotations

from promptpipe.contract.spec import STAGE_ORDER, FusedStage, PipelineSpec, StageName

# The process each fusable stage runs in when fused (post follows inference into the gateway's).
FUSION_HOSTS: dict[StageName, StageName] = {
    StageName.RAG: StageName.STREAM,
    StageName.ASSEMBLE: StageName.STREAM,
    StageName.POST: StageName.INFERENCE,
    StageName.INFERENCE: StageName.STREAM,
}


def host_of(spec: PipelineSpec, stage: StageName) -> StageName:
    """The stage whose process runs `stage`: itself unless it is fused (post fused follows inference)."""
    host = stage
    while host in FUSION_HOSTS and FusedStage(host.value) in spec.fuse:
        host = FUSION_HOSTS[host]
    return host


def processes(spec: PipelineSpec) -> list[StageName]:
    """The stages that run as processes of their own (Deployments on a cluster), in STAGE_ORDER."""
    return [s for s in STAGE_ORDER if host_of(spec, s) is s]


def fused_into(spec: PipelineSpec, host: StageName) -> list[StageName]:
    """The fused stages that run in `host`'s process."""
    return [s for s in STAGE_ORDER if s is not host and host_of(spec, s) is host]


def called_as(spec: PipelineSpec, process: StageName) -> StageName:
    """The stage the other processes call in `process`: post, when post is fused into inference."""
    if process is StageName.INFERENCE and StageName.POST in fused_into(spec, process):
        return StageName.POST
    return process


def runs_inference(spec: PipelineSpec, process: StageName) -> bool:
    """Whether `process` runs the inference stage: its own process, or its host's when fused."""
    return host_of(spec, StageName.INFERENCE) is process


def drain_grace(spec: PipelineSpec, process: StageName) -> float:
    """How long `process` drains: the longest of the stages it runs (its own and those fused into it)."""
    return max(spec.stages.get(s).drain_grace() for s in (process, *fused_into(spec, process)))
