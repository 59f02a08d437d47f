"""The gateway (the `stream` stage): the public API, gRPC (`grpc_api`) and OpenAI-compatible HTTP (`http_api`,
`openai_api`), both behind the same keys, quotas and admission, both calling the pipeline through one
`GatewayServicer.answer`. The internal `promptpipe.v1.Stage` service is never on its public ports."""
