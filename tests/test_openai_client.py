"""The shared client against the scripted server on 127.0.0.1, over real HTTP and the SDK."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from instruct.openai_client import (
    AdaptiveLimit,
    ChatClient,
    ClientError,
    ClientSettings,
    NothingParsed,
    RequestFailed,
    Terminated,
    gather_or_cancel,
)
from tests.conftest import files_holding
from tests.fake_openai import FakeOpenAI, Reply, format_of

SECRET = "sk-client-PLANTED-7e1d44"
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
GOOD = Reply(json.dumps({"answer": "yes"}))
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def parse_answer(text: str, cut_off: bool) -> tuple[Any, str]:
    try:
        return json.loads(text)["answer"], "ok"
    except (ValueError, KeyError, TypeError):
        return None, "cut_off" if cut_off else "unparseable"


@pytest.fixture(autouse=True)
def secret_key(monkeypatch):
    monkeypatch.setenv("INSTRUCT_TEST_KEY", SECRET)


def make_client(server: FakeOpenAI | None, folder: Path, **settings: Any) -> ChatClient:
    values = {
        "model": "scripted",
        "base_url": server.base_url if server else None,
        "api_key_env": "INSTRUCT_TEST_KEY",
        "request_timeout": 2.0,
        "max_retries": 2,
        **settings,
    }
    return ChatClient(ClientSettings(**values), folder, SCHEMA, "answer")


def ask(client: ChatClient, n: int = 1, **kwargs: Any) -> list[Any]:
    """``n`` concurrent requests inside a session; the completions (or the error raised)."""

    async def run() -> list[Any]:
        try:
            return await gather_or_cancel(
                client.complete(MESSAGES, parse_answer, max_tokens=16, **kwargs) for _ in range(n)
            )
        finally:
            await client.aclose()

    with client.session():
        return asyncio.run(run())


def rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]


def meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


# ---------------------------------------------------------------- structured output


@pytest.mark.parametrize(
    "accepted, chosen",
    [
        (("json_schema", "json_object+schema", "json_object", "none"), "json_schema"),
        (("json_object+schema", "json_object", "none"), "json_object+schema"),
        (("json_object", "none"), "json_object"),
        (("none",), "none"),
    ],
)
def test_the_first_accepted_form_is_detected_once_and_kept(tmp_path, accepted, chosen):
    with FakeOpenAI() as server:
        server.accept_formats(*accepted)
        server.default(GOOD)
        answers = ask(make_client(server, tmp_path, concurrency=3), n=6)
        kinds = [format_of(r.body) for r in server.requests]
    assert [a.value for a in answers] == ["yes"] * 6
    refused = 4 - len(accepted)
    assert kinds[:refused] == ["json_schema", "json_object+schema", "json_object"][:refused]
    assert kinds[refused:] == [chosen] * 6  # detected on the first request only
    assert meta(tmp_path)["client"]["structured_output"] == chosen
    assert [r["http_status"] for r in rows(tmp_path)] == [422] * refused + [200] * 6


def test_the_schema_is_sent_in_each_form(tmp_path):
    with FakeOpenAI() as server:
        server.default(GOOD)
        ask(make_client(server, tmp_path))
        fmt = server.requests[0].body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == SCHEMA
    assert fmt["json_schema"]["name"] == "answer" and fmt["json_schema"]["strict"] is True


def test_a_400_not_about_the_format_is_fatal_and_names_server_and_model(tmp_path):
    with FakeOpenAI() as server:
        server.script(Reply("max_tokens is too large", status=400))
        with pytest.raises(ClientError, match="400") as caught:
            ask(make_client(server, tmp_path))
        assert server.chat_count == 1
    assert server.base_url in str(caught.value) and "model scripted" in str(caught.value)
    assert meta(tmp_path)["exit_reason"] == "error"


# ---------------------------------------------------------------- concurrency and retries


def test_aimd_halves_once_per_window_and_grows_back_to_the_maximum():
    async def run() -> AdaptiveLimit:
        limit = AdaptiveLimit(4)
        epochs = [await limit.acquire() for _ in range(4)]
        for epoch in epochs:  # four timeouts of one burst: one congestion event
            limit.release(epoch, "congested")
        assert limit.limit == 2 and limit.epoch == 1
        epoch = await limit.acquire()
        limit.release(epoch, "congested")  # sent after the decrease: a new event
        assert limit.limit == 1
        for _ in range(1 + 2 + 3 + 10):
            limit.release(await limit.acquire(), "ok")
        assert (limit.limit, limit.lowest) == (4, 1)  # never above the configured maximum
        return limit

    asyncio.run(run())


def test_waiters_get_slots_in_order_and_never_exceed_the_limit():
    async def run() -> int:
        limit, peak, active = AdaptiveLimit(2), 0, 0

        async def job() -> None:
            nonlocal peak, active
            epoch = await limit.acquire()
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1
            limit.release(epoch, "ok")

        await asyncio.gather(*(job() for _ in range(10)))
        assert limit.in_flight == 0
        return peak

    assert asyncio.run(run()) == 2


@pytest.mark.slow
def test_a_one_slot_server_is_not_stormed(tmp_path):
    """Four requests at once on a server that generates one at a time (0.8 s each) with a
    1.4 s timeout: the queued ones time out. The client halves its concurrency and retries
    each with a doubled timeout, so every request completes without a storm. (Seconds, not
    tenths: on a loaded 2-core machine a tenth of a second of scheduling noise turned a
    completed request into one more timeout.)"""
    with FakeOpenAI(slots=1) as server:
        server.default(Reply(GOOD.content, delay=0.8))
        client = make_client(server, tmp_path, concurrency=4, request_timeout=1.4, max_retries=3)
        answers = ask(client, n=8)
        sent = server.chat_count
    assert [a.value for a in answers] == ["yes"] * 8
    # SDK retries with the same timeout would keep the queue full and time out again and
    # again, every request spending all three attempts (24 sent) and some giving up; here the
    # timeouts die out within two retries each. (How many need a second retry rides on tenths
    # of a second of scheduling: a loaded 2-core CI machine sent 16.)
    assert sent < 3 * 8
    got = rows(tmp_path)
    assert any(r["status"] == "timeout" for r in got)
    for number in {r["request"] for r in got}:
        attempts = [r for r in got if r["request"] == number]
        assert attempts[0]["timeout"] == 1.4 and len(attempts) <= 3
        for before, after in zip(attempts, attempts[1:], strict=False):
            assert before["status"] == "timeout" and after["timeout"] == 2 * before["timeout"]
    client_meta = meta(tmp_path)["client"]
    assert client_meta["concurrency"]["lowest"] <= 2 and client_meta["gave_up"] == 0


@pytest.mark.slow
def test_retry_after_pauses_every_request_and_halves_concurrency(tmp_path):
    with FakeOpenAI() as server:
        server.script(Reply.rate_limited(retry_after=1))
        server.default(GOOD)
        client = make_client(server, tmp_path, concurrency=2)
        start = time.monotonic()
        answers = ask(client, n=3)
        elapsed = time.monotonic() - start
    assert [a.value for a in answers] == ["yes"] * 3
    assert elapsed >= 1.0  # the SDK's own backoff would be about 0.5 s
    counts = meta(tmp_path)["client"]
    assert counts["rate_limited"] == 1 and counts["concurrency"]["lowest"] == 1
    assert counts["requests"] == 4 == counts["ok"] + counts["failed"]


@pytest.mark.slow
def test_a_failing_server_raises_request_failed_then_stops_after_a_run(tmp_path):
    with FakeOpenAI() as server:
        server.script(GOOD)
        server.fail_after(1)
        client = make_client(server, tmp_path, concurrency=1, max_retries=1, max_failed_requests=2)

        async def run() -> list[str]:
            seen = []
            try:
                for _ in range(5):
                    try:
                        await client.complete(MESSAGES, parse_answer, max_tokens=8)
                        seen.append("ok")
                    except RequestFailed:
                        seen.append("failed")
            finally:
                await client.aclose()
            return seen

        with pytest.raises(ClientError, match="2 requests in a row failed"):
            with client.session():
                asyncio.run(run())
        assert server.chat_count == 1 + 2 + 2  # the ok one, then two requests of 2 attempts
    counts = meta(tmp_path)["client"]
    assert (counts["ok"], counts["failed"], counts["gave_up"]) == (1, 4, 2)
    assert "500" in counts["last_error"] and meta(tmp_path)["exit_reason"] == "error"


def test_an_unreachable_server_fails_fast_naming_it(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    client = make_client(None, tmp_path, base_url=url, max_retries=1)
    with pytest.raises(ClientError, match="no answer after 1 retries") as caught:
        ask(client)
    assert url in str(caught.value)


def test_nothing_parsed_stops_with_a_diagnosis(tmp_path):
    with FakeOpenAI() as server:
        server.default(Reply("no JSON here"))
        client = make_client(server, tmp_path, concurrency=1, diagnose_after=5)

        async def run() -> int:
            n = 0
            try:
                while True:
                    await client.complete(MESSAGES, parse_answer, max_tokens=8)
                    n += 1
            finally:
                await client.aclose()

        with pytest.raises(NothingParsed, match="0 of 5 responses parsed") as caught:
            with client.session():
                asyncio.run(run())
        assert server.chat_count == 5
    assert str(tmp_path / "responses.jsonl") in str(caught.value)
    assert [r["outcome"] for r in rows(tmp_path)] == ["unparseable"] * 5
    assert rows(tmp_path)[0]["content"] == "no JSON here"


# ---------------------------------------------------------------- meta.json and the key


def test_meta_json_on_sigterm_and_the_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with FakeOpenAI() as server:
        server.default(GOOD)
        client = make_client(server, tmp_path)
        with pytest.raises(Terminated) as caught:
            with client.session():
                asyncio.run(client.complete(MESSAGES, parse_answer, max_tokens=8))
                signal.raise_signal(signal.SIGTERM)
    assert caught.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    written = meta(tmp_path)
    assert written["exit_reason"] == "SIGTERM" and written["client"]["ok"] == 1


def test_meta_json_on_ctrl_c_and_on_success(tmp_path):
    with FakeOpenAI() as server:
        server.default(GOOD)
        with pytest.raises(KeyboardInterrupt):
            with make_client(server, tmp_path / "a").session():
                raise KeyboardInterrupt
        assert meta(tmp_path / "a")["exit_reason"] == "SIGINT"
        ask(make_client(server, tmp_path / "b"), n=2)
    written = meta(tmp_path / "b")
    assert written["exit_reason"] == "completed" and written["error"] is None
    counts = written["client"]
    assert (counts["requests"], counts["ok"], counts["parsed"]) == (2, 2, 2)
    assert counts["prompt_tokens"] == 20 and counts["api_key_env"] == "INSTRUCT_TEST_KEY"


def test_the_key_is_sent_but_written_nowhere_even_when_echoed(tmp_path, caplog):
    echo = {"error": {"message": f"bad key {SECRET} for this org", "type": "x", "code": None}}
    with FakeOpenAI() as server:
        server.script(GOOD, Reply(status=500, body=echo))
        server.default(GOOD)
        ask(make_client(server, tmp_path, concurrency=1), n=3)
        headers = server.requests[0].headers
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert files_holding(tmp_path, SECRET) == []
    assert SECRET not in caplog.text
    assert any("bad key *** for" in (r.get("error") or "") for r in rows(tmp_path))
    assert all("headers" not in r for r in rows(tmp_path))


def test_a_missing_key_for_the_openai_api_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("INSTRUCT_TEST_KEY")
    with pytest.raises(ClientError, match="INSTRUCT_TEST_KEY"):
        make_client(None, tmp_path)
