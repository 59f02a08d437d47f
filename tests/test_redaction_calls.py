"""Redaction on a running pipeline, read back with the OpenAI SDK: PII written the way a reader still reads
it (full-width, zero-width, dotted, `(at)`) leaves the post stage redacted, streamed or whole."""

from __future__ import annotations

import openai
import pytest

from tests.support.pipelines import synthetic_pipeline

pytestmark = pytest.mark.processes

# The synthetic backend streams this as each of its tokens.
DISGUISED = " mail ali\u200bce\uff20example.com or alice(at)example.com, card 4111.1111.1111.1111 0 ok."


@pytest.mark.parametrize("streamed", [False, True])
def test_disguised_pii_in_an_answer_is_redacted(start_pipeline, streamed: bool) -> None:
    p = start_pipeline(
        synthetic_pipeline(model={"synthetic": {"tokenText": DISGUISED}}, generation={"maxNewTokens": 3})
    )
    client = openai.OpenAI(base_url=p.openai_base_url, api_key="unused", max_retries=0)
    hello = [{"role": "user", "content": "hello"}]
    if streamed:
        stream = client.chat.completions.create(model="synthetic", messages=hello, stream=True)  # type: ignore[arg-type]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    else:
        answer = client.chat.completions.create(model="synthetic", messages=hello)  # type: ignore[arg-type]
        text = answer.choices[0].message.content or ""
    assert text.count(" mail [REDACTED] or [REDACTED], card [REDACTED] 0 ok.") == 3, text
    assert "alice" not in text and "4111" not in text
