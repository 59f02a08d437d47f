"""What the post stage looks for: PII detectors, stop sequences, blocklist words.

Each rule is a pattern plus an optional validator that sees the full match (ISO 13616
mod-97 for IBANs, digit count for phones) or a finder of what to act on within it (the
Luhn-valid card numbers in a run of digit groups), so a 16-digit order number that fails
Luhn is left alone. The patterns match the normalised view of the text (normalize.py):
full-width forms, zero-width characters and odd spaces do not hide a match.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex

from promptpipe.contract.spec import BlocklistAction, PostSpec


class Action(enum.Enum):
    REPLACE = "replace"  # put `replacement` in place of the match
    STOP = "stop"  # end the answer before the match (stop sequence)
    REFUSE = "refuse"  # end the answer before the match (content filter)


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: regex.Pattern[str]
    action: Action
    replacement: str = ""
    validate: Callable[[str], bool] | None = None
    # For a redaction: whether the start of a match, cut short by a broken stream, already gives away
    # what the rule protects (and so is redacted whole rather than sent).
    revealing: Callable[[str], bool] | None = None
    # For a match that may hold several things to act on, or one within other text: their spans in it.
    within: Callable[[str], list[tuple[int, int]]] | None = None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """What of a complete match `text` the rule acts on, as spans of it."""
        if self.within is not None:
            return self.within(text)
        if self.validate is None or self.validate(text):
            return [(0, len(text))]
        return []


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def luhn_valid(text: str) -> bool:
    digits = _digits(text)
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_spans(run: str) -> list[tuple[int, int]]:
    """The card numbers in a run of digit groups: spans of 13 to 19 digits that pass Luhn, each from the
    start of a group to the end of one, leftmost first and the longest at a place. A card followed by
    another digit group (`4111 1111 1111 1111 0`) or by a second card is found; a digit run with no
    separator is a card only whole, so a long number is not read as one with digits to spare."""
    positions = [i for i, ch in enumerate(run) if ch.isdigit()]
    digits = "".join(run[i] for i in positions)
    starts = {k for k, i in enumerate(positions) if k == 0 or not run[i - 1].isdigit()}
    ends = {k + 1 for k, i in enumerate(positions) if i + 1 == len(run) or not run[i + 1].isdigit()}
    spans: list[tuple[int, int]] = []
    k = 0
    while k < len(positions):
        found = k in starts and next(
            (n for n in range(19, 12, -1) if k + n in ends and luhn_valid(digits[k : k + n])), None
        )
        if found:
            spans.append((positions[k], positions[k + found - 1] + 1))
            k += found
        else:
            k += 1
    return spans


def iban_valid(text: str) -> bool:
    compact = "".join(text.split()).upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def phone_valid(text: str) -> bool:
    return 7 <= len(_digits(text)) <= 15


# Boundaries are lookarounds so a match never eats its neighbours' characters. Every pattern is bounded
# in length (an e-mail address by RFC 5321's limits: 64 characters before the @, labels of 63), so the
# streaming filter never holds back more than the longest possible match: a run of word characters
# with no break cannot grow into an address after its 64th character.
EMAIL = r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}(?![\w-])"
# A run of digit groups (a card, two cards, a card and more digits): card_spans finds the cards in it.
CARD = r"(?<![\w.-]|\d[ .-])\d(?:[ .-]?\d){12,56}(?!\w|[ .-]\d)"
IBAN = r"(?<!\w)[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?!\w)"
PHONE = r"(?<![\w+]|\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){5,13}(?![\w-]|[ .-]\d)"


# What the start of a match must hold to give something away: a word is not half an address until its @;
# a country code and check digits are not yet an account (an IBAN's bank code follows them).
def _has_at(text: str) -> bool:
    return "@" in text


def _digits_at_least(n: int) -> Callable[[str], bool]:
    return lambda text: len(_digits(text)) >= n


def _iban_start(text: str) -> bool:
    return len("".join(text.split())) >= 8


def stop_rules(stops: Sequence[str]) -> list[Rule]:
    return [Rule(f"stop:{s}", regex.compile(regex.escape(s)), Action.STOP) for s in dict.fromkeys(stops)]


def build_rules(spec: PostSpec) -> list[Rule]:
    rules = stop_rules(spec.stop_sequences)
    red = spec.redact
    if red.email:
        rules.append(Rule("email", regex.compile(EMAIL), Action.REPLACE, red.replacement, revealing=_has_at))
    if red.card:
        card = regex.compile(CARD)
        rules.append(Rule("card", card, Action.REPLACE, red.replacement, None, _digits_at_least(6), card_spans))
    if red.iban:
        rules.append(Rule("iban", regex.compile(IBAN), Action.REPLACE, red.replacement, iban_valid, _iban_start))
    if red.phone:
        rules.append(
            Rule("phone", regex.compile(PHONE), Action.REPLACE, red.replacement, phone_valid, _digits_at_least(6))
        )
    block = spec.blocklist
    if block.words:
        words = "|".join(regex.escape(w) for w in block.words)
        pattern = regex.compile(rf"(?<!\w)(?:{words})(?!\w)", regex.IGNORECASE)
        if block.action is BlocklistAction.REFUSE:
            rules.append(Rule("blocklist", pattern, Action.REFUSE))
        else:
            rules.append(Rule("blocklist", pattern, Action.REPLACE, "[BLOCKED]"))
    return rules
