"""Streaming post-processing: the output never depends on how the text was split."""

from __future__ import annotations

import random

import pytest

from promptpipe.contract.spec import PostSpec
from promptpipe.textfilters.rules import Action, build_rules, iban_valid, luhn_valid, stop_rules
from promptpipe.textfilters.streaming import StreamingFilter

SPEC = PostSpec.model_validate({"stopSequences": ["<END>"], "blocklist": {"words": ["darn"]}})

TEXT = (
    "Mail bob.smith@example.co.uk or call +1 415-555-2671. Card 4111 1111 1111 1111, "
    "not 4111 1111 1111 1112. IBAN GB82 WEST 1234 5698 7654 32 ok darn it <END> never shown"
)
EXPECTED = (
    "Mail [REDACTED] or call [REDACTED]. Card [REDACTED], not 4111 1111 1111 1112. IBAN [REDACTED] ok [BLOCKED] it "
)


def stream(pieces: list[str], spec: PostSpec = SPEC) -> tuple[str, Action | None]:
    f = StreamingFilter(build_rules(spec))
    out = []
    for piece in pieces:
        emitted = f.feed(piece)
        out.append(emitted.text)
        if emitted.ended_by:
            return "".join(out), emitted.ended_by
    emitted = f.finish()
    return "".join(out) + emitted.text, emitted.ended_by


def test_one_piece_gives_the_expected_redaction() -> None:
    assert stream([TEXT]) == (EXPECTED, Action.STOP)


@pytest.mark.parametrize("cut", range(len(TEXT) + 1))
def test_every_two_way_split_gives_the_same_output(cut: int) -> None:
    assert stream([TEXT[:cut], TEXT[cut:]]) == (EXPECTED, Action.STOP)


def test_one_character_tokens_give_the_same_output() -> None:
    assert stream(list(TEXT)) == (EXPECTED, Action.STOP)


def test_random_multi_splits_give_the_same_output() -> None:
    rng = random.Random(20261123)
    for _ in range(500):
        cuts = sorted(rng.sample(range(1, len(TEXT)), rng.randint(2, 40)))
        pieces = [TEXT[a:b] for a, b in zip([0, *cuts], [*cuts, len(TEXT)], strict=True)]
        assert stream(pieces) == (EXPECTED, Action.STOP), pieces


@pytest.mark.parametrize(
    "pii",
    [
        "jane.doe+news@mail.example.org",
        "+44 20 7946 0958",
        "(415) 555-2671",
        "5500-0000-0000-0004",
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
    ],
)
def test_each_kind_of_pii_is_redacted_at_every_split(pii: str) -> None:
    text = f"Contact: {pii}. Thanks"
    expected = "Contact: [REDACTED]. Thanks"
    assert stream([text]) == (expected, None)
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]]) == (expected, None), cut


def test_numbers_that_fail_their_checksum_are_left_alone() -> None:
    text = "Order 4111 1111 1111 1112 and GB00 WEST ABCD EFGH IJ shipped."
    assert stream([text]) == (text, None)


def test_plain_text_is_released_at_once_except_the_word_in_progress() -> None:
    f = StreamingFilter(build_rules(SPEC))
    assert f.feed("The answer is ").text == "The answer is "
    assert f.feed("Paris").text == ""  # could still become an e-mail address
    assert f.held_back == len("Paris")
    assert f.feed(", in France. ").text == "Paris, in France. "
    assert f.held_back == 0


def test_stop_sequence_split_across_tokens_ends_before_it() -> None:
    f = StreamingFilter(stop_rules(["###"]))
    assert f.feed("answer #").text == "answer "
    emitted = f.feed("## more")
    assert (emitted.text, emitted.ended_by) == ("", Action.STOP)
    assert f.feed("ignored").text == ""


def test_a_partial_stop_sequence_at_the_end_is_released_on_finish() -> None:
    f = StreamingFilter(stop_rules(["###"]))
    assert f.feed("cost: #").text == "cost: "
    assert f.finish().text == "#"


def test_blocklist_refuse_ends_with_content_filter() -> None:
    spec = PostSpec.model_validate(
        {
            "blocklist": {"words": ["secret plan"], "action": "refuse"},
            "redact": {"email": False, "phone": False, "card": False, "iban": False},
        }
    )
    assert stream(["the Secret ", "Plan is"], spec) == ("the ", Action.REFUSE)
    assert stream(["secretive plans"], spec) == ("secretive plans", None)


def test_luhn_and_iban_validators() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert luhn_valid("5500 0000 0000 0004")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB82 WEST 1234 5698 7654 33")


