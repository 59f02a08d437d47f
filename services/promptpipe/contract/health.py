"""The gRPC health service names a stage answers (grpc.health.v1), which the operator's probes ask."""

from __future__ import annotations

# "" is the stage as a whole: NOT_SERVING while loading, draining, with every backend circuit open, or
# stuck. Readiness asks it: callers route around a stage that cannot serve now.
OVERALL = ""
# NOT_SERVING only while the stage is stuck (a call held a slot or the model longer than any call may):
# liveness asks it, so a stage is restarted for being stuck, never for a backend that is down for a while.
LIVENESS = "liveness"
