"""Process settings of one stage, from the environment (PROMPTPIPE_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from promptpipe.contract.spec import StageName
from promptpipe.contract.tracing import Exporter
from promptpipe.runtime.logs import LogFormat


class StageSettings(BaseSettings):
    """Settings the container (or `promptpipe up`) gives a stage process."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTPIPE_", extra="ignore", use_attribute_docstrings=True, cli_implicit_flags=True
    )

    stage: StageName
    """Which stage this process serves."""
    config: Path
    """Path of the runtime config (pipeline + endpoints) written by `up` or the operator."""
    host: str = "127.0.0.1"
    """Address the gRPC server binds to; `0.0.0.0` in a pod."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (written to `port_file`)."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Prometheus /metrics port; 0 picks a free one."""
    stage_port: int = Field(default=50052, ge=0, le=65535)
    """The stream stage's internal port: its Stage service (queue stats), never on the public `port`, which
    serves the Gateway, health and reflection only. 0 picks a free one. The other stages' Stage service is
    their API, on `port`."""
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """The stream stage's OpenAI-compatible HTTP port; unset serves none, 0 picks a free one."""
    api_keys_file: Path | None = None
    """The gateway's API keys (see promptpipe.contract.apikeys), read again when the file changes."""
    api_keys: str | None = None
    """The same, inline (a file is the way to rotate keys without a restart)."""
    require_api_keys: bool = False
    """With no keys configured, refuse every call rather than serve openly (a cluster's default: the
    operator sets it unless the pipeline's `auth.open` is true)."""
    tls_cert_file: Path | None = None
    """The gateway's certificate chain (PEM): with `tls_key_file`, its public ports (gRPC and HTTP) serve TLS,
    and the files are read again when they change."""
    tls_key_file: Path | None = None
    """The certificate's private key (PEM)."""
    identity_token_file: Path | None = None
    """The token this process's calls to other stages carry (a projected ServiceAccount token the kubelet
    writes and refreshes), read again when it changes; unset, the process signs its own with the runtime
    config's identity key (`promptpipe up`)."""
    quota_store_url: SecretStr | None = None
    """The gateway's shared quota store, `redis://[:password@]host:port/db` or `rediss://` (the pipeline's
    `auth.quotaStore.urlSecret`, which the operator passes here): the tenants' buckets are kept there, for
    every replica of the gateway at once. Unset: this process keeps its own."""
    port_file: Path | None = None
    """If set, the bound ports are written here as `grpc metrics http stage` once serving (http 0: none;
    stage: the stream stage's internal port, else the same as grpc)."""
    otel_exporter: Exporter | Literal[""] = ""
    """Tracing exporter: `none`, `console` (JSON lines on stdout) or `otlp`; unset, as the pipeline's
    `spec.tracing` says (OTLP to its endpoint), and off without it."""
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    """`text` for a terminal (`promptpipe up`'s default), or `json`: one JSON object per line, each with the
    pipeline, the stage and, while a call is worked on, its request id (the images' and the chart's default)."""
    check: bool = False
    """Load the config and build the stage (every library it runs imported), print the settings, exit."""

    def report_ports(self, grpc: int, metrics: int, http: int, stage: int) -> None:
        """Write the bound ports to `port_file`, if set: renamed into place whole, so a reader never sees
        half of it (written before SERVING, so whoever sees SERVING can read it)."""
        if self.port_file is not None:
            partial = self.port_file.with_suffix(".partial")
            partial.write_text(f"{grpc} {metrics} {http} {stage}\n")
            partial.replace(self.port_file)

    @model_validator(mode="after")
    def _tls_whole(self) -> StageSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both, or neither")
        return self
