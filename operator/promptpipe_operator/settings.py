"""Operator settings, from the environment (PROMPTPIPE_OPERATOR_*)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTPIPE_OPERATOR_", extra="ignore", frozen=True)

    stage_image: str = "ghcr.io/promptpipe/stage:0.1.0"
    """Image every stage Deployment runs (`promptpipe-stage`)."""
    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    """Where KEDA's prometheus scaler reads the stages' queue depth."""
    image_pull_policy: str = "IfNotPresent"
