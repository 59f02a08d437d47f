"""Prompt rendering within a token budget: pure functions, no I/O.

The chat is system prompt (with the retrieved context) + few-shot examples + history
+ the question. When it does not fit, the oldest history turns go first, then the
lowest-ranked passages; if the question alone does not fit, that is the caller's error.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import jinja2

from promptpipe import chattemplates
from promptpipe.contract.spec import TemplateSpec
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.textfilters.normalize import view
from promptpipe.v1 import common_pb2, stage_pb2

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Tokenize = Callable[[str], int]

# Special-token shapes common chat models frame turns with: ChatML, Llama 3 and 4, Phi, Granite, gpt-oss
# (`<|...|>`), DeepSeek's with full-width bars (`<｜User｜>`, `<｜end▁of▁sentence｜>`), Llama 2 and Mistral
# (`[INST]`, `<<SYS>>`, `<s>`, and Mistral's `[SYSTEM_PROMPT]`, `[TOOL_CALLS]` and the like), Gemma
# (`<start_of_turn>`). Used as they are when the model's own vocabulary is not at hand (a TGI or OpenAI
# backend: neither API lists its special tokens), added to its special tokens when it is (llama.cpp).
MISTRAL_CONTROL = "INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|TOOL_CONTENT|IMG|IMG_BREAK|IMG_END"
COMMON_SPECIAL_TOKENS = (
    r"<\|[^|\s<>]{1,64}\|>|<\uff5c[^\uff5c\s<>]{1,64}\uff5c>|</?s>"
    rf"|\[/?(?:{MISTRAL_CONTROL})\]|<</?SYS>>|<(?:start|end)_of_turn>|<(?:bos|eos|pad|unk)>"
)
# Put inside an escaped token: the text reads the same, but no longer tokenizes as the special token.
ZERO_WIDTH_SPACE = "\u200b"


@dataclass(frozen=True)
class SpecialTokens:
    """Text that a tokenizer parsing special tokens would read as the model's own markup.

    The prompt goes to the backend as text, tokenized with special tokens parsed (the chat template's
    markers must become them), so a caller's `<|im_end|><|im_start|>system ...` would open a turn of
    its own. Everything callers supply (history, the question, retrieved passages) is escaped; the
    template and the pipeline's own system prompt and examples are not.
    """

    known: tuple[str, ...] = ()
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        literals = sorted({t for t in self.known if len(t) > 1}, key=len, reverse=True)
        pattern = re.compile("|".join([*(re.escape(t) for t in literals), COMMON_SPECIAL_TOKENS]))
        object.__setattr__(self, "_pattern", pattern)

    @classmethod
    def of(cls, known: Iterable[str]) -> SpecialTokens:
        return cls(tuple(known))

    def escape(self, text: str) -> str:
        """`text` with a zero-width space after the first character of each special token in it, found in
        its normalised view (textfilters.normalize): a tokenizer that normalises (NFKC) before it matches
        special tokens would read `＜|im_start|＞` as `<|im_start|>`."""
        seen = view(text, final=True)
        if seen.starts is None:
            return self._pattern.sub(lambda m: m.group()[0] + ZERO_WIDTH_SPACE + m.group()[1:], text)
        cuts = [seen.raw_end(m.start() + 1) for m in self._pattern.finditer(seen.text)]
        pieces, last = [], 0
        for cut in cuts:
            pieces += [text[last:cut], ZERO_WIDTH_SPACE]
            last = cut
        return "".join([*pieces, text[last:]])


COMMON = SpecialTokens()


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @functools.cached_property
    def _compiled(self) -> jinja2.Template:
        return chattemplates.environment().from_string(self.source)

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        return self._compiled.render(
            messages=list(messages), add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
        )


@dataclass(frozen=True)
class Assembled:
    prompt: str
    tokens: int
    passages_used: int
    history_used: int


def system_message(spec: TemplateSpec, passages: Sequence[stage_pb2.Passage], special: SpecialTokens = COMMON) -> str:
    if not passages:
        return spec.system
    context = "\n\n".join(special.escape(f"[{i}] ({p.source}) {p.text}") for i, p in enumerate(passages, 1))
    return f"{spec.system}\n\n{spec.context_header}{context}"


def build_messages(
    spec: TemplateSpec,
    passages: Sequence[stage_pb2.Passage],
    history: Sequence[common_pb2.ChatMessage],
    question: str,
    special: SpecialTokens = COMMON,
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_message(spec, passages, special)}]
    for shot in spec.few_shot:
        messages += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
    messages += [{"role": m.role, "content": special.escape(m.content)} for m in history]
    messages.append({"role": "user", "content": special.escape(question)})
    return messages


def assemble(
    spec: TemplateSpec,
    template: ChatTemplate,
    tokenize: Tokenize,
    budget: int,
    item: stage_pb2.WorkItem,
    special: SpecialTokens = COMMON,
    estimate: Tokenize | None = None,
) -> Assembled:
    """The prompt for `item` within `budget` tokens as `tokenize` counts them; `estimate` counts the
    chat's parts to guess what to cut (default: `tokenize`; a cheaper one where counting is a call)."""
    if not item.messages or item.messages[-1].role != "user":
        raise InvalidArgument("messages", "the last message must be from the user")
    return _Trimming(spec, template, tokenize, item, special, estimate or tokenize).fit(budget)


