"""post: stop sequences, PII redaction and the blocklist over the token stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from promptpipe.contract.spec import PostSpec
from promptpipe.runtime.calls import NextStage
from promptpipe.runtime.coalesce import coalesce
from promptpipe.runtime.errors import DataLoss, StageError
from promptpipe.runtime.stage import Call
from promptpipe.textfilters.rules import Action, build_rules, stop_rules
from promptpipe.textfilters.streaming import StreamingFilter
from promptpipe.v1 import common_pb2, stage_pb2

_ENDED_BY = {Action.STOP: common_pb2.FINISH_REASON_STOP, Action.REFUSE: common_pb2.FINISH_REASON_CONTENT_FILTER}


class PostHandler:
    def __init__(self, spec: PostSpec, inference: NextStage) -> None:
        self._rules = build_rules(spec)
        self._inference = inference

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._inference.close()

    def run(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]:
        return coalesce(self._filtered(item, call))

    async def _filtered(self, item: stage_pb2.WorkItem, call: Call) -> AsyncIterator[stage_pb2.StageEvent]:
        rules = stop_rules(item.parameters.stop) + self._rules if item.parameters.stop else self._rules
        text_filter = StreamingFilter(rules)
        upstream = self._inference.run(item, call.deadline)
        unsent_tokens = 0  # tokens whose text is still held back by the filter
        received = 0

        def chunk(text: str) -> stage_pb2.StageEvent:
            nonlocal unsent_tokens
            event = stage_pb2.StageEvent(chunk=common_pb2.TokenChunk(text=text, token_count=unsent_tokens))
            unsent_tokens = 0
            return event

        try:
            async for event in upstream:
                if event.HasField("chunk"):
                    received += event.chunk.token_count
                    unsent_tokens += event.chunk.token_count
                    out = text_filter.feed(event.chunk.text)
                elif event.HasField("final"):
                    out = text_filter.finish()
                else:
                    continue
                if out.text:
                    yield chunk(out.text)
                if out.ended_by is not None:
                    # Returning cancels the inference call, and with it the generation.
                    usage = common_pb2.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=received)
                    final = stage_pb2.StageFinal(finish_reason=_ENDED_BY[out.ended_by], usage=usage)
                    yield stage_pb2.StageEvent(final=final)
                    return
                if event.HasField("final"):
                    yield event
                    return
            raise DataLoss("the inference stage ended its stream without a final event")
        except StageError:
            # The stream broke: send what is safe of what was held back, then the status.
            out = text_filter.abandon()
            if out.text:
                yield chunk(out.text)
            raise
        finally:
            await upstream.aclose()
