"""Who may call the gateway, and as which tenant: the API keys, read again whenever their file changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from promptpipe.contract.apikeys import hash_key, parse_keys
from promptpipe.runtime.errors import Unauthenticated
from promptpipe.runtime.watched_file import WatchedFile

# The tenant of every call when no keys are configured (local mode, open).
ANONYMOUS = "anonymous"


# What the operator of a closed gateway without keys should do.
CLOSED_HINT = "name a Secret in the pipeline's spec.auth.apiKeysSecret, or set spec.auth.open: true"


class KeyRing:
    """The keys from a file (reloaded when it changes) or a fixed text; with neither, the gateway is open."""

    def __init__(
        self,
        path: Path | None = None,
        inline: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        required: bool = False,
    ) -> None:
        self._path = path
        self.closed = required and path is None and not inline
        self.open = path is None and not inline and not required
        self._inline: dict[str, str] = parse_keys(inline, "PROMPTPIPE_API_KEYS") if inline else {}
        # A missing or bad file is refused at start, not at the first call; a bad edit later keeps the keys
        # that worked (a half-written edit must not lock every tenant out).
        self._file = (
            None if path is None else WatchedFile(path, lambda text: parse_keys(text, str(path)), "API keys", clock)
        )

    @property
    def _tenants(self) -> dict[str, str]:
        return self._inline if self._file is None else self._file.value

    def describe(self) -> str:
        if self.closed:
            return f"API keys are required and none are configured: every call is refused ({CLOSED_HINT})"
        if self.open:
            return "no API keys configured: the gateway is open to anyone who reaches it"
        tenants = self._tenants
        source = self._path or "PROMPTPIPE_API_KEYS"
        return f"API keys from {source}: {len(tenants)} keys of {len(set(tenants.values()))} tenants"

    def tenant_of(self, authorization: str | None) -> str:
        """The tenant whose key `authorization` ('Bearer <key>') carries; Unauthenticated otherwise."""
        if self.open:
            return ANONYMOUS
        if self.closed:
            raise Unauthenticated(f"this gateway requires API keys and has none ({CLOSED_HINT})")
        if not authorization:
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization must be 'Bearer <key>'")
        tenant = self._tenants.get(hash_key(key.strip()))
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        return tenant
