"""promptpipe: multi-stage LLM prompt pipelines as streaming gRPC microservices."""

__version__ = "0.1.0"
