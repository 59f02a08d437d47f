"""What a bench run sends: synthetic prompts of a set length, a JSONL file of prompts, or multi-turn
sessions in which each turn carries the conversation so far."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Common short English words: about one model token each, so `words` approximates `tokens`.
_FILLER = (
    "the of and to in is that it for was on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more "
    "write go see number"
)
_WORDS = tuple(_FILLER.split())


@dataclass(frozen=True)
class Prompt:
    text: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int = 0  # 0: the pipeline's default


def synthetic(input_tokens: int, output_tokens: int, rng: random.Random) -> Prompt:
    """About `input_tokens` tokens of filler words, asking for `output_tokens` tokens."""
    return Prompt(text=" ".join(rng.choice(_WORDS) for _ in range(max(1, input_tokens))), max_new_tokens=output_tokens)


def from_jsonl(path: Path) -> list[Prompt]:
    """One prompt per line: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}, and an
    optional "max_tokens". A line that is neither is named in the error."""
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            max_tokens = int(row.get("max_tokens", 0))
            if isinstance(row.get("prompt"), str) and row["prompt"]:
                prompts.append(Prompt(text=row["prompt"], max_new_tokens=max_tokens))
            elif isinstance(row.get("messages"), list) and row["messages"]:
                messages = tuple((str(m["role"]), str(m["content"])) for m in row["messages"])
                prompts.append(Prompt(messages=messages, max_new_tokens=max_tokens))
            else:
                raise ValueError('needs a non-empty "prompt" or "messages"')
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


class Conversation:
    """A multi-turn session: each turn sends the history (user turns and the answers received) plus a new
    user turn, under one session id, so the pipeline keeps the session on one backend replica."""

    def __init__(self, session: str, turns: int) -> None:
        self.session = session
        self.turns = turns
        self.history: list[tuple[str, str]] = []

    def next(self, user: Prompt) -> Prompt:
        text = user.text or (user.messages[-1][1] if user.messages else "")
        self.history.append(("user", text))
        return Prompt(messages=tuple(self.history), max_new_tokens=user.max_new_tokens)

    def answered(self, answer: str) -> None:
        self.history.append(("assistant", answer))
