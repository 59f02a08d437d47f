"""Who may call the gateway, and as which tenant: the API keys, read again whenever their file changes."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from promptpipe.contract.apikeys import KeyFileError, hash_key, parse_keys
from promptpipe.runtime.errors import StageError

log = logging.getLogger(__name__)

# The tenant of every call when no keys are configured (local mode, open).
ANONYMOUS = "anonymous"
# How often a call may look at the key file; a Secret volume swaps files in place, so rotation is seen
# within this without a restart.
RELOAD_EVERY_SECONDS = 1.0


# What the operator of a closed gateway without keys should do.
CLOSED_HINT = "name a Secret in the pipeline's spec.auth.apiKeysSecret, or set spec.auth.open: true"


class Unauthenticated(StageError):
    code = grpc.StatusCode.UNAUTHENTICATED


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
        self._clock = clock
        self._checked = -RELOAD_EVERY_SECONDS
        self._seen: tuple[int, int, int] | None = None
        self._tenants: dict[str, str] = {}
        self.open = path is None and not inline and not required
        if inline:
            self._tenants = parse_keys(inline, "PROMPTPIPE_API_KEYS")
        if path is not None:
            self._seen = _identity(path)  # a missing file is refused at start, not at the first call
            self._tenants = parse_keys(path.read_text(), str(path))

    def describe(self) -> str:
        if self.closed:
            return f"API keys are required and none are configured: every call is refused ({CLOSED_HINT})"
        if self.open:
            return "no API keys configured: the gateway is open to anyone who reaches it"
        tenants = sorted(set(self._tenants.values()))
        source = self._path or "PROMPTPIPE_API_KEYS"
        return f"API keys from {source}: {len(self._tenants)} keys of {len(tenants)} tenants"

    def tenant_of(self, authorization: str | None) -> str:
        """The tenant whose key `authorization` ('Bearer <key>') carries; Unauthenticated otherwise."""
        if self.open:
            return ANONYMOUS
        if self.closed:
            raise Unauthenticated(f"this gateway requires API keys and has none ({CLOSED_HINT})")
        self._reload_if_changed()
        if not authorization:
            raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("the authorization must be 'Bearer <key>'")
        tenant = self._tenants.get(hash_key(key.strip()))
        if tenant is None:
            raise Unauthenticated("the API key is not valid")
        return tenant

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if self._path is None or now - self._checked < RELOAD_EVERY_SECONDS:
            return
        self._checked = now
        try:
            seen = _identity(self._path)
            if seen == self._seen:
                return
            tenants = parse_keys(self._path.read_text(), str(self._path))
        except (OSError, KeyFileError) as err:
            # Keep the keys that worked: a half-written edit must not lock every tenant out.
            log.error("API keys not reloaded, the previous ones stay: %s", err)
            return
        self._seen, self._tenants = seen, tenants
        log.info("API keys reloaded: %s", self.describe())


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the symlinks a Secret volume swaps
    return st.st_ino, st.st_mtime_ns, st.st_size
