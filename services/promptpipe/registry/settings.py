"""Where the registry lives, from the environment (PROMPTPIPE_REGISTRY_*) and the usual AWS chain."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RegistrySettings(BaseSettings):
    """Credentials are not here: boto3 reads them from its usual chain (env, profile, IRSA, IMDS)."""

    model_config = SettingsConfigDict(env_prefix="PROMPTPIPE_REGISTRY_", extra="ignore", use_attribute_docstrings=True)

    bucket: str = "promptpipe-models"
    """S3 bucket holding the artifacts (content-addressed blobs)."""
    table: str = "promptpipe-models"
    """DynamoDB table holding versions, aliases and history."""
    region: str | None = None
    """AWS region; unset, the usual chain (AWS_REGION, the profile)."""
    endpoint_url: str | None = None
    """Any S3/DynamoDB-compatible endpoint (MinIO, LocalStack, moto); unset, AWS."""
    s3_endpoint_url: str | None = None
    """A separate S3 endpoint, when S3 and DynamoDB live apart; unset, `endpoint_url`."""
    prefix: str = ""
    """Key prefix inside the bucket, so several registries can share one."""
    multipart_threshold_mb: int = Field(default=64, ge=5)
    """Files larger than this are uploaded and downloaded in parts."""
    part_size_mb: int = Field(default=64, ge=5)
    """Size of each part (S3's minimum is 5 MiB)."""
    max_concurrency: int = Field(default=8, ge=1, le=64)
    """Parts transferred at once."""
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    """Seconds to open a connection to S3 or DynamoDB."""
    read_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    """Seconds without a byte from S3 or DynamoDB before a call fails (the operator runs with 10)."""
    max_attempts: int = Field(default=4, ge=1, le=10)
    """Attempts of each call, retries included (botocore's standard mode: throttling and transient faults)."""
