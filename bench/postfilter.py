"""The post stage's streaming filter: cost per token as the answer grows, for text that flows and for
text built to be held back (a word that never breaks, a digit run, a half-finished address).

    python -m bench.postfilter [--rounds 5]

Every rule of the default pipeline is on (e-mail, phone, card, IBAN redaction) plus a stop sequence and
a blocklist word. The figure to read is µs per token at each length: flat means linear cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

from promptpipe.contract.spec import PostSpec
from promptpipe.textfilters.rules import build_rules
from promptpipe.textfilters.streaming import StreamingFilter

SPEC = PostSpec.model_validate({"stopSequences": ["<END>"], "blocklist": {"words": ["darn"]}})
TOKENS = (4_000, 8_000, 16_000, 32_000)
# One token's text for each input.
INPUTS = {
    "prose": [" the", " answer", " is", " Paris", ",", " in", " France", "."],
    "unbroken word": ["ab"],
    "digit run": ["12"],
    "address-like": ["a.b", "@c"],
    # Text that is not ASCII takes the normalised view's slow path (one pass per character held back).
    "prose, not ASCII": [" la", " r\u00e9ponse", " est", "\u00a0", "Paris", ",", " caf\u00e9", "."],
    "disguised address": [" alice", "\u200b", "(at)", "example", "(dot)", "com", " and"],
}


def seconds_for(pieces: list[str], tokens: int) -> float:
    text_filter = StreamingFilter(build_rules(SPEC))
    start = time.perf_counter()
    for i in range(tokens):
        text_filter.feed(pieces[i % len(pieces)])
    text_filter.finish()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"median of {args.rounds} rounds; µs per token at each answer length")
    print(f"{'input':<16}" + "".join(f"{n:>10,}" for n in TOKENS) + f"{'32k/4k':>9}")
    for name, pieces in INPUTS.items():
        per_token = []
        for tokens in TOKENS:
            median = statistics.median(seconds_for(pieces, tokens) for _ in range(args.rounds))
            per_token.append(median / tokens * 1e6)
        cells = "".join(f"{us:>10.1f}" for us in per_token)
        print(f"{name:<16}{cells}{per_token[-1] / per_token[0]:>8.2f}x")


if __name__ == "__main__":
    main()
