"""TLS on the gateway's public ports: a certificate and key from files, read again when they change.

A Secret volume swaps its files when the Secret changes (cert-manager renewing a certificate), so the
gateway looks at them at most once a second and serves the new pair to new connections; connections open
keep theirs. A pair that does not load (half written, key and certificate not matching) is logged and the
previous one stays.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

RELOAD_EVERY_SECONDS = 1.0


class ServerCertificate:
    def __init__(self, cert: Path, key: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._cert, self._key = cert, key
        self._clock = clock
        self._seen = self._identity()
        self._pair = self._load()  # a missing or bad pair fails the start, not the first handshake
        self._checked = clock()
        self.version = 0

    def _identity(self) -> tuple[int, ...]:
        a, b = os.stat(self._cert), os.stat(self._key)  # follows the symlinks a Secret volume swaps
        return a.st_ino, a.st_mtime_ns, a.st_size, b.st_ino, b.st_mtime_ns, b.st_size

    def _load(self) -> tuple[bytes, bytes]:
        cert, key = self._cert.read_bytes(), self._key.read_bytes()
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self._cert, self._key)  # they match
        return key, cert

    def refresh(self) -> bool:
        """Read the files again if they changed (looked at once a second at most); whether they did."""
        now = self._clock()
        if now - self._checked < RELOAD_EVERY_SECONDS:
            return False
        self._checked = now
        try:
            seen = self._identity()
            if seen == self._seen:
                return False
            pair = self._load()
        except (OSError, ssl.SSLError) as err:
            log.error("TLS certificate not reloaded, the previous one stays: %s", err)
            return False
        self._seen, self._pair = seen, pair
        self.version += 1
        log.info("TLS certificate reloaded from %s", self._cert)
        return True

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials whose pair is fetched again, when it changed, as each new connection is made."""
        served = self.version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            self.refresh()
            if self.version == served:
                return None  # unchanged: gRPC keeps what it has
            served = self.version
            return grpc.ssl_server_certificate_configuration([self._pair])

        initial = grpc.ssl_server_certificate_configuration([self._pair])
        return grpc.dynamic_ssl_server_credentials(initial, fetch)

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key)
        return context

    def reload_into(self, context: ssl.SSLContext, loaded: int) -> int:
        """Load the current pair into `context` if it is newer than version `loaded`; the version it holds."""
        self.refresh()
        if self.version != loaded:
            try:
                context.load_cert_chain(self._cert, self._key)
            except (OSError, ssl.SSLError) as err:
                log.error("TLS certificate not reloaded for HTTP: %s", err)
                return loaded
        return self.version
