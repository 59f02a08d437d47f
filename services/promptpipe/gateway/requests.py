"""Checking a public GenerateRequest and turning it into a work item: pure functions.

Every problem raises InvalidArgument naming the field as the client spelled it.
"""

from __future__ import annotations

from promptpipe.contract.spec import GenerationDefaults
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.runtime.parameters import resolve_parameters
from promptpipe.v1 import common_pb2, gateway_pb2, stage_pb2

MAX_TEXT_CHARS = 200_000
MAX_MESSAGES = 256
MAX_SESSION_CHARS = 256
MAX_METADATA = 32
CHAT_ROLES = ("user", "assistant")


def _over(total: int, limit: int) -> str:
    return f"{total} characters in all; this pipeline takes at most {limit} (generation.maxPromptCharacters)"


def _check_messages(request: gateway_pb2.GenerateRequest, max_prompt: int) -> list[common_pb2.ChatMessage]:
    if request.prompt and request.messages:
        raise InvalidArgument("prompt", "give either prompt or messages, not both")
    if request.prompt:
        if len(request.prompt) > MAX_TEXT_CHARS:
            raise InvalidArgument("prompt", f"longer than {MAX_TEXT_CHARS} characters")
        if len(request.prompt) > max_prompt:
            raise InvalidArgument("prompt", _over(len(request.prompt), max_prompt))
        return [common_pb2.ChatMessage(role="user", content=request.prompt)]
    if not request.messages:
        raise InvalidArgument("prompt", "either prompt or messages is required")
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"more than {MAX_MESSAGES} messages")
    total = sum(len(m.content) for m in request.messages)
    if total > max_prompt:
        raise InvalidArgument("messages", _over(total, max_prompt))
    for i, m in enumerate(request.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, not {m.role!r}")
        if not m.content.strip():
            raise InvalidArgument(f"messages[{i}].content", "must not be empty")
        if len(m.content) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"messages[{i}].content", f"longer than {MAX_TEXT_CHARS} characters")
    if request.messages[-1].role != "user":
        raise InvalidArgument(f"messages[{len(request.messages) - 1}].role", "the last message must be from the user")
    return list(request.messages)


def work_item(
    request: gateway_pb2.GenerateRequest, defaults: GenerationDefaults, request_id: str
) -> stage_pb2.WorkItem:
    if len(request.session_id) > MAX_SESSION_CHARS:
        raise InvalidArgument("session_id", f"longer than {MAX_SESSION_CHARS} characters")
    if len(request.metadata) > MAX_METADATA:
        raise InvalidArgument("metadata", f"more than {MAX_METADATA} entries")
    for key, value in request.metadata.items():
        if not key or len(key) > 64 or len(value) > 1024:
            raise InvalidArgument(f"metadata[{key!r}]", "keys need 1 to 64 characters, values at most 1024")
    return stage_pb2.WorkItem(
        request_id=request_id,
        # None given: the inference stage routes the call by its prompt's opening (`backends/routing.py`).
        session_id=request.session_id,
        messages=_check_messages(request, defaults.max_prompt_characters),
        parameters=resolve_parameters(request.parameters, defaults),
        metadata=dict(request.metadata),
    )


def own_timings(nested: list[common_pb2.StageTiming], stream: common_pb2.StageTiming) -> list[common_pb2.StageTiming]:
    """Each stage's own share of a call, in pipeline order: its time less the calls it made (their queue
    wait, work and hop), before the first token and in all. The shares add up to the gateway's figures:
    queue + work + hop over all stages is its total, queue + first output + hop first its time to first token.

    The gateway calls rag, assemble and post; post calls inference.
    """
    by_stage = {t.stage: t for t in nested}

    def call(name: str) -> tuple[float, float]:
        """The call to `name` as its caller saw it: in all, and to its first token."""
        t = by_stage.get(name)
        if t is None:
            return 0.0, 0.0
        whole = t.queue_wait_seconds + t.work_seconds + t.hop_seconds
        return whole, t.queue_wait_seconds + t.first_output_seconds + t.hop_first_seconds

    def share(t: common_pb2.StageTiming, called: tuple[float, float]) -> common_pb2.StageTiming:
        return common_pb2.StageTiming(
            stage=t.stage,
            queue_wait_seconds=t.queue_wait_seconds,
            work_seconds=max(0.0, t.work_seconds - called[0]),
            first_output_seconds=max(0.0, t.first_output_seconds - called[1]),
            hop_seconds=t.hop_seconds,
            hop_first_seconds=t.hop_first_seconds,
            failovers=t.failovers,
        )

    out = [share(by_stage[name], (0.0, 0.0)) for name in ("rag", "assemble", "inference") if name in by_stage]
    if "post" in by_stage:
        out.append(share(by_stage["post"], call("inference")))
    before = call("rag")[0] + call("assemble")[0]  # both come before the first token
    post_whole, post_first = call("post")
    out.append(share(stream, (before + post_whole, before + post_first)))
    return out
