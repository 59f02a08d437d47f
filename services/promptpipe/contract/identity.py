"""Stage identity: every call between a pipeline's processes carries a token that says which process of
which pipeline makes it, and the callee admits only the callers the pipeline's shape gives it.

On a cluster the token is a projected ServiceAccount token (one ServiceAccount per process, the audience
naming the pipeline), written and refreshed by the kubelet; the callee checks it against the cluster's
published signing keys, which the operator copies into a ConfigMap (no stage talks to the API server).
Locally `promptpipe up` makes a signing key and the same keys file, readable by the user only, and each
process signs its own tokens with that key. The names here are what the operator, `promptpipe up` and the
stages share; the checking is `promptpipe.runtime.identity`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from promptpipe.contract import topology
from promptpipe.contract.spec import PipelineSpec, StageName

# The metadata an internal call carries its token in, as `Bearer <token>`.
TOKEN_METADATA = "authorization"  # noqa: S105 - a header name
# How long a token lives: the kubelet's shortest (it refreshes at 80% of it); local tokens the same.
TOKEN_SECONDS = 600
# The keys file: {"issuer": ..., "keys": [JWK, ...]}, a JWK Set with its issuer.
KEYS_FILE = "keys.json"
TOKEN_FILE = "token"  # noqa: S105 - a file name
LOCAL_ISSUER = "promptpipe-local"
LOCAL_NAMESPACE = "local"

# Who calls whom across processes: (caller, callee) as stages; a fused stage calls from its host's process.
CALLS: tuple[tuple[StageName, StageName], ...] = (
    (StageName.STREAM, StageName.RAG),
    (StageName.STREAM, StageName.ASSEMBLE),
    (StageName.STREAM, StageName.POST),
    (StageName.POST, StageName.INFERENCE),
)


def audience(namespace: str, pipeline: str) -> str:
    """The audience a pipeline's tokens are for: a token for one pipeline is no use at another."""
    return f"promptpipe.io/{namespace}/{pipeline}"


def subject(namespace: str, account: str) -> str:
    """A ServiceAccount token's `sub`, as Kubernetes writes it."""
    return f"system:serviceaccount:{namespace}:{account}"


def callers_of(spec: PipelineSpec, process: StageName) -> frozenset[StageName]:
    """The processes that call `process` over the network: calls within one process (fused) need no token."""
    return frozenset(
        topology.host_of(spec, caller)
        for caller, callee in CALLS
        if topology.host_of(spec, callee) is process and topology.host_of(spec, caller) is not process
    )


class StageIdentity(BaseModel):
    """What a stage process needs to prove who it is and to check who calls it (in the runtime config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    audience: str
    namespace: str
    # Each process's ServiceAccount (locally: the name its tokens carry), by its stage.
    accounts: dict[StageName, str]
    # The issuer and its public keys (KEYS_FILE's shape), read again when the file changes.
    keys_file: str
    # Locally: the key each process signs its own tokens with. On a cluster none: each pod reads the token
    # the kubelet writes for it (PROMPTPIPE_IDENTITY_TOKEN_FILE).
    signing_key_file: str = ""
    # False only while a pipeline's pods move to identity (an upgrade): tokens are sent and checked, and a call
    # that would be refused is counted and logged but served, so that a caller not yet restarted is not
    # refused by a callee that already checks. The operator sets it once every pod carries a token.
    enforce: bool = True
