"""TLS on the gateway's public ports: a certificate and key from files, read again when they change.

A Secret volume swaps its files when the Secret changes (cert-manager renewing a certificate), so the
gateway looks at them at most once a second and serves the new pair to new connections; connections open
keep theirs. A pair that does not load (half written, key and certificate not matching) is logged and the
previous one stays.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from promptpipe.runtime.watched_file import WatchedFile

log = logging.getLogger(__name__)


class ServerCertificate:
    def __init__(self, cert: Path, key: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._cert, self._key = cert, key
        # A missing or bad pair fails the start, not the first handshake.
        self._pair = WatchedFile(cert, lambda _: self._load(), "TLS certificate", clock, also=(key,))

    @property
    def version(self) -> int:
        return self._pair.version

    def _load(self) -> tuple[bytes, bytes]:
        cert, key = self._cert.read_bytes(), self._key.read_bytes()
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self._cert, self._key)  # they match
        return key, cert

    def refresh(self) -> bool:
        """Read the files again if they changed (looked at once a second at most); whether they did."""
        return self._pair.refresh()

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials whose pair is fetched again, when it changed, as each new connection is made."""
        served = self.version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            self.refresh()
            if self.version == served:
                return None  # unchanged: gRPC keeps what it has
            served = self.version
            return grpc.ssl_server_certificate_configuration([self._pair.value])

        initial = grpc.ssl_server_certificate_configuration([self._pair.value])
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
