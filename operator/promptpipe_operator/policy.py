"""What the operator refuses to do for a pipeline, whatever the API server accepted: what a pipeline's
author could otherwise reach through the operator's own privileges. Pure functions.

- `spec.model.tgi.image`: operator-run TGI runs as root with the backend's cloud identity, so its image
  must come from a repository the operator's installer allowed (chart value `pipelines.allowedTgiImages`).
- `spec.rollout.analysis.prometheus.url`: the operator queries it from inside the cluster, so it must be
  a Prometheus the installer named (`pipelines.prometheusAddress`, `pipelines.analysisPrometheusUrls`).
- `spec.rag.corpus.path`, `spec.model.llamacpp.modelPath`: read inside the stage's container, so neither
  absolute nor climbing out with `..` (the CRD refuses them too; this judges pipelines stored before).
"""

from __future__ import annotations

from promptpipe import chattemplates
from promptpipe.contract.spec import IN_IMAGE_PATH_MESSAGE, PromptPipeline, in_image_path
from promptpipe_operator.render import managed_tgi
from promptpipe_operator.settings import OperatorSettings


def repository_of(image: str) -> str:
    """`registry/path/name` of an image reference, without its tag or digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def image_allowed(image: str, allowed: list[str]) -> bool:
    """An entry ending in `/` allows every repository under it; any other, that repository alone."""
    repository = repository_of(image)
    return any(repository.startswith(a) if a.endswith("/") else repository == a for a in allowed)


def invalid(pp: PromptPipeline) -> str | None:
    """What the API server's schema cannot judge but is known wrong now (naming the field), or None: a chat
    template that does not parse would fail every request at the assemble stage."""
    source = pp.spec.template.chat_template
    problem = chattemplates.syntax_problem(source) if source else None
    return f"spec.template.chatTemplate: does not parse: {problem}" if problem else None


def refusal(pp: PromptPipeline, settings: OperatorSettings) -> str | None:
    """Why the operator will not run this pipeline as specified (naming the field), or None."""
    tgi = managed_tgi(pp)
    if tgi is not None and not image_allowed(tgi.image, settings.allowed_tgi_images):
        allowed = ", ".join(settings.allowed_tgi_images) or "none"
        return (
            f"spec.model.tgi.image: {repository_of(tgi.image)} is not a repository this operator runs TGI from"
            f" (allowed: {allowed}; chart value pipelines.allowedTgiImages)"
        )
    paths = {
        "spec.rag.corpus.path": pp.spec.rag.corpus.path,
        "spec.model.llamacpp.modelPath": pp.spec.model.llamacpp.model_path,
    }
    for field, path in paths.items():
        if not in_image_path(path):
            return f"{field}: {IN_IMAGE_PATH_MESSAGE}"
    source = pp.spec.rollout.analysis.prometheus
    if source is not None and source.url.rstrip("/") not in settings.analysis_prometheus():
        return (
            f"spec.rollout.analysis.prometheus.url: {source.url} is not a Prometheus this operator queries"
            f" (allowed: {', '.join(settings.analysis_prometheus())}; chart values pipelines.prometheusAddress"
            " and pipelines.analysisPrometheusUrls)"
        )
    return None
