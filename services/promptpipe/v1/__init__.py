"""Generated from protos/promptpipe/v1 by protos/generate.py. Do not edit."""
