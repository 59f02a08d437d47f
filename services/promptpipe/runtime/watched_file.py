"""A file read again when it changes: a Secret, ConfigMap or projected-token volume swaps its files in
place (rotated keys, a refreshed token), so a process looks at the file at most once a second and parses
it anew when it changed. A version that does not parse (half written) is logged and the previous one stays.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RELOAD_EVERY_SECONDS = 1.0


def file_identity(*paths: Path) -> tuple[int, ...]:
    out: list[int] = []
    for path in paths:
        st = os.stat(path)  # follows the symlinks a volume swaps
        out += (st.st_ino, st.st_mtime_ns, st.st_size)
    return tuple(out)


class WatchedFile(Generic[T]):
    """`parse(text)` of the file, parsed again when the file changed (looked at once a second at most).
    A file missing or not parsing at start fails the start; later, the previous value stays. `also`: files
    read with it (by `parse` itself: a certificate's key), whose change counts as its own."""

    def __init__(
        self,
        path: Path,
        parse: Callable[[str], T],
        what: str,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = 1 << 20,
        also: tuple[Path, ...] = (),
    ) -> None:
        self.path = path
        self._paths = (path, *also)
        self._parse = parse
        self._what = what
        self._clock = clock
        self._max_bytes = max_bytes
        self._seen = file_identity(*self._paths)
        self._value = parse(self._read())
        self._checked = clock()
        self.version = 0

    def _read(self) -> str:
        with open(self.path, "rb") as f:
            data = f.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise ValueError(f"{self.path} is larger than {self._max_bytes} bytes")
        return data.decode()

    @property
    def value(self) -> T:
        self.refresh()
        return self._value

    def refresh(self) -> bool:
        """Parse the file again if it changed; whether it did."""
        now = self._clock()
        if now - self._checked < RELOAD_EVERY_SECONDS:
            return False
        self._checked = now
        try:
            seen = file_identity(*self._paths)
            if seen == self._seen:
                return False
            value = self._parse(self._read())
        except (OSError, ValueError, ssl.SSLError) as err:
            log.error("%s not reloaded, the previous one stays: %s", self._what, err)
            return False
        self._seen, self._value = seen, value
        self.version += 1
        log.info("%s reloaded from %s", self._what, self.path)
        return True