@pytest.mark.parametrize(
    ("unbroken", "held_most"),
    [
        ("a", 64),  # could be the start of an e-mail address only up to 64 characters
        ("7", 64),  # digits are word characters too
        ("ab.", 64),
        ("x@y", 64 + 1 + 63),  # then no dot: the domain's first label ends at 63
    ],
)
def test_what_is_held_back_stays_bounded_however_long_the_word(unbroken: str, held_most: int) -> None:
    f = StreamingFilter(build_rules(SPEC))
    out = []
    most = 0
    for _ in range(4000):
        out.append(f.feed(unbroken).text)
        most = max(most, f.held_back)
    out.append(f.finish().text)
    assert most <= held_most + 2  # the look-ahead's two characters
    assert "".join(out) == unbroken * 4000


def test_an_email_longer_than_the_rfc_allows_is_not_one() -> None:
    too_long = "a" * 65 + "@example.com"
    assert stream([f"see {too_long} now"]) == (f"see {too_long} now", None)
    assert stream([f"see {'a' * 64}@example.com now"]) == ("see [REDACTED] now", None)


@pytest.mark.parametrize(
    "cut_short",
    [
        "Card 4111 1111 1111 1",  # fails Luhn as it stands; most of a valid card number
        "IBAN GB82 WEST 1234 5698 76",
        "mail jane.doe@exam",  # not an address yet (no dot in the domain); its @ says whose it is
        "call +1 415-555-26",
    ],
)
def test_a_broken_stream_never_sends_the_revealing_start_of_a_match(cut_short: str) -> None:
    f = StreamingFilter(build_rules(SPEC))
    sent = f.feed(cut_short).text
    sent += f.abandon().text
    head = cut_short.split(" ", 1)[0]
    assert sent == f"{head} [REDACTED]"
    assert f.feed("more").text == "" and f.finish().text == ""


@pytest.mark.parametrize(
    ("cut_short", "sent"),
    [
        ("The answer is Paris", "The answer is Paris"),  # held in case it grows into an address: it did not
        ("Order 4111", "Order 4111"),  # four digits give nothing away
        ("Mail bob@example.com", "Mail [REDACTED]"),  # complete as it stands: redacted as at the end
        ("done <EN", "done <EN"),  # half a stop sequence is text
    ],
)
def test_a_broken_stream_sends_what_is_held_back_when_it_reveals_nothing(cut_short: str, sent: str) -> None:
    f = StreamingFilter(build_rules(SPEC))
    assert f.feed(cut_short).text + f.abandon().text == sent


# Ways of writing PII that a reader still reads as PII (issue 34's findings), and what each must become.
DISGUISED = [
    ("4111.1111.1111.1111", "[REDACTED]"),
    ("4111\u200b1111\u200b1111\u200b1111", "[REDACTED]"),  # zero-width spaces between the groups
    ("4111\u00a01111\u00a01111\u00a01111", "[REDACTED]"),  # no-break spaces
    ("4111\u202f1111\u20091111\u00ad1111", "[REDACTED]"),  # narrow no-break, thin space, soft hyphen
    ("\uff14\uff11\uff11\uff11 1111 1111 1111", "[REDACTED]"),  # full-width digits
    ("alice\uff20example.com", "[REDACTED]"),  # full-width @
    ("ali\u200bce@exam\u200bple.com", "[REDACTED]"),  # a zero-width space inside the address
    ("alice(at)example.com", "[REDACTED]"),
    ("alice[at]example[dot]com", "[REDACTED]"),
    ("alice( at )example.com", "[REDACTED]"),
    ("ALICE{AT}EXAMPLE(DOT)COM", "[REDACTED]"),
    ("4111 1111 1111 1111 0", "[REDACTED] 0"),  # a card followed by another digit
    ("4111-1111-1111-1111-5", "[REDACTED]-5"),
    ("4111 1111 1111 1111 5500 0000 0000 0004", "[REDACTED] [REDACTED]"),  # two cards in one run
]


@pytest.mark.parametrize(("disguised", "redacted"), DISGUISED)
def test_disguised_pii_is_redacted_at_every_split(disguised: str, redacted: str) -> None:
    text = f"See {disguised}, then"
    expected = f"See {redacted}, then"
    assert stream([text]) == (expected, None)
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]]) == (expected, None), cut
    assert stream(list(text)) == (expected, None)


@pytest.mark.parametrize(
    "kept",
    [
        "Order 41111111111111110 shipped",  # 17 digits with no separator: a number, not a card and a digit
        "Call me (at) noon, [dot] points",  # the words alone, next to nothing an address needs
        "Prices 12\u00a0\u20ac, caf\u00e9 na\u00efve \uff21\uff22\uff23 \u200bok",  # non-ASCII text with no PII
        "Ids 1234 5678 9012 3456 7890 1234 5678 9012 3456 7890 1234 5678 9012 3456 7",  # 57 digits, no valid card
    ],
)
def test_normalising_leaves_what_is_not_pii_as_it_was_sent(kept: str) -> None:
    assert stream([kept]) == (kept, None)
    assert stream(list(kept)) == (kept, None)
