"""Prompt rendering within a token budget: pure functions, no I/O.

The chat is system prompt (with the retrieved context) + few-shot examples + history
+ the question. When it does not fit, the oldest history turns go first, then the
lowest-ranked passages; if the question alone does not fit, that is the caller's error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from promptpipe.contract.spec import TemplateSpec
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.v1 import common_pb2, stage_pb2

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Tokenize = Callable[[str], int]


def _raise(message: str) -> None:
    raise ValueError(message)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @functools.cached_property
    def _compiled(self) -> jinja2.Template:
        # Hugging Face renders chat templates with these settings.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.source)

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


def system_message(spec: TemplateSpec, passages: Sequence[stage_pb2.Passage]) -> str:
    if not passages:
        return spec.system
    context = "\n\n".join(f"[{i}] ({p.source}) {p.text}" for i, p in enumerate(passages, 1))
    return f"{spec.system}\n\n{spec.context_header}{context}"


def build_messages(
    spec: TemplateSpec, passages: Sequence[stage_pb2.Passage], history: Sequence[common_pb2.ChatMessage], question: str
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_message(spec, passages)}]
    for shot in spec.few_shot:
        messages += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
    messages += [{"role": m.role, "content": m.content} for m in history]
    messages.append({"role": "user", "content": question})
    return messages


def assemble(
    spec: TemplateSpec, template: ChatTemplate, tokenize: Tokenize, budget: int, item: stage_pb2.WorkItem
) -> Assembled:
    if not item.messages or item.messages[-1].role != "user":
        raise InvalidArgument("messages", "the last message must be from the user")
    question = item.messages[-1].content
    history = list(item.messages[:-1])
    passages = list(item.passages)  # rag returns them best first
    while True:
        prompt = template.render(build_messages(spec, passages, history, question))
        tokens = tokenize(prompt)
        if tokens <= budget:
            return Assembled(prompt, tokens, len(passages), len(history))
        if history:
            # Drop the oldest user/assistant exchange as a whole.
            del history[: 2 if len(history) > 1 else 1]
        elif passages:
            passages.pop()
        else:
            raise InvalidArgument("messages", f"the question needs {tokens} prompt tokens; the budget is {budget}")
