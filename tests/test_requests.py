"""Request validation and prompt assembly: pure functions."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from promptpipe.contract.spec import GenerationDefaults, ModelSpec, TemplateSpec
from promptpipe.gateway.requests import own_timings, work_item
from promptpipe.runtime.errors import InvalidArgument
from promptpipe.runtime.stage import Call
from promptpipe.stages import assemble as assemble_stage
from promptpipe.stages import token_counts
from promptpipe.stages.prompting import CHATML, ChatTemplate, assemble, build_messages
from promptpipe.v1 import common_pb2, gateway_pb2, stage_pb2

DEFAULTS = GenerationDefaults(max_new_tokens=64, max_new_tokens_limit=512, temperature=0.3)


def request(**kw: object) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (request(), "prompt"),
        (request(prompt="a", messages=[common_pb2.ChatMessage(role="user", content="b")]), "prompt"),
        (request(messages=[common_pb2.ChatMessage(role="robot", content="b")]), "messages[0].role"),
        (
            request(
                messages=[
                    common_pb2.ChatMessage(role="user", content="hi"),
                    common_pb2.ChatMessage(role="assistant", content="yo"),
                ]
            ),
            "messages[1].role",
        ),
        (request(messages=[common_pb2.ChatMessage(role="user", content="  ")]), "messages[0].content"),
        (
            request(prompt="a", parameters=common_pb2.GenerationParameters(max_new_tokens=10_000)),
            "parameters.max_new_tokens",
        ),
        (request(prompt="a", parameters=common_pb2.GenerationParameters(temperature=2.5)), "parameters.temperature"),
        (
            request(prompt="a", parameters=common_pb2.GenerationParameters(temperature=float("nan"))),
            "parameters.temperature",
        ),
        (request(prompt="a", parameters=common_pb2.GenerationParameters(top_p=0)), "parameters.top_p"),
        (request(prompt="a", parameters=common_pb2.GenerationParameters(stop=["x"] * 9)), "parameters.stop"),
        (request(prompt="a", parameters=common_pb2.GenerationParameters(stop=["ok", ""])), "parameters.stop[1]"),
        (request(prompt="a", session_id="s" * 300), "session_id"),
    ],
)
def test_bad_requests_name_the_field(req: gateway_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        work_item(req, DEFAULTS, "rid")
    assert info.value.field == field
    assert str(info.value).startswith(field + ": ")


def test_a_prompt_over_the_pipelines_cap_is_refused_in_all_not_per_message() -> None:
    capped = GenerationDefaults(max_prompt_characters=2048)
    three = [common_pb2.ChatMessage(role="user", content="z" * 700)] * 3  # each under, together over
    with pytest.raises(InvalidArgument) as info:
        work_item(request(messages=three), capped, "rid")
    assert info.value.field == "messages" and "2100 characters in all" in str(info.value)
    assert "generation.maxPromptCharacters" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        work_item(request(prompt="z" * 2049), capped, "rid")
    assert info.value.field == "prompt"
    assert len(work_item(request(prompt="z" * 2048), capped, "rid").messages[0].content) == 2048


def test_defaults_fill_unset_parameters_and_explicit_zero_temperature_is_kept() -> None:
    item = work_item(request(prompt="hi", parameters=common_pb2.GenerationParameters(temperature=0.0)), DEFAULTS, "rid")
    assert item.parameters.max_new_tokens == 64
    assert item.parameters.temperature == 0.0
    assert item.session_id == "", "no session made up: the call is routed by its prompt's opening"
    assert [(m.role, m.content) for m in item.messages] == [("user", "hi")]


def count_words(text: str) -> int:
    return len(text.split())


def item_with(history: int, passages: int, question: str = "what is it?") -> stage_pb2.WorkItem:
    msgs = []
    for i in range(history):
        msgs += [
            common_pb2.ChatMessage(role="user", content=f"old question {i} " * 5),
            common_pb2.ChatMessage(role="assistant", content=f"old answer {i} " * 5),
        ]
    msgs.append(common_pb2.ChatMessage(role="user", content=question))
    return stage_pb2.WorkItem(
        messages=msgs,
        passages=[
            stage_pb2.Passage(source=f"doc{i}", text=f"passage {i} " * 10, score=10 - i) for i in range(passages)
        ],
    )


def test_prompt_uses_template_with_context_history_and_question() -> None:
    spec = TemplateSpec(system="Be brief.", max_prompt_tokens=10_000)
    result = assemble(spec, ChatTemplate(CHATML), count_words, 10_000, item_with(history=1, passages=2))
    assert result.prompt.startswith("<|im_start|>system\nBe brief.\n\nUse the following context")
    assert "[1] (doc0) passage 0" in result.prompt and "[2] (doc1)" in result.prompt
    assert "old question 0" in result.prompt
    assert result.prompt.endswith("<|im_start|>user\nwhat is it?<|im_end|>\n<|im_start|>assistant\n")


def test_over_budget_drops_oldest_history_first_then_lowest_ranked_passages() -> None:
    spec = TemplateSpec(system="Be brief.")
    full = assemble(spec, ChatTemplate(CHATML), count_words, 10_000, item_with(history=3, passages=3))
    budget = full.tokens - 15
    cut = assemble(spec, ChatTemplate(CHATML), count_words, budget, item_with(history=3, passages=3))
    assert cut.tokens <= budget
    assert cut.history_used == 4 and cut.passages_used == 3
    assert "old question 0" not in cut.prompt and "old question 2" in cut.prompt
    tight = assemble(spec, ChatTemplate(CHATML), count_words, 20, item_with(history=3, passages=3))
    assert tight.history_used == 0 and tight.passages_used < 3 and tight.tokens <= 20


CHAT = ChatTemplate(CHATML)


def one_at_a_time(spec: TemplateSpec, budget: int, item: stage_pb2.WorkItem) -> tuple[int, int, int]:
    """The trimming rule read literally: drop one exchange (then one passage) and render again."""
    history, passages = list(item.messages[:-1]), list(item.passages)
    while True:
        prompt = CHAT.render(build_messages(spec, passages, history, item.messages[-1].content))
        if count_words(prompt) <= budget or not (history or passages):
            return count_words(prompt), len(history), len(passages)
        if history:
            del history[: 2 if len(history) > 1 else 1]
        else:
            passages.pop()


@pytest.mark.parametrize("history", [0, 1, 7])
def test_trimming_keeps_exactly_what_dropping_one_at_a_time_would(history: int) -> None:
    spec = TemplateSpec(system="Be brief.")
    item = item_with(history=history, passages=4)
    full = assemble(spec, ChatTemplate(CHATML), count_words, 10_000, item).tokens
    for budget in range(full, 0, -1):
        expected = one_at_a_time(spec, budget, item)
        if expected[0] > budget:
            break
        cut = assemble(spec, CHAT, count_words, budget, item)
        assert (cut.tokens, cut.history_used, cut.passages_used) == expected, budget


class CountingTemplate(ChatTemplate):
    renders = 0

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        CountingTemplate.renders += 1
        return super().render(messages)


def test_a_long_chat_is_trimmed_with_a_few_renders_not_one_per_dropped_turn() -> None:
    spec = TemplateSpec(system="Be brief.")
    item = item_with(history=600, passages=3)
    full = assemble(spec, ChatTemplate(CHATML), count_words, 10**9, item).tokens
    CountingTemplate.renders = 0
    cut = assemble(spec, CountingTemplate(CHATML), count_words, full // 2, item)
    assert cut.tokens <= full // 2 and cut.history_used > 0
    assert one_at_a_time(spec, full // 2, item) == (cut.tokens, cut.history_used, cut.passages_used)
    assert CountingTemplate.renders <= 6, "dropping one exchange per render would take about 300"


def test_question_that_cannot_fit_is_the_callers_error() -> None:
    with pytest.raises(InvalidArgument, match=r"^messages: the question needs"):
        assemble(TemplateSpec(), ChatTemplate(CHATML), count_words, 5, item_with(0, 0, "word " * 50))


def test_own_timings_subtract_the_stages_each_one_called_and_add_up_to_the_gateways_figures() -> None:
    t = common_pb2.StageTiming
    # A call of 1.5 s with its first token at 0.4 s, as the gateway timed it.
    nested = [
        t(stage="rag", work_seconds=0.01, first_output_seconds=0.01, hop_seconds=0.001, hop_first_seconds=0.001),
        t(stage="assemble", work_seconds=0.02, first_output_seconds=0.02, hop_seconds=0.002, hop_first_seconds=0.002),
        t(
            stage="inference",
            queue_wait_seconds=0.1,
            work_seconds=1.0,
            first_output_seconds=0.2,
            hop_seconds=0.003,
            hop_first_seconds=0.001,
        ),
        t(stage="post", work_seconds=1.2, first_output_seconds=0.31, hop_seconds=0.004, hop_first_seconds=0.002),
    ]
    stream = t(stage="stream", queue_wait_seconds=0.005, work_seconds=1.495, first_output_seconds=0.395)
    out = {x.stage: x for x in own_timings(nested, stream)}
    assert list(out) == ["rag", "assemble", "inference", "post", "stream"]
    assert out["post"].work_seconds == pytest.approx(1.2 - (0.1 + 1.0 + 0.003))
    assert out["post"].first_output_seconds == pytest.approx(0.31 - (0.1 + 0.2 + 0.001))
    assert out["stream"].work_seconds == pytest.approx(1.495 - 0.011 - 0.022 - 1.204)
    assert out["stream"].first_output_seconds == pytest.approx(0.395 - 0.011 - 0.022 - 0.312)
    total = sum(x.queue_wait_seconds + x.work_seconds + x.hop_seconds for x in out.values())
    first = sum(x.queue_wait_seconds + x.first_output_seconds + x.hop_first_seconds for x in out.values())
    assert total == pytest.approx(1.5)
    assert first == pytest.approx(0.4)


async def test_a_long_chat_is_assembled_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []

    def tokenize(text: str) -> int:
        threads.append(threading.get_ident())
        return count_words(text)

    monkeypatch.setattr(token_counts, "approximate_tokens", tokenize)
    handler = assemble_stage.AssembleHandler(TemplateSpec(max_prompt_tokens=100_000), ModelSpec(name="m"), 64)
    short = stage_pb2.WorkItem(messages=[common_pb2.ChatMessage(role="user", content="hello")])
    long = stage_pb2.WorkItem(messages=[common_pb2.ChatMessage(role="user", content="word " * 2_000)])
    call = Call(time.monotonic() + 10, 0.0)

    await handler.process(short, call)
    assert set(threads) == {threading.get_ident()}, "a short chat is not worth a thread hop"
    threads.clear()
    await handler.process(long, call)
    assert threads and threading.get_ident() not in threads
