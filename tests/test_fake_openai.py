"""The fake OpenAI server speaks the protocol well enough for the real SDK, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fake_openai import MODEL_ID, FakeOpenAI, Reply, format_of

MESSAGES = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


def client(server: FakeOpenAI, **kwargs: Any) -> openai.OpenAI:
    """A sync SDK client aimed at ``server``; kwargs go to ``openai.OpenAI``."""
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", **kwargs)


def test_scripted_success_returns_content_usage_and_finish_reason(server):
    server.script(Reply("Hello there!", finish_reason="length", prompt_tokens=7))
    completion = client(server).chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there!"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "gpt-test"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 20)
    assert completion.usage.total_tokens == 27
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.body["messages"] == MESSAGES


def test_authorization_header_is_recorded(server):
    server.default(Reply("ok"))
    client(server).chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert server.requests[0].headers["authorization"] == "Bearer sk-test"


def test_replies_are_consumed_in_order_then_the_default_repeats(server):
    server.script(Reply("one"), Reply("two"))
    server.default(Reply("again"))
    sdk = client(server)
    answers = [
        sdk.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
        for _ in range(4)
    ]
    assert answers == ["one", "two", "again", "again"]


@pytest.mark.slow
def test_rate_limit_with_retry_after_is_retried_by_the_sdk(server):
    server.script(Reply.rate_limited(retry_after=1), Reply("after the wait"))
    start = time.monotonic()
    completion = client(server, max_retries=1).chat.completions.create(
        model="gpt-test", messages=MESSAGES
    )
    assert completion.choices[0].message.content == "after the wait"
    assert len(server.requests) == 2
    # The SDK's own backoff would be <= 0.5 s, so >= 1 s shows it honoured Retry-After.
    assert time.monotonic() - start >= 1.0


def test_unauthorized_raises_authentication_error(server):
    server.script(Reply.unauthorized())
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server).chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert len(server.requests) == 1  # 401 is not retryable


def test_server_error_and_an_empty_script_are_500s(server):
    server.script(Reply.server_error())
    with pytest.raises(openai.InternalServerError):
        client(server, max_retries=0).chat.completions.create(model="m", messages=MESSAGES)
    # Nothing scripted: 500 with x-should-retry false, so even max_retries=2 tries only once.
    with pytest.raises(openai.InternalServerError, match="no scripted reply"):
        client(server, max_retries=2).chat.completions.create(model="m", messages=MESSAGES)
    assert len(server.requests) == 2


def test_hang_past_the_timeout_raises_and_the_server_keeps_serving(server):
    server.script(Reply.hang(30), Reply("still alive"))
    sdk = client(server, timeout=0.5, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        sdk.chat.completions.create(model="gpt-test", messages=MESSAGES)
    # The hung handler is still sleeping; a second request must be served regardless.
    completion = sdk.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == "still alive"
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 10.0  # far below the 30 s hang it had to cut short


@pytest.mark.slow
def test_async_client_handles_concurrent_requests(server):
    # Each reply waits 1 s, so the four requests overlap on the server if sent concurrently.
    server.default(Reply("pong", delay=1.0))

    async def ask_all() -> list[str | None]:
        sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-test")
        async with sdk:
            completions = await asyncio.gather(
                *(sdk.chat.completions.create(model="m", messages=MESSAGES) for _ in range(4))
            )
        return [c.choices[0].message.content for c in completions]

    assert asyncio.run(ask_all()) == ["pong"] * 4
    assert len(server.requests) == 4
    assert server.max_in_flight >= 2


def test_models_endpoint_and_unknown_paths(server):
    models = client(server).models.list()
    assert [model.id for model in models] == [MODEL_ID]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{server.base_url}/nowhere", timeout=5)
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["error"]["code"] == "unknown_url"


@pytest.mark.slow
def test_one_slot_queues_requests_and_keeps_generating_abandoned_ones():
    with FakeOpenAI(slots=1) as server:
        server.default(Reply("done", delay=2.0))
        sdk = client(server, timeout=3.0, max_retries=0)

        async def both() -> list[Any]:
            async_sdk = openai.AsyncOpenAI(
                base_url=server.base_url, api_key="sk-test", timeout=3.0, max_retries=0
            )
            async with async_sdk:
                calls = [
                    async_sdk.chat.completions.create(model="m", messages=MESSAGES)
                    for _ in range(2)
                ]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(both())
        # One held the slot for 2 s and answered; the other waited 2 s for it, then needed 2 s
        # more: past its 3 s. Which one the server took first is its choice.
        answered = [r for r in results if not isinstance(r, Exception)]
        timed_out = [r for r in results if isinstance(r, openai.APITimeoutError)]
        assert len(answered) == 1 and len(timed_out) == 1, results
        assert answered[0].choices[0].message.content == "done"
        start = time.monotonic()
        sdk.with_options(timeout=5).chat.completions.create(model="m", messages=MESSAGES)
        # The abandoned one still held the slot: the next request waited for it.
        assert time.monotonic() - start >= 0.5


def test_formats_refused_with_fastapis_422_without_using_the_script(server):
    server.accept_formats("json_object+schema", "none")
    server.script(Reply("{}"))
    sdk = client(server, max_retries=0)
    schema_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        sdk.chat.completions.create(model="m", messages=MESSAGES, response_format=schema_format)
    assert caught.value.body["detail"][0]["loc"] == ["body", "response_format", "type"]
    with_schema = {"type": "json_object", "schema": {"type": "object"}}
    completion = sdk.chat.completions.create(
        model="m", messages=MESSAGES, extra_body={"response_format": with_schema}
    )
    assert completion.choices[0].message.content == "{}"
    assert [format_of(r.body) for r in server.requests] == ["json_schema", "json_object+schema"]


def test_responder_fail_after_and_chat_count(server):
    server.respond(lambda body: Reply(body["messages"][-1]["content"].upper()))
    server.fail_after(2)
    sdk = client(server, max_retries=0)
    answers = [
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": w}])
        .choices[0]
        .message.content
        for w in ("one", "two")
    ]
    assert answers == ["ONE", "TWO"]
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="m", messages=MESSAGES)
    sdk.models.list()
    assert server.chat_count == 3 and len(server.requests) == 4
