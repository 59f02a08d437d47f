"""Operator settings, from the environment (PROMPTPIPE_OPERATOR_*)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from promptpipe import __version__


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PROMPTPIPE_OPERATOR_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    stage_image: str = f"ghcr.io/promptpipe/stage:{__version__}"
    """Image every stage Deployment runs (`promptpipe-stage`)."""
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    """Where KEDA's prometheus scaler reads the stages' load."""
    load_window: Annotated[str, Field(pattern=r"^[1-9][0-9]*(s|m|h)$")] = "1m"
    """The window a stage's load is averaged over (a Prometheus duration holding two scrapes or more): a stage
    with calls in it is never scaled to zero."""
    scrape_namespaces: Annotated[list[str], NoDecode] = ["monitoring"]
    """Namespaces whose pods may read the pipelines' metrics ports (Prometheus; comma-separated), besides the
    operator's own (`lease_namespace`): the pipelines' NetworkPolicies allow them."""
    image_pull_policy: str = "IfNotPresent"
    registry_secret: str = ""
    """A Secret (in the pipeline's namespace) with AWS keys for the model download; empty: the pod's identity."""
    backend_service_account: str = ""
    """ServiceAccount of the operator-run TGI pods (e.g. bound to an IAM role); empty: the namespace's default."""
    alias_poll_seconds: float = 10.0
    """How often a pipeline following a registry alias checks where it points."""
    backend_url_template: str = "http://{service}.{namespace}.svc:{port}"
    """How the operator reaches a backend color for its smoke test."""
    allowed_tgi_images: Annotated[list[str], NoDecode] = ["ghcr.io/huggingface/text-generation-inference"]
    """Image repositories operator-run TGI may come from (comma-separated); an entry ending in `/` allows
    every repository under it."""
    analysis_prometheus_urls: Annotated[list[str], NoDecode] = []
    """Prometheus servers a pipeline's rollout analysis may query (comma-separated), besides
    `prometheus_address`."""

    namespaces: Annotated[list[str], NoDecode] = []
    """Namespaces to watch (comma-separated); empty: all of them."""
    resync_seconds: float = 30.0
    """Every pipeline is reconciled at least this often, whatever the events say."""
    apply_concurrency: int = 4
    """Children applied at once in a reconcile (1: one after another)."""
    api_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """Each call to the API server: the most seconds to connect, and to wait for its answer. A connection
    that stalls fails the call, not the reconcile thread for ever."""
    reconcile_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    """The most one pipeline's reconcile may take; past it, it counts as failed and the liveness probe
    fails while it still runs (a thread cannot be killed: the pod restarts)."""
    metrics_port: int = 8080
    """Prometheus metrics of the operator itself; 0: off."""
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    """kopf's liveness probe, while this replica runs kopf; empty: off."""
    log_format: Literal["json", "plain"] = "json"
    """The operator's logs, and the stage pods' it renders: `json` (one object per line) or `plain` text."""

    leader_election: bool = False
    """Run kopf only while holding a Lease, so several replicas are safe."""
    lease_name: str = "promptpipe-operator"
    lease_namespace: str = "default"
    """Where the Lease lives: the operator's own namespace (the chart passes it)."""
    lease_seconds: int = 15
    lease_renew_deadline_seconds: int = 10
    lease_retry_seconds: int = 2

    def analysis_prometheus(self) -> list[str]:
        """Every Prometheus a rollout analysis may name, without trailing slashes."""
        return [u.rstrip("/") for u in (self.prometheus_address, *self.analysis_prometheus_urls)]

    @field_validator("namespaces", "allowed_tgi_images", "analysis_prometheus_urls", "scrape_namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [n.strip() for n in value.split(",") if n.strip()] if isinstance(value, str) else value
