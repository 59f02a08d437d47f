"""assemble: renders the prompt with the model's chat template, within a token budget."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from promptpipe.contract.spec import BackendKind, ModelSpec, TemplateSpec
from promptpipe.runtime.stage import Call
from promptpipe.stages import token_counts
from promptpipe.stages.prompting import CHATML, COMMON, ChatTemplate, SpecialTokens, Tokenize, assemble
from promptpipe.v1 import stage_pb2

log = logging.getLogger(__name__)


# Chats longer than this are assembled in a worker thread. Rendering and tokenizing take about half a
# millisecond per 1,000 characters (the embedded model's tokenizer; 100 ms for 200,000), which on the
# event loop would hold up every other call's tokens.
LONG_CHAT_CHARS = 8_000


def _chars(item: stage_pb2.WorkItem) -> int:
    return sum(len(m.content) for m in item.messages) + sum(len(p.text) for p in item.passages)


def special_tokens_of(vocab: Any) -> list[str]:
    """The model's special tokens: those whose text shows only when special tokens are rendered."""
    tokens = []
    for token in range(vocab.n_vocab()):
        text = vocab.detokenize([token], special=True)
        if text != vocab.detokenize([token], special=False):
            tokens.append(text.decode(errors="ignore"))
    return tokens


class AssembleHandler:
    def __init__(self, spec: TemplateSpec, model: ModelSpec, default_max_new_tokens: int) -> None:
        self._spec = spec
        self._model = model
        self._default_max_new = default_max_new_tokens
        self._template = ChatTemplate(spec.chat_template or CHATML)
        self._tokenize: Tokenize = token_counts.approximate_tokens
        # Counting a part of the chat, to estimate what to cut: the same, unless counting asks a server.
        self._estimate: Tokenize | None = None
        self._special: SpecialTokens = COMMON
        self._context_size: int | None = None

    async def start(self) -> None:
        tgi = self._model.tgi
        if self._model.backend is BackendKind.TGI and tgi is not None and tgi.endpoints:
            self._tokenize = token_counts.TgiTokenCounter(tgi.endpoints, tgi.connect_timeout_seconds)
            self._estimate = token_counts.approximate_tokens
            return
        if self._model.backend is not BackendKind.LLAMACPP:
            return
        # The GGUF carries the model's vocabulary and chat template; load only those. Imported here:
        # with another backend, the assemble stage never loads llama.cpp.
        from llama_cpp import Llama  # noqa: PLC0415

        from promptpipe.backends.llamacpp import model_path  # noqa: PLC0415

        vocab: Any = await asyncio.to_thread(
            Llama, str(model_path(self._model.llamacpp)), vocab_only=True, verbose=False
        )
        self._tokenize = lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=True))
        self._special = SpecialTokens.of(await asyncio.to_thread(special_tokens_of, vocab))
        self._context_size = self._model.llamacpp.context_size
        if not self._spec.chat_template:
            source = vocab.metadata.get("tokenizer.chat_template")
            if source:
                bos = vocab.detokenize([vocab.token_bos()]).decode(errors="ignore")
                eos = vocab.detokenize([vocab.token_eos()]).decode(errors="ignore")
                self._template = ChatTemplate(source, bos, eos)
                log.info("using the chat template from the model's GGUF metadata")

    async def close(self) -> None:
        return None

    def budget(self, item: stage_pb2.WorkItem) -> int:
        budget = self._spec.max_prompt_tokens
        if self._context_size is not None:
            max_new = item.parameters.max_new_tokens or self._default_max_new
            budget = min(budget, self._context_size - max_new)
        return max(0, budget)

    async def process(self, item: stage_pb2.WorkItem, call: Call) -> stage_pb2.WorkItem:
        args = (self._spec, self._template, self._tokenize, self.budget(item), item, self._special, self._estimate)
        # A long chat would stall the other calls while it is rendered and tokenized; a count asked of a
        # server would stall them while it waits.
        if _chars(item) > LONG_CHAT_CHARS or self._estimate is not None:
            result = await asyncio.to_thread(assemble, *args)
        else:
            result = assemble(*args)
        item.prompt = result.prompt
        item.prompt_tokens = result.tokens
        if result.passages_used < len(item.passages):
            del item.passages[result.passages_used :]
        return item
