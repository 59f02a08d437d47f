"""The text the post stage's rules match: the answer as a reader sees it, mapped back to the answer as sent.

A model (or a prompt that steers it) can write PII so that a pattern over the raw characters misses it
while a reader still sees it: full-width forms (`alice＠example.com`, `４１１１`), zero-width spaces or
soft hyphens between characters, no-break or thin spaces between digit groups, `(at)` and `[dot]` for
`@` and `.`. The rules match a normalised view instead:

- each character in its NFKC form (full-width and other compatibility forms become ASCII);
- format characters (Unicode category Cf: zero-width space and joiners, soft hyphen, word joiner) dropped;
- every space separator (category Zs: no-break, thin, figure spaces) a plain space;
- `(at)`, `[at]`, `{at}` an `@`, and `(dot)`, `[dot]`, `{dot}` a `.` (any case, a space inside allowed;
  not `alice [at] example`, spaced outside: a word is released once a space follows it, and holding
  every such word for the next token would slow every answer).

Each character of the view knows the span of the answer it came from, so a match replaces exactly what
was sent. While the answer is still arriving, an obfuscation cut short at its end (`alice(a`) is left
out of the view rather than read as text: what precedes it is then at the end, and held back as a match
that may still grow. Pure ASCII text with no bracket is its own view (the common case costs a scan).
"""

from __future__ import annotations

import bisect
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import regex

_OBFUSCATION = regex.compile(r"[(\[{] ?(at|dot) ?[)\]}]", regex.IGNORECASE)
_OPENERS = frozenset("([{")
_MEANS = {"at": "@", "dot": "."}


@lru_cache(maxsize=4096)
def _char(ch: str) -> str:
    """One character's form in the view: NFKC, dropped if a format character, a space if a space separator."""
    category = unicodedata.category(ch)
    if category == "Cf":
        return ""
    if category == "Zs":
        return " "
    return unicodedata.normalize("NFKC", ch)


@dataclass(frozen=True)
class View:
    """The normalised text, and for each of its characters the span [start, end) of the raw text it came from."""

    text: str
    starts: tuple[int, ...] | None  # None: the view is the raw text itself
    ends: tuple[int, ...] | None
    # How much of the raw text the view covers: all of it, but for an obfuscation cut short at its end.
    covered: int

    def raw_start(self, i: int) -> int:
        """Where in the raw text the view's character `i` begins (past the view's end: where it stops)."""
        if self.starts is None:
            return i
        return self.starts[i] if i < len(self.starts) else self.covered

    def raw_end(self, i: int) -> int:
        """Where in the raw text the view's characters up to `i` (exclusive) end."""
        if self.ends is None:
            return i
        return self.ends[i - 1] if i > 0 else 0

    def index_of(self, raw: int) -> int:
        """The first character of the view that comes from raw offset `raw` or later."""
        if self.starts is None:
            return raw
        return bisect.bisect_left(self.starts, raw)


def view(raw: str, final: bool) -> View:
    """The view of `raw`; `final` when no more text will follow it."""
    if raw.isascii() and not _OPENERS.intersection(raw):
        return View(raw, None, None, len(raw))
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i, n = 0, len(raw)
    covered = n
    while i < n:
        ch = raw[i]
        if ch in _OPENERS:
            m = _OBFUSCATION.match(raw, i, partial=not final)
            if m is not None and m.partial:
                covered = i  # an obfuscation cut short by the end of what has arrived: left out for now
                break
            if m is not None:
                out.append(_MEANS[m.group(1).lower()])
                starts.append(i)
                ends.append(m.end())
                i = m.end()
                continue
        for piece in _char(ch):
            out.append(piece)
            starts.append(i)
            ends.append(i + 1)
        i += 1
    return View("".join(out), tuple(starts), tuple(ends), covered)
