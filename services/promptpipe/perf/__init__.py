"""Finding the bottleneck: `promptpipe bench` loads a gateway and records every call with its per-stage
timings; `promptpipe analyze` splits latency across the stages, checks the SLO and draws the report."""
