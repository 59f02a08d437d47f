"""The knob that moves a part of the latency, named as the pipeline spec spells it, with its value
now when the spec is known."""

from __future__ import annotations

from promptpipe.contract import topology
from promptpipe.contract.spec import BackendKind, PipelineSpec, StageName, StageSpec
from promptpipe.perf.breakdown import NETWORK


def knob(part: str, metric: str, spec: PipelineSpec | None) -> str:
    """What to change to shrink `part` ("<stage> queue", "<stage> work" or the network) of `metric`."""
    if part == NETWORK:
        return (
            "the hops between processes (gRPC, serialization, waiting for a ready replica): give the stages CPU "
            "(`stages.<stage>.resources`), keep them on one node, or check the network between client and gateway"
        )
    stage, kind = part.split(" ", 1)
    if kind == "queue":
        return _queue_knob(stage, spec)
    return _work_knob(stage, metric, spec)


def _now(value: object) -> str:
    return f" (now {value})" if value is not None else ""


def _stage(spec: PipelineSpec | None, stage: str) -> StageSpec | None:
    return getattr(spec.stages, stage) if spec is not None else None


def _queue_knob(stage: str, spec: PipelineSpec | None) -> str:
    s = _stage(spec, stage)
    concurrency = _now(s.queue.concurrency if s else None)
    # A fused stage has the replicas of the process it runs in (`spec.fuse`).
    host = topology.host_of(spec, StageName(stage)).value if spec is not None else stage
    h = _stage(spec, host)
    replicas = _now(h.scaling.max_replicas if h else None)
    if stage == "inference" and spec is not None and spec.model.backend is BackendKind.LLAMACPP:
        # Its generations take turns on the one model a process holds: more slots only move the wait inside.
        return (
            f"the embedded model runs one call at a time per process, so raising `stages.inference.queue.concurrency`"
            f"{concurrency} only moves the wait into it: raise `stages.{host}.scaling.maxReplicas`{replicas} (each "
            "replica loads the model) or serve the model from a batching backend (`model.backend`: tgi, or openai "
            "for vLLM)"
        )
    text = (
        f"raise `stages.{stage}.queue.concurrency`{concurrency} or `stages.{host}.scaling.maxReplicas`{replicas}: "
        "calls wait for a free slot"
    )
    if stage == "inference" and spec is not None and spec.model.tgi is not None:
        text += f", or add TGI replicas (`model.tgi.replicas`{_now(spec.model.tgi.replicas)})"
    return text


def _work_knob(stage: str, metric: str, spec: PipelineSpec | None) -> str:
    if stage == "inference":
        if metric == "tpot":
            return "the backend's decoding: a faster backend or smaller model (`model`), or fewer calls per replica"
        limit = _now(spec.template.max_prompt_tokens if spec else None)
        top_k = _now(spec.rag.top_k if spec else None)
        rag = "" if spec is not None and not spec.rag.enabled else f" or `rag.topK`{top_k}"
        return (
            f"the backend's prefill grows with the prompt: lower `template.maxPromptTokens`{limit}{rag}, "
            "or use a faster backend (`model`)"
        )
    if stage == "rag":
        return (
            f"retrieval: lower `rag.topK`{_now(spec.rag.top_k if spec else None)} or `rag.chunkChars`"
            f"{_now(spec.rag.chunk_chars if spec else None)}, or give the rag stage more CPU"
        )
    if stage == "assemble":
        return "prompt assembly and token counting: a shorter template or `template.maxPromptTokens`, or more CPU"
    if stage == "post":
        return "the streaming filters (`post.blocklist`, `post.redact`, `post.stopSequences`), or more CPU for post"
    return "the gateway's own work (keys, quotas, relaying tokens): more CPU or `stages.stream.scaling.maxReplicas`"
