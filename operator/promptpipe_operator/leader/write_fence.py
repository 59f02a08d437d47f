"""Whether this process may write to the API server now: the fence every write of the operator checks.

Without leader election, always. With it, only while the Lease was last renewed within the renew
deadline: the Lease lasts longer than that, so a leader cut off from the API server stops writing
before another replica can take over, and a write held back by a stalled connection is not sent late.
"""

from __future__ import annotations

import threading
import time


class NotLeading(Exception):
    """This replica does not (or may no longer) hold the Lease: it must not write."""


class Leadership:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadline: float | None = None  # None: no leader election, every write is ours to make
        self._renewed = 0.0
        self._lost = False

    def elect(self, renew_deadline_seconds: float) -> None:
        """Leader election is on: writes are allowed only within `renew_deadline_seconds` of a renewal."""
        with self._lock:
            self._deadline = renew_deadline_seconds

    def renewed(self) -> None:
        with self._lock:
            self._renewed = time.monotonic()

    def lose(self) -> None:
        with self._lock:
            self._lost = True

    def check(self) -> None:
        """Raise NotLeading unless this process may write now."""
        with self._lock:
            if self._deadline is None:
                return
            if self._lost:
                raise NotLeading("this replica lost the Lease")
            if time.monotonic() - self._renewed > self._deadline:
                raise NotLeading(f"the Lease was last renewed more than {self._deadline:g}s ago")


# One per process: the leader elector renews it, the API client's writes check it.
LEADERSHIP = Leadership()
