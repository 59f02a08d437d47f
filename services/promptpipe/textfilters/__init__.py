"""Streaming post-processing: stop sequences, PII redaction, blocklist."""
