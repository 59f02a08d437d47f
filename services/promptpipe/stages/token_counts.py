"""How many tokens a prompt takes, for the assemble stage's budget, when the model's vocabulary is not in
the process: asked of the TGI serving the model, else bounded from above."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

log = logging.getLogger(__name__)


def approximate_tokens(text: str) -> int:
    """ASCII at about four characters a token (English text in common vocabularies); every byte of
    anything else a token of its own, the most a byte-level tokenizer can take, so a CJK question is
    never under-counted into a prompt the model must refuse."""
    ascii_chars = sum(1 for c in text if c < "\x80")
    other_bytes = len(text.encode()) - ascii_chars
    return max(1, (ascii_chars + 3) // 4 + other_bytes)


# While TGI does not answer /tokenize, asking again waits this long; the approximation stands in.
RETRY_AFTER_SECONDS = 30.0


class TgiTokenCounter:
    """Counts with TGI's POST /tokenize: the served model's own tokenizer.

    Synchronous: the assemble stage runs it in a worker thread. A TGI that cannot answer costs no
    request: the approximation counts instead, and TGI is asked again after RETRY_AFTER_SECONDS.
    """

    def __init__(self, endpoints: Sequence[str], timeout_seconds: float) -> None:
        self._endpoints = [e.rstrip("/") for e in endpoints]
        self._timeout = timeout_seconds
        self._lock = threading.Lock()
        self._down_until = 0.0

    def __call__(self, text: str) -> int:
        if time.monotonic() < self._down_until:
            return approximate_tokens(text)
        body = json.dumps({"inputs": text}).encode()
        for endpoint in self._endpoints:
            request = urllib.request.Request(  # noqa: S310 - the pipeline's own TGI endpoints, http(s)
                f"{endpoint}/tokenize", data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                    return len(json.load(response))
            except (OSError, ValueError) as err:  # URLError and timeouts are OSErrors; a bad body a ValueError
                log.warning("TGI at %s did not tokenize (%s); approximating token counts", endpoint, err)
        with self._lock:
            self._down_until = time.monotonic() + RETRY_AFTER_SECONDS
        return approximate_tokens(text)
