"""inference: streams tokens from the configured backend."""

from __future__ import annotations

from collections.abc import AsyncIterator

from promptpipe.backends.base import Backend, GenerationRequest, Outcome, Piece
from promptpipe.backends.routing import routing_key
from promptpipe.contract.spec import BatchingSpec, GenerationDefaults
from promptpipe.runtime.coalesce import coalesce
from promptpipe.runtime.errors import DataLoss, InvalidArgument
from promptpipe.runtime.metrics import BackendMetrics
from promptpipe.runtime.parameters import resolve_parameters
from promptpipe.runtime.stage import Call
from promptpipe.v1 import common_pb2, stage_pb2

# The most characters one token of any model's vocabulary is taken to cover, for a bound on a prompt's
# tokens without its tokenizer: a prompt longer than its token budget times this cannot fit.
MAX_CHARS_PER_TOKEN = 32


def checked(item: stage_pb2.WorkItem, generation: GenerationDefaults, max_prompt_tokens: int) -> stage_pb2.WorkItem:
    """The item as the backend gets it, if it asks nothing past the pipeline's limits, whoever sent it: the
    gateway checks the same, but any pod in the namespace (or process on the machine) that reaches this
    port is a caller too. Unset parameters get the pipeline's defaults, as at the gateway."""
    parameters = resolve_parameters(item.parameters, generation)
    if not item.prompt:
        raise InvalidArgument("prompt", "the rendered prompt is empty")
    if item.prompt_tokens > max_prompt_tokens or len(item.prompt) > max_prompt_tokens * MAX_CHARS_PER_TOKEN:
        raise InvalidArgument("prompt", f"longer than the pipeline's budget of {max_prompt_tokens} tokens")
    # A call carried on after a failure: no more than it could have received before it.
    owed = parameters.max_new_tokens
    if item.resume.tokens > owed:
        raise InvalidArgument("resume.tokens", f"more than the call's max_new_tokens ({owed})")
    if len(item.resume.text) > max(item.resume.tokens, 1) * MAX_CHARS_PER_TOKEN:
        raise InvalidArgument("resume.text", f"longer than {item.resume.tokens} tokens can be")
    resolved = stage_pb2.WorkItem()
    resolved.CopyFrom(item)
    resolved.parameters.CopyFrom(parameters)
    return resolved


def seam(resume: str) -> tuple[str, str]:
    """Where a call carried on after `resume` continues from (pure): the text, less the whitespace it ends
    with, and that whitespace. post sends text up to the word it still holds (it could grow into an address),
    so a resumed text often ends in the space that begins the next token; a prompt ending in it leads a model
    whose tokens carry their leading space elsewhere. The model writes it again; the caller has it already."""
    text = resume.rstrip()
    return text, resume[len(text) :]


def without_seam(pieces: AsyncIterator[Piece | Outcome], had: str) -> AsyncIterator[Piece | Outcome]:
    """`pieces` less the whitespace `had` at their start, which the caller already has (see `seam`), and
    less the token that writes it again, which the caller counted when it got that whitespace (the budget
    asked for holds one more for it: `generation_request`); where the model does not write it again, as
    they come."""

    async def stream() -> AsyncIterator[Piece | Outcome]:
        owed, rewritten = had, False
        async for out in pieces:
            sent = out
            if owed and isinstance(out, Piece):
                if out.text.startswith(owed):
                    sent, owed, rewritten = Piece(out.text[len(owed) :], 0), "", True
                elif owed.startswith(out.text):
                    sent, owed = Piece("", 0), owed[len(out.text) :]
                else:
                    owed = ""
            elif isinstance(out, Outcome) and rewritten:
                sent = Outcome(out.finish_reason, out.completion_tokens - 1, out.failovers)
            yield sent

    return stream()


def generation_request(item: stage_pb2.WorkItem, call: Call) -> GenerationRequest:
    p = item.parameters  # the gateway has filled in every default, and checked() the limits
    text, space = seam(item.resume.text)
    first_user = next((m.content for m in item.messages if m.role == "user"), "")
    return GenerationRequest(
        # Carried on after a failure (`resume`): from the text the caller has, for the tokens left.
        prompt=item.prompt + text,
        # The token that writes the seam's whitespace again is one the caller already counted.
        max_new_tokens=p.max_new_tokens - item.resume.tokens + bool(space and item.resume.tokens),
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        session_id=item.session_id,
        deadline=call.deadline,
        request_id=item.request_id,
        routing_key=routing_key(item.session_id, item.prompt, first_user),
    )


class InferenceHandler:
    def __init__(
        self,
        backend: Backend,
        metrics: BackendMetrics,
        generation: GenerationDefaults,
        max_prompt_tokens: int,
        batching: BatchingSpec | None = None,
    ) -> None:
        self.backend = backend
        self._metrics = metrics
        self._generation = generation
        self._max_prompt_tokens = max_prompt_tokens
        self._batching = batching or BatchingSpec()

    async def start(self) -> None:
        await self.backend.start()

    async def close(self) -> None:
        await self.backend.close()

    def healthy(self) -> bool:
        return self.backend.available()

    def run(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]:
        b = self._batching
        return coalesce(self._events(item, call), interval=b.interval_milliseconds / 1000, max_tokens=b.max_tokens)

    async def _events(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]:
        item = checked(item, self._generation, self._max_prompt_tokens)
        had = item.resume.tokens
        if had and had == item.parameters.max_new_tokens:  # every token had arrived; only the final had not
            usage = common_pb2.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=had)
            yield stage_pb2.StageEvent(
                final=stage_pb2.StageFinal(finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage)
            )
            return
        generation = self.backend.generate(generation_request(item, call))
        space = seam(item.resume.text)[1] if item.resume.tokens else ""
        pieces = without_seam(generation, space) if space else generation
        finished = failed = False
        self._metrics.active.inc()
        try:
            async for out in pieces:
                if isinstance(out, Piece):
                    self._metrics.tokens.inc(out.tokens)
                    yield stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text=out.text, token_count=out.tokens))
                else:
                    finished = True
                    call.failovers = out.failovers
                    usage = common_pb2.Usage(
                        prompt_tokens=item.prompt_tokens, completion_tokens=had + out.completion_tokens
                    )
                    yield stage_pb2.StageEvent(final=stage_pb2.StageFinal(finish_reason=out.finish_reason, usage=usage))
            if not finished:
                raise DataLoss("the backend ended the generation without its final result")
        except Exception:
            failed = True
            raise
        finally:
            # Counted before the await: a cancel landing on it would skip whatever follows.
            self._metrics.active.dec()
            if not finished and not failed:  # the caller left or its deadline passed
                self._metrics.cancelled.inc()
            await generation.aclose()  # stops the backend when we leave early
