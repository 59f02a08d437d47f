"""The model registry: artifacts in S3 (content-addressed), versions and aliases in DynamoDB."""
