"""Any OpenAI-compatible server (vLLM, llama.cpp server, SGLang) via the openai SDK.

The prompt is already rendered by the assemble stage, so this uses the plain
completions endpoint, streaming.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator

import openai

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.backends.remote import BackendCallError, RemoteBackend
from promptpipe.contract.spec import OpenAISpec
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.v1.common_pb2 import FINISH_REASON_EOS, FINISH_REASON_LENGTH, FINISH_REASON_STOP

_FINISH = {"length": FINISH_REASON_LENGTH, "stop": FINISH_REASON_EOS}


class OpenAIBackend(RemoteBackend):
    spec: OpenAISpec

    name = "openai"

    def _client(self, endpoint: str, request: GenerationRequest) -> openai.AsyncOpenAI:
        key = os.environ.get(self.spec.api_key_env, "") if self.spec.api_key_env else ""
        timeout = openai.Timeout(
            max(0.001, request.remaining()),
            connect=self.spec.connect_timeout_seconds,
            read=self.spec.read_timeout_seconds,
        )
        # Retries are ours (only before the first token), not the SDK's.
        return openai.AsyncOpenAI(
            base_url=endpoint.rstrip("/") + "/v1", api_key=key or "unused", timeout=timeout, max_retries=0
        )

    async def stream_from(self, endpoint: str, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        produced = 0
        client = self._client(endpoint, request)
        try:
            stream = await client.completions.create(
                model=self.spec.model or "default",
                prompt=request.prompt,
                max_tokens=request.max_new_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stream=True,
            )
            async with stream:
                async for event in stream:
                    if not event.choices:
                        continue
                    choice = event.choices[0]
                    if choice.text:
                        produced += 1
                        yield Piece(choice.text)
                    if choice.finish_reason:
                        yield Outcome(_FINISH.get(choice.finish_reason, FINISH_REASON_STOP), produced)
                        return
        except openai.BadRequestError as err:
            raise InvalidArgument("parameters", f"rejected by the backend: {err.message}") from None
        except openai.RateLimitError as err:
            raise BackendCallError(f"backend overloaded: {err.message}", produced == 0, overloaded=True) from None
        except openai.APITimeoutError:  # the read timeout: no token for that long
            raise BackendCallError("backend stalled: APITimeoutError", produced == 0, reason="stall") from None
        except openai.APIConnectionError as err:
            raise BackendCallError(f"backend error: {type(err).__name__}", produced == 0, reason="reset") from None
        except openai.APIStatusError as err:
            raise BackendCallError(f"backend error: {type(err).__name__}", produced == 0) from None
        finally:
            await client.close()
        raise BackendCallError("backend stream ended without a finish reason", retryable=False, reason="reset")
