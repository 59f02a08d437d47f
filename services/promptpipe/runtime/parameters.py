"""A call's generation parameters against the pipeline's limits: checked where a call enters (the gateway)
and again where it is carried out (the inference stage, which any caller that reaches its port can call)."""

from __future__ import annotations

import math

from promptpipe.contract.spec import MAX_STOP_CHARS, GenerationDefaults
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.v1 import common_pb2

MAX_STOPS = 8


def resolve_parameters(p: common_pb2.GenerationParameters, d: GenerationDefaults) -> common_pb2.GenerationParameters:
    """A call's generation parameters, each within the pipeline's limits (InvalidArgument naming the one
    that is not), with the pipeline's defaults for those unset."""
    if p.max_new_tokens > d.max_new_tokens_limit:
        raise InvalidArgument("parameters.max_new_tokens", f"must be at most {d.max_new_tokens_limit}")
    temperature = p.temperature if p.HasField("temperature") else d.temperature
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise InvalidArgument("parameters.temperature", "must be between 0 and 2")
    top_p = p.top_p if p.HasField("top_p") else d.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidArgument("parameters.top_p", "must be greater than 0 and at most 1")
    if p.top_k > 1000:
        raise InvalidArgument("parameters.top_k", "must be at most 1000")
    if len(p.stop) > MAX_STOPS:
        raise InvalidArgument("parameters.stop", f"at most {MAX_STOPS} stop sequences")
    for i, s in enumerate(p.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"parameters.stop[{i}]", f"must have 1 to {MAX_STOP_CHARS} characters")
    resolved = common_pb2.GenerationParameters(
        max_new_tokens=p.max_new_tokens or d.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=p.top_k or d.top_k,
        stop=list(p.stop),
    )
    if p.HasField("seed"):
        resolved.seed = p.seed
    return resolved