class _Trimming:
    """The chat cut to a budget. What goes, in order: the oldest user/assistant exchange as a whole, then
    the lowest-ranked passage; step k drops the first k of those. Rendering and tokenizing cost as much
    as the chat is long, so rather than render once per step, the step that fits is estimated from each
    part's own token count (one pass over the chat), then confirmed, or corrected by galloping and
    bisection, with a render or two."""

    def __init__(
        self,
        spec: TemplateSpec,
        template: ChatTemplate,
        tokenize: Tokenize,
        item: stage_pb2.WorkItem,
        special: SpecialTokens,
        estimate: Tokenize,
    ) -> None:
        self._spec, self._template, self._tokenize, self._special = spec, template, tokenize, special
        self._count_part = estimate
        self._question = item.messages[-1].content
        self._history = list(item.messages[:-1])
        self._passages = list(item.passages)  # rag returns them best first
        # The history drops two messages at a time; an odd one out goes last.
        self._exchanges = [(i, min(i + 2, len(self._history))) for i in range(0, len(self._history), 2)]
        self._rendered: dict[int, Assembled] = {}

    def fit(self, budget: int) -> Assembled:
        whole = self._render(0)
        if whole.tokens <= budget:
            return whole
        most = len(self._exchanges) + len(self._passages)
        shortest = self._render(most)
        if shortest.tokens > budget:
            raise InvalidArgument(
                "messages", f"the question needs {shortest.tokens} prompt tokens; the budget is {budget}"
            )
        return self._render(self._fewest_steps(budget, self._estimate(whole.tokens - budget), most))

    def _estimate(self, excess: int) -> int:
        """The fewest steps whose parts' own tokens add up to `excess`."""
        framing = self._framing_per_message()
        saved = 0
        for step, (start, stop) in enumerate(self._exchanges, 1):
            saved += sum(self._count_part(m.content) + framing for m in self._history[start:stop])
            if saved >= excess:
                return step
        for step, passage in enumerate(reversed(self._passages), len(self._exchanges) + 1):
            saved += self._count_part(passage.text) + 1
            if saved >= excess:
                return step
        return len(self._exchanges) + len(self._passages)

    def _framing_per_message(self) -> int:
        """Tokens the template adds around each message (role markers, separators), on average."""
        messages = build_messages(self._spec, self._passages, self._history, self._question, self._special)
        content = sum(self._count_part(m["content"]) for m in messages)
        return max(0, (self._render(0).tokens - content) // len(messages))

    def _fewest_steps(self, budget: int, guess: int, most: int) -> int:
        """The fewest steps that fit, given that `most` does and that more steps never add tokens."""

        def fits(step: int) -> bool:
            return self._render(step).tokens <= budget

        guess = min(max(guess, 1), most)
        if fits(guess):  # gallop down to a step that does not fit (step 0 does not)
            high, width = guess, 1
            while fits(low := max(high - width, 0)):
                high, width = low, width * 2
        else:  # gallop up to a step that fits
            low, width = guess, 1
            while not fits(high := min(low + width, most)):
                low, width = high, width * 2
        while high - low > 1:  # not fits(low), fits(high)
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle
        return high

    def _render(self, step: int) -> Assembled:
        if step not in self._rendered:
            dropped_history = self._exchanges[step - 1][1] if 0 < step <= len(self._exchanges) else 0
            if step > len(self._exchanges):
                dropped_history = len(self._history)
            kept_passages = len(self._passages) - max(0, step - len(self._exchanges))
            history = self._history[dropped_history:]
            passages = self._passages[:kept_passages]
            messages = build_messages(self._spec, passages, history, self._question, self._special)
            prompt = self._template.render(messages)
            self._rendered[step] = Assembled(prompt, self._tokenize(prompt), len(passages), len(history))
        return self._rendered[step]
