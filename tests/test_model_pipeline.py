"""The quickstart on the embedded SmolLM2-135M model: real tokens, end to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
from llama_cpp import Llama

from promptpipe.backends.llamacpp import default_model_path
from promptpipe.cli import localrun
from promptpipe.contract.pipeline_file import load_pipeline
from promptpipe.contract.spec import StageName
from promptpipe.gateway.requests import work_item
from promptpipe.runtime.calls import StageClient
from promptpipe.textfilters.rules import build_rules
from promptpipe.textfilters.streaming import StreamingFilter
from promptpipe.v1 import common_pb2, gateway_pb2
from promptpipe.waiting import wait_until_async
from tests.support.calls import Outcome, collect
from tests.support.pipelines import RunningPipeline

pytestmark = [pytest.mark.processes, pytest.mark.model]

QUICKSTART = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "quickstart.yaml"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    mp = pytest.MonkeyPatch()
    mp.setenv("PROMPTPIPE_HOME", str(tmp_path_factory.mktemp("home")))
    run = localrun.start(QUICKSTART)
    try:
        localrun.wait_serving(run, timeout=120)
        yield RunningPipeline(run)
    finally:
        localrun.stop(run)
        mp.undo()


async def assembled_prompt(p: RunningPipeline, request: gateway_pb2.GenerateRequest) -> str:
    """The prompt the pipeline builds for `request`, asked of the rag and assemble stages."""
    spec = load_pipeline(QUICKSTART).spec
    item = work_item(request, spec.generation, "direct")
    deadline = time.monotonic() + 30
    retry = spec.stages.rag.retries
    gateway = p.identity_of(StageName.STREAM)  # asked as the gateway asks them
    rag = StageClient(p.target(StageName.RAG), retry, tokens=gateway)
    assemble = StageClient(p.target(StageName.ASSEMBLE), retry, tokens=gateway)
    try:
        item = await rag.process(item, deadline)
        assert any("Paris" in passage.text for passage in item.passages), "rag found the relevant passage"
        item = await assemble.process(item, deadline)
    finally:
        await rag.close()
        await assemble.close()
    return item.prompt


async def test_quickstart_answers_with_the_models_own_tokens(quickstart: RunningPipeline) -> None:
    max_new = 24
    out = await collect(quickstart.gateway, QUESTION, temperature=0.0, max_new_tokens=max_new, session_id="s1")
    assert out.error is None and out.summary is not None
    assert out.text.strip(), "a non-empty answer"
    assert out.summary.usage.prompt_tokens > 50, "the prompt holds the template and retrieved context"

    # The same prompt, decoded greedily by llama.cpp directly, then post-processed the same way.
    request = gateway_pb2.GenerateRequest(
        session_id="s1",
        prompt=QUESTION,
        parameters=common_pb2.GenerationParameters(temperature=0.0, max_new_tokens=max_new),
    )
    prompt = await assembled_prompt(quickstart, request)
    llm = Llama(str(default_model_path()), n_ctx=2048, verbose=False)
    direct = llm.create_completion(prompt, max_tokens=max_new, temperature=0.0, top_k=40, top_p=0.95)
    expected = StreamingFilter(build_rules(load_pipeline(QUICKSTART).spec.post))
    want = expected.feed(direct["choices"][0]["text"]).text + expected.finish().text
    assert out.text == want
    assert out.summary.usage.completion_tokens == direct["usage"]["completion_tokens"]


async def test_cancelled_call_stops_llama_cpp_decoding(quickstart: RunningPipeline) -> None:
    def decoded() -> float:
        return quickstart.metric(StageName.INFERENCE, "promptpipe_backend_decoded_tokens_total")

    def active() -> float:
        return quickstart.metric(StageName.INFERENCE, "promptpipe_backend_active_generations")

    max_new = 1800  # about 30 s of decoding: far longer than the test needs, however slow its client
    out = Outcome()
    call = asyncio.create_task(
        collect(
            quickstart.gateway,
            "Write a very long story about a dragon.",
            out,
            max_new_tokens=max_new,
            temperature=0.8,
            timeout=120.0,
        )
    )
    await wait_until_async(lambda: out.chunks >= 3, timeout=60, what="three chunks")
    assert active() == 1, "the generation is still running when the client cancels"
    at_cancel = decoded()
    call.cancel()
    await wait_until_async(lambda: active() == 0, what="the generation to end")
    stopped_at = decoded()
    await asyncio.sleep(0.5)
    assert decoded() == stopped_at, "llama.cpp is no longer decoding"
    assert stopped_at - at_cancel < 50, "decoding stops within a few tokens of the cancel"
    assert quickstart.metric(StageName.INFERENCE, "promptpipe_backend_generations_cancelled_total") >= 1


async def test_the_openai_sdk_gets_the_models_greedy_answer_as_grpc_does(quickstart: RunningPipeline) -> None:
    want = await collect(quickstart.gateway, QUESTION, temperature=0.0, max_new_tokens=24)
    model = quickstart.run.model
    async with openai.AsyncOpenAI(base_url=quickstart.openai_base_url, api_key="unused", max_retries=0) as client:
        whole = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
        )
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24, stream=True
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert want.text.strip() and want.summary is not None
    assert whole.choices[0].message.content == want.text == streamed
    assert whole.usage is not None and whole.usage.completion_tokens == want.summary.usage.completion_tokens
