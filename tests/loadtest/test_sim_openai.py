"""The official `openai` client talks to the simulated pod like to any OpenAI server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pytest_aiohttp import AiohttpClient

from loadtest.simserver import DEFAULT_MODEL, SimConfig, build_app

FAST = SimConfig(name="pod-o", time_scale=0.01)


@pytest.fixture
async def api(aiohttp_client: AiohttpClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """An OpenAI client pointed at a fresh pod on 127.0.0.1."""
    client = await aiohttp_client(build_app(FAST))
    api = openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="dummy", max_retries=0, timeout=10.0
    )
    yield api
    await api.close()


async def test_openai_client_streams_a_chat_completion(api: openai.AsyncOpenAI) -> None:
    """Streaming with include_usage yields text chunks and a final usage chunk."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Write a haiku about load balancers."}
    ]
    stream = await api.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert len(text) == 32
    assert finish == "length"
    assert usage is not None
    assert usage.completion_tokens == 8
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


async def test_openai_client_non_streaming_and_models(api: openai.AsyncOpenAI) -> None:
    """Plain chat and text completions parse, and the model list names the served model."""
    models = await api.models.list()
    assert [m.id for m in models.data] == [DEFAULT_MODEL]
    chat = await api.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
    )
    assert chat.choices[0].message.content is not None
    assert len(chat.choices[0].message.content) == 12
    assert chat.usage is not None and chat.usage.total_tokens == chat.usage.prompt_tokens + 3
    text = await api.completions.create(model=DEFAULT_MODEL, prompt="Once upon", max_tokens=2)
    assert len(text.choices[0].text) == 8
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="missing", prompt="x", max_tokens=1)
