"""The promptpipe operator: reconciles PromptPipeline resources into their children.

Layering: `render` is pure (spec in, manifests out, no API client); the kopf
handlers and the API calls build on it.
"""
