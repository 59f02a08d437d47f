"""promptpipe: multi-stage LLM prompt pipelines as streaming gRPC microservices."""

# The one version: the wheel's (pyproject reads it), `promptpipe --version`, `promptpipe-operator --version`,
# the default stage image tag; the chart's version and appVersion are kept equal by tests/test_version.py.
__version__ = "0.2.0"
