"""Inference backends, chosen by `spec.model.backend`."""

from __future__ import annotations

from promptpipe.backends.base import Backend
from promptpipe.contract.spec import (
    TGI_WITHOUT_ENDPOINTS,
    BackendKind,
    FailoverSpec,
    ModelSpec,
    RetrySpec,
    TgiSpec,
)
from promptpipe.runtime.metrics import BackendMetrics


def build_backend(
    model: ModelSpec, retry: RetrySpec, metrics: BackendMetrics, failover: FailoverSpec | None = None
) -> Backend:
    # Imports are local so a stage only loads the client library it uses.
    if model.backend is BackendKind.LLAMACPP:
        from promptpipe.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(model.llamacpp, metrics)
    if model.backend is BackendKind.SYNTHETIC:
        from promptpipe.backends.synthetic import SyntheticBackend

        return SyntheticBackend(model.synthetic)
    if model.backend is BackendKind.TGI:
        from promptpipe.backends.tgi import TgiBackend

        tgi = model.tgi or TgiSpec()
        if not tgi.endpoints:
            raise ValueError(TGI_WITHOUT_ENDPOINTS)
        return TgiBackend(
            tgi, breaker=model.circuit_breaker, retry=retry, metrics=metrics, routing=model.routing, failover=failover
        )
    from promptpipe.backends.openai import OpenAIBackend

    if model.openai is None:  # the spec's validator refuses this; said again for the type checker
        raise ValueError("backend 'openai' needs spec.model.openai.endpoints")
    return OpenAIBackend(
        model.openai,
        breaker=model.circuit_breaker,
        retry=retry,
        metrics=metrics,
        routing=model.routing,
        failover=failover,
    )
