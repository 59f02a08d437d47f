"""TGI through Hugging Face's `text-generation` AsyncClient.

Two TGI facts shape this: the client's timeout is aiohttp's *total* timeout, so it
would cut any stream longer than 10 s (we set it per request from the deadline,
with a separate read timeout); and TGI reports errors that happen mid-stream as an
SSE `error` event under HTTP 200, which the client raises as typed errors.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import aiohttp
from text_generation import AsyncClient
from text_generation import errors as tgi_errors

from promptpipe.backends.base import GenerationRequest, Outcome, Piece
from promptpipe.backends.remote import BackendCallError, RemoteBackend
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.v1.common_pb2 import FINISH_REASON_EOS, FINISH_REASON_LENGTH, FINISH_REASON_STOP

_FINISH = {"length": FINISH_REASON_LENGTH, "eos_token": FINISH_REASON_EOS, "stop_sequence": FINISH_REASON_STOP}


class TgiBackend(RemoteBackend):
    name = "tgi"

    async def stream_from(self, endpoint: str, request: GenerationRequest) -> AsyncGenerator[Piece | Outcome, None]:
        client = AsyncClient(endpoint.rstrip("/"))
        client.timeout = aiohttp.ClientTimeout(
            total=max(0.001, request.remaining()),
            sock_connect=self.spec.connect_timeout_seconds,
            sock_read=self.spec.read_timeout_seconds,
        )
        sampling = request.temperature > 0
        produced = 0
        try:
            async for response in client.generate_stream(
                request.prompt,
                do_sample=sampling,
                max_new_tokens=request.max_new_tokens,
                temperature=request.temperature if sampling else None,
                top_p=request.top_p if sampling and request.top_p < 1 else None,
                top_k=request.top_k if sampling and request.top_k > 0 else None,
                seed=request.seed,
            ):
                if not response.token.special:
                    produced += 1
                    yield Piece(response.token.text)
                if response.details is not None:
                    reason = _FINISH.get(response.details.finish_reason.value, FINISH_REASON_EOS)
                    yield Outcome(reason, response.details.generated_tokens)
                    return
        except tgi_errors.ValidationError as err:
            raise InvalidArgument("parameters", f"rejected by the backend: {err}") from None
        except (tgi_errors.OverloadedError, tgi_errors.RateLimitExceededError) as err:
            raise BackendCallError(f"backend overloaded: {err}", retryable=produced == 0, overloaded=True) from None
        except (
            tgi_errors.GenerationError,
            tgi_errors.IncompleteGenerationError,
            tgi_errors.UnknownError,
            tgi_errors.ShardNotReadyError,
            tgi_errors.ShardTimeoutError,
            tgi_errors.BadRequestError,
            tgi_errors.NotFoundError,
        ) as err:
            raise BackendCallError(f"backend error: {type(err).__name__}", retryable=produced == 0) from None
        except TimeoutError as err:  # first: aiohttp's read timeout (ServerTimeoutError) is a ClientError too
            raise BackendCallError(
                f"backend stalled: {type(err).__name__}", retryable=produced == 0, reason="stall"
            ) from None
        except aiohttp.ClientError as err:
            raise BackendCallError(
                f"backend unreachable: {type(err).__name__}", retryable=produced == 0, reason="reset"
            ) from None
        raise BackendCallError("backend stream ended without its final details", retryable=False, reason="reset")
