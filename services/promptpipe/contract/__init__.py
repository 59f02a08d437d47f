"""The contract the operator and the stages share: the PromptPipeline spec and the CRD
made from it, the runtime config file, metric names, status classes, label and
annotation keys. Needs only pydantic and pyyaml (import-linter keeps it so)."""
