"""Applying rules to text that arrives in arbitrary pieces.

The output never depends on how the text was split: a match is acted on only once
it can no longer change, i.e. it does not touch the end of what has arrived
(patterns are greedy, so a match at the end might still grow). Text is held back
only from the start of the earliest match still in progress, found with the
`regex` module's partial matching, so ordinary text flows out at once.

The rules' patterns are bounded in length, so what is held back (and rescanned as
each token arrives) is too, and the cost per token does not grow with the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from promptpipe.textfilters.normalize import view
from promptpipe.textfilters.rules import Action, Rule

# Enough emitted text to keep for the rules' look-behind boundaries.
_CONTEXT_CHARS = 8
# The most characters a rule's look-ahead examines past the end of its match.
_LOOKAHEAD_CHARS = 2
# A safety bound on what is held back, above the longest match any built-in rule can make (an e-mail
# address, about 640 characters): text older than this goes out even if a match still holds it.
MAX_HELD_CHARS = 1024


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    rule: Rule


@dataclass(frozen=True)
class Emitted:
    text: str
    # Set when a STOP or REFUSE rule ended the answer; nothing more will be emitted.
    ended_by: Action | None = None


class StreamingFilter:
    def __init__(self, rules: Sequence[Rule]) -> None:
        self._rules = list(rules)
        self._pending = ""
        self._context = ""
        self._ended = False

    @property
    def held_back(self) -> int:
        """Characters received but not yet emitted."""
        return len(self._pending)

    def feed(self, text: str) -> Emitted:
        if self._ended:
            return Emitted("")
        self._pending += text
        return self._release(final=False)

    def finish(self) -> Emitted:
        """The answer is complete: what is held back is judged as it stands."""
        if self._ended:
            return Emitted("")
        out = self._release(final=True)
        self._ended = True
        return out

    def abandon(self) -> Emitted:
        """The answer broke off: release what is safe. Text held back is judged as it stands (as at
        `finish`), except the start of a redaction's match that already gives something away (the @ of
        an address, the first digits of a card number): that goes out as the replacement, whole, never
        as it is. A plain word held back in case it grows into an address goes out as it is."""
        if self._ended:
            return Emitted("")
        out = self._release(final=False)
        if out.ended_by is not None:
            return out
        revealing = self._revealing_start()
        if revealing is None:
            rest = self._release(final=True)
            self._ended = True
            return Emitted(out.text + rest.text, rest.ended_by)
        start, replacement = revealing
        self._pending = self._pending[:start]
        before = self._release(final=True)
        self._ended = True
        if before.ended_by is not None:
            return Emitted(out.text + before.text, before.ended_by)
        return Emitted(out.text + before.text + replacement)

    def _revealing_start(self) -> tuple[int, str] | None:
        """Where in the held-back text the earliest revealing partial match starts, and its replacement."""
        seen = view(self._context + self._pending, final=False)
        subject, context = seen.text, len(self._context)
        offset = seen.index_of(context)
        earliest: tuple[int, str] | None = None
        for rule in self._rules:
            if rule.revealing is None:
                continue
            for m in rule.pattern.finditer(subject, pos=offset, partial=True):
                cut_short = m.partial or m.end() == len(subject)  # what may have gone on, had the stream
                start = seen.raw_start(m.start()) - context
                if cut_short and rule.revealing(m.group()) and (earliest is None or start < earliest[0]):
                    earliest = (start, rule.replacement)
        return earliest

    def _scan(self, final: bool) -> tuple[list[Match], int]:
        """Complete matches, and where the earliest still-open match starts, in the held-back text: found
        in its normalised view, and mapped back to what was sent."""
        seen = view(self._context + self._pending, final)
        subject, context = seen.text, len(self._context)
        offset = seen.index_of(context)
        hold = len(subject)
        matches: list[Match] = []
        for rule in self._rules:
            for m in rule.pattern.finditer(subject, pos=offset, partial=not final):
                start, stop = m.span()
                if m.partial or (not final and self._may_grow(rule, subject, start, stop)):
                    if stop > start:
                        hold = min(hold, start)
                    continue
                for s, e in rule.spans(m.group()):
                    matches.append(Match(seen.raw_start(start + s) - context, seen.raw_end(start + e) - context, rule))
        return matches, max(seen.raw_start(hold) - context, len(self._pending) - MAX_HELD_CHARS)

    @staticmethod
    def _may_grow(rule: Rule, subject: str, start: int, stop: int) -> bool:
        """Could more text change the match found at `start`?

        True when the look-ahead at its end cannot be judged yet, or when everything
        from `start` on is still the beginning of some longer match.
        """
        if stop + _LOOKAHEAD_CHARS > len(subject):
            return True
        return rule.pattern.fullmatch(subject, pos=start, partial=True) is not None

    def _release(self, final: bool) -> Emitted:
        if not self._rules:
            out, self._pending = self._pending, ""
            return Emitted(out)
        matches, hold = self._scan(final)
        # Leftmost first, the longer on a tie; matches overlapping a chosen one are dropped.
        matches.sort(key=lambda m: (m.start, -m.end))
        chosen: list[Match] = []
        for m in matches:
            if chosen and m.start < chosen[-1].end:
                continue
            chosen.append(m)
        cut = hold
        pieces: list[str] = []
        pos = 0
        for m in chosen:
            if m.start >= cut:
                break
            if m.end > cut:  # overlaps a match still open: wait for it
                cut = m.start
                break
            pieces.append(self._pending[pos : m.start])
            if m.rule.action is not Action.REPLACE:
                self._ended = True
                self._pending = ""
                return Emitted("".join(pieces), m.rule.action)
            pieces.append(m.rule.replacement)
            pos = m.end
        pieces.append(self._pending[pos:cut])
        released = self._pending[:cut]
        self._context = (self._context + released)[-_CONTEXT_CHARS:]
        self._pending = self._pending[cut:]
        return Emitted("".join(pieces))
